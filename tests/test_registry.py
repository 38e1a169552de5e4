"""The MLflow 3 registry side through a real SQLite store: each run's best checkpoint is a
LoggedModel linked to its run, step, metric and dataset and registered from it; `@champion` is the
lowest val loss on the champion's data (a run on other data never moves it), `@latest-run` the
newest; two trainers finishing at once leave the better one champion; the MLmodel carries an
input example and no path of the machine it was logged on."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from gemma3 import registry
from gemma3.config import Config
from gemma3.hf import save_checkpoint
from gemma3.model import Gemma3ForCausalLM
from gemma3.tracking import start_run, tracking_uri
from tests.project import write_tokens

NAME = "gemma3-tinystories"


def tokens_with_lock(root: Path, md5: str, seed: int = 0) -> Path:
    """data/tokens plus the dvc.lock entry DVC writes for it (size and file count must match)."""
    d = write_tokens(root, n_val=2_000 + seed)
    files = [f for f in d.rglob("*") if f.is_file()]
    out = {"path": "data/tokens", "md5": md5, "size": sum(f.stat().st_size for f in files)}
    out["nfiles"] = len(files)
    lock = {"schema": "2.0", "stages": {"tokenize": {"cmd": "x", "outs": [out]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock), encoding="utf-8")
    return d


def checkpoint(root: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    ckpt = root / "checkpoints" / "best"
    save_checkpoint(Gemma3ForCausalLM(Config.from_name("gemma3-tiny")), ckpt, meta={"step": 6})
    return ckpt


def train_run(root: Path, seed: int, val_loss: float, step: int = 6):
    """What the train stage's tracker does at the end, with a forced val loss."""
    ckpt = checkpoint(root, seed)
    tracker = start_run(
        enabled=True, experiment="reg", root=root, tags={"stage": "train"},
        registered_model=NAME, data_dir=root / "data" / "tokens",
    )  # fmt: skip
    tracker.log_best(ckpt, val_loss, step)
    tracker.finish()
    return tracker, ckpt


def weights_of_alias(uri: str, alias: str) -> dict[str, torch.Tensor]:
    import mlflow

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@{alias}")
    return model.unwrap_python_model().model.state_dict()


def same_weights(a: dict[str, torch.Tensor], ckpt: Path) -> bool:
    from gemma3.hf import load_checkpoint

    b = load_checkpoint(ckpt).state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_champion_is_the_lowest_val_loss_on_the_same_data(tmp_path: Path, monkeypatch) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    runs, lines, saved = [], [], {}
    for seed, loss in ((1, 3.0), (2, 1.0), (3, 2.0)):
        work = tmp_path / f"w{seed}"  # one working copy per run, the same tokens
        tokens_with_lock(work, "aaaa.dir")
        tracker, ckpt = train_run(work, seed, loss)
        runs.append(tracker)
        lines.append(tracker.alias_line)
        saved[seed] = ckpt
    assert [t.model_version for t in runs] == ["1", "2", "3"]
    assert lines == [
        f"champion: {NAME} version 1 (val loss 3.0000)",
        f"champion: {NAME} version 2 (val loss 1.0000, beating version 1's 3.0000)",
        f"champion stays {NAME} version 2 (val loss 1.0000); version 3 has 2.0000 on the same data",
    ]
    uri = tracking_uri(tmp_path / "w1")
    client = mlflow.MlflowClient(uri)
    assert client.get_model_version_by_alias(NAME, "champion").run_id == runs[1].run_id
    assert client.get_model_version_by_alias(NAME, "latest-run").version == 3
    # The weights loaded through @champion are the second run's checkpoint.
    assert same_weights(weights_of_alias(uri, "champion"), saved[2])
    assert not same_weights(weights_of_alias(uri, "champion"), saved[3])

    # A better run on other tokens does not compete; the line says why.
    other = tmp_path / "w4"
    tokens_with_lock(other, "bbbb.dir", seed=8)
    tracker, _ = train_run(other, 4, 0.5)
    assert tracker.alias_line == (
        f"champion stays {NAME} version 2: version 4 trained on other data (data/tokens md5 "
        "bbbb.dir, champion's aaaa.dir), so it does not compete"
    )
    assert client.get_model_version_by_alias(NAME, "champion").version == 2
    assert client.get_model_version_by_alias(NAME, "latest-run").version == 4
    # The train stage's last lines name the run (id, UI path) and the version and aliases.
    summary = tracker.summary()
    assert summary[0].startswith(f"mlflow: run {tracker.run_id} (FINISHED) http://127.0.0.1:5000/")
    assert f"#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}" in summary[0]
    assert summary[1].startswith(f"mlflow: registered models:/{NAME}/4 (alias latest-run); ")


def test_logged_model_page_shows_version_metric_dataset_and_run(
    tmp_path: Path, monkeypatch
) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    tokens_with_lock(tmp_path, "cccc.dir")
    tracker, ckpt = train_run(tmp_path, 0, 2.5, step=12)
    client = mlflow.MlflowClient(tracking_uri(tmp_path))
    model_id = tracker.model_uri.removeprefix("models:/")
    model = client.get_logged_model(model_id)
    # Registered through the LoggedModel linkage: the model knows its version, the version its model.
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": NAME, "version": 1}]
    mv = client.get_model_version(NAME, "1")
    assert mv.source == f"models:/{model_id}" and mv.run_id == tracker.run_id
    assert mv.tags["val_loss"] == "2.5" and mv.tags["step"] == "12"
    assert mv.tags["data.dvc_md5"] == "cccc.dir"
    # Linked to its run at its step, with its metric on the run's dataset.
    assert model.source_run_id == tracker.run_id
    run = client.get_run(tracker.run_id)
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model_id, 12)]
    (dataset,) = run.inputs.dataset_inputs
    (metric,) = model.metrics
    assert (metric.key, metric.value, metric.step) == ("best_val_loss", 2.5, 12)
    assert (metric.dataset_name, metric.dataset_digest) == (
        dataset.dataset.name,
        dataset.dataset.digest,
    )
    assert json.loads(dataset.dataset.profile)["dvc_md5"] == "cccc.dir"
    # The experiment opens in the model-training view; the run has a user.
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.tags["mlflow.user"]
    # One copy of the weights: in the Model, none among the run's artifacts.
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}"))
    assert len(list(local.rglob("model.safetensors"))) == 1
    assert client.list_artifacts(tracker.run_id) == []
    # An input example; the MLmodel names no path of this machine but MLflow's own record of
    # where the store keeps the model (artifact_path).
    assert (local / "serving_input_example.json").is_file()
    mlmodel = yaml.safe_load((local / "MLmodel").read_text(encoding="utf-8"))
    mlmodel.pop("artifact_path")
    assert str(tmp_path) not in json.dumps(mlmodel) and "/tmp" not in json.dumps(mlmodel)
    # No model config params as run params.
    assert "max_new_tokens" not in run.data.params and "do_sample" not in run.data.params


class SlowChampionWrites:
    """A client whose writes of `champion` to the slow run's version land late: two trainers
    that read the alias at the same moment would then overwrite each other (a lost update)."""

    def __init__(self, client, slow_run: str, delay: float) -> None:
        self._client, self.slow_run, self.delay = client, slow_run, delay

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        if alias == registry.CHAMPION:
            if self._client.get_model_version(name, version).run_id == self.slow_run:
                time.sleep(self.delay)
        self._client.set_registered_model_alias(name, alias, version)


def echo(model_input: list[str]) -> list[str]:
    return model_input


@pytest.mark.parametrize("slow", [0, 1])
def test_two_trainers_finishing_at_once_leave_the_better_one_champion(
    tmp_path: Path, monkeypatch, slow: int
) -> None:
    """Both versions are registered; `latest-run` is the one that registered last; `champion` is
    the better of the two whichever order their writes land in."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking_uri(tmp_path)
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("race", artifact_location=(tmp_path / "art").as_uri())
    models = []
    mlflow.set_tracking_uri(uri)
    for _ in range(2):
        run = client.create_run(exp)
        with mlflow.start_run(run_id=run.info.run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=echo, pip_requirements=[])
        models.append((run.info.run_id, f"models:/{info.model_id}"))
    losses = [1.0, 2.0]  # trainer 0 is better
    slow_client = SlowChampionWrites(client, models[slow][0], delay=1.5)
    barrier, results, errors = threading.Barrier(2), {}, []

    def trainer(i: int) -> None:
        run_id, model_uri = models[i]
        try:
            barrier.wait()
            results[i] = registry.register(
                slow_client, NAME, model_uri, run_id, losses[i], 6, "dddd.dir"
            )
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=trainer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(v for v, _ in results.values()) == ["1", "2"]
    assert client.get_model_version_by_alias(NAME, "champion").run_id == models[0][0], results
    assert client.get_model_version_by_alias(NAME, "latest-run").version in (1, 2)


@pytest.mark.slow
def test_a_queued_grid_records_the_md5_of_the_tokens_each_run_trained_on(
    queued: Path, tmp_path: Path
) -> None:
    """`dvc exp run --queue` runs in temporary copies under .dvc/tmp/exps/ that are deleted
    afterwards: both runs (trained at once, `-j 2`) still record the DVC md5 of their tokens and
    a source that exists."""
    import mlflow

    from tests.dvcrepo import copy_repo

    repo = copy_repo(queued, tmp_path / "repo")
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
    (md5,) = [o["md5"] for o in lock["stages"]["tokenize"]["outs"] if o["path"] == "data/tokens"]
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e")
    runs = [
        r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("stage") == "train"
    ]
    grid = [r for r in runs if r.data.params.get("train.lr") in ("0.001", "0.004")]
    assert sorted(r.data.params["train.lr"] for r in grid) == ["0.001", "0.004"]
    for run in grid:
        assert run.info.status == "FINISHED"
        assert run.data.tags["data.dvc_md5"] == md5
        (ds,) = run.inputs.dataset_inputs
        assert json.loads(ds.dataset.profile)["dvc_md5"] == md5
        uri = json.loads(ds.dataset.source)["uri"]
        assert ".dvc/tmp" not in uri and uri.endswith(f"?dvc_md5={md5}")
        assert Path(uri.removeprefix("file://").split("?")[0]).is_dir()  # exists after the run
        mv = [v for v in client.search_model_versions(f"run_id = '{run.info.run_id}'")]
        assert [v.tags["data.dvc_md5"] for v in mv] == [md5]
    # Three versions on the same tokens (the baseline and the grid): champion is the best.
    versions = client.search_model_versions(f"name = '{NAME}'")
    best = min(versions, key=lambda v: float(v.tags["val_loss"]))
    assert client.get_model_version_by_alias(NAME, "champion").version == best.version
