"""MLflow tracking: a dead or hung server never stops training and costs one short timeout; runs
of killed trainers are closed; resumed runs never log a step twice; a locked store or a full
artifact store mid-run still ends the run FINISHED with no partial model; the pipeline's champion
predicts the same greedy story as `gemma3 generate` (serving: tests/test_serving.py)."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gemma3.tracking import flatten, start_run, tracking_uri
from tests.conftest import Trained
from tests.dvcrepo import PROMPT, free_port, greedy_cli, read_json
from tests.project import TINY_TRAIN, env, stage_cmd, write_params, write_tokens


def test_flatten_and_default_store(monkeypatch, tmp_path: Path) -> None:
    assert flatten({"train": {"lr": 0.001, "betas": [0.9, 0.95]}, "seed": 1, "o": {}}) == {
        "train.lr": "0.001",
        "train.betas": "[0.9, 0.95]",
        "seed": "1",
        "o": "{}",
    }
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team-server:5000")
    assert tracking_uri() == "http://team-server:5000"


def test_dead_tracking_server_warns_once_and_training_completes(tmp_path: Path) -> None:
    write_params(
        tmp_path, tracking={"enabled": True, "experiment": "down"}, train={"max_steps": 10}
    )
    write_tokens(tmp_path)
    e = env()
    e["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for stage in ("train", "evaluate"):
        proc = subprocess.run(
            stage_cmd(stage), cwd=tmp_path, env=e, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        warnings = [line for line in proc.stderr.splitlines() if "tracking: warning" in line]
        assert len(warnings) == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    m = read_json(tmp_path / "metrics/train.json")
    assert m["train"]["steps"] == 10 and m["train"]["best_val_loss"] is not None
    assert "mlflow" not in m  # no run: no run id
    with open(tmp_path / "plots/train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(
        range(TINY_TRAIN["log_interval"], 10 + 1, TINY_TRAIN["log_interval"])
    )
    assert read_json(tmp_path / "metrics/eval.json")["eval"]["loss"] > 0


class HungServer:
    """Accepts TCP connections and never answers: a tracking server that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.connections:
            c.close()


def test_hung_tracking_server_costs_one_short_timeout_per_stage(tmp_path: Path) -> None:
    write_params(
        tmp_path, tracking={"enabled": True, "experiment": "hung"}, train={"max_steps": 10}
    )
    write_tokens(tmp_path)
    server = HungServer()
    try:
        e = env()
        e.pop("MLFLOW_HTTP_REQUEST_TIMEOUT", None)
        e.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        e["MLFLOW_TRACKING_URI"] = server.url
        for stage in ("train", "evaluate"):
            before = len(server.connections)
            proc = subprocess.run(
                stage_cmd(stage), cwd=tmp_path, env=e, capture_output=True, text=True, timeout=600
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            warnings = [line for line in proc.stderr.splitlines() if "tracking: warning" in line]
            assert len(warnings) == 1, proc.stderr[-3000:]
            # One request, given up after the short read timeout, never retried.
            assert "did not answer within 5 s" in warnings[0], warnings[0]
            assert len(server.connections) - before == 1
    finally:
        server.close()
    assert "mlflow" not in read_json(tmp_path / "metrics/train.json")


def test_tracking_disabled_writes_no_store_and_no_run(tmp_path: Path) -> None:
    write_params(tmp_path, tracking={"enabled": False}, train={"max_steps": 10})
    write_tokens(tmp_path)
    e = env()
    e.pop("MLFLOW_TRACKING_URI", None)
    for stage in ("train", "evaluate"):
        proc = subprocess.run(
            stage_cmd(stage), cwd=tmp_path, env=e, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "tracking" not in proc.stderr and "mlflow" not in proc.stderr.lower()
    assert "mlflow" not in read_json(tmp_path / "metrics/train.json")
    assert set(read_json(tmp_path / "metrics/eval.json")) == {"eval"}
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_runs_of_dead_trainers_are_marked_killed_live_ones_are_not(
    tmp_path: Path, monkeypatch
) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(tmp_path)
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("k", artifact_location=(tmp_path / "art").as_uri())
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        owners = {
            "dead": {"gemma3.host": host, "gemma3.pid": str(_dead_pid())},
            "live": {"gemma3.host": host, "gemma3.pid": str(live.pid)},  # a queued twin
            "other-host": {"gemma3.host": host + "-elsewhere", "gemma3.pid": str(_dead_pid())},
            "untagged": {},
        }
        ids = {n: client.create_run(exp, run_name=n, tags=t).info.run_id for n, t in owners.items()}
        tracker = start_run(
            enabled=True, experiment="k", root=tmp_path, tags={"stage": "train"}, run_name="new"
        )
        status = {n: client.get_run(i).info.status for n, i in ids.items()}
        assert status == {
            "dead": "KILLED",
            "live": "RUNNING",
            "other-host": "RUNNING",
            "untagged": "RUNNING",
        }
        new = client.get_run(tracker.run_id)
        assert new.data.tags["gemma3.pid"] == str(os.getpid())
        tracker.finish()
    finally:
        live.kill()
        live.wait()


def test_a_resumed_run_never_logs_a_step_twice(tmp_path: Path, monkeypatch) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = start_run(enabled=True, experiment="r", root=tmp_path, tags={"stage": "train"})
    for step in (3, 6, 9):  # killed after step 9; its last saved state was step 6
        first.log_metrics({"loss/train": 10.0 - step, "loss/val": None}, step=step)
    first._finished = True  # as after kill -9: nothing ends the run
    again = start_run(
        enabled=True, experiment="r", root=tmp_path, run_id=first.run_id, tags={"stage": "train"}
    )
    assert again.run_id == first.run_id
    for step in (9, 12):  # resumed from step 6: step 9 comes again
        again.log_metrics({"loss/train": 1.0, "loss/val": 2.0}, step=step)
    again.finish()
    client = mlflow.MlflowClient(tracking_uri(tmp_path))
    hist = client.get_metric_history(first.run_id, "loss/train")
    assert sorted((m.step, m.value) for m in hist) == [(3, 7.0), (6, 4.0), (9, 1.0), (12, 1.0)]
    assert [m.step for m in client.get_metric_history(first.run_id, "loss/val")] == [12]
    assert client.get_run(first.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_the_pipelines_champion_predicts_the_cli_greedy_story(trained: Trained) -> None:
    """Through `dvc repro` (the shared baseline): the one run is the champion and latest-run,
    and `models:/gemma3-tinystories@champion` generates what `gemma3 generate` prints."""
    import mlflow

    expected = greedy_cli(trained.repo, 20)  # --dtype auto: the served model's rule too
    uri = f"sqlite:///{trained.repo / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    champion = client.get_model_version_by_alias("gemma3-tinystories", "champion")
    assert champion.run_id == read_json(trained.repo / "metrics/train.json")["mlflow"]["run_id"]
    assert client.get_model_version_by_alias("gemma3-tinystories", "latest-run").version == 1
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/gemma3-tinystories@champion")
    assert model.predict([PROMPT], params={"max_new_tokens": 20}) == [expected]


def test_model_logging_or_registry_failures_warn_once_and_the_run_succeeds(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import mlflow
    import torch

    from gemma3.config import Config
    from gemma3.hf import save_checkpoint
    from gemma3.model import Gemma3ForCausalLM

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    good, broken = tmp_path / "good" / "best", tmp_path / "broken" / "best"
    for d in (good, broken):
        save_checkpoint(Gemma3ForCausalLM(Config.from_name("gemma3-tiny")), d, meta={"step": 1})
    (broken / "model.safetensors").unlink()  # no weights: nothing to log

    client = mlflow.MlflowClient(tracking_uri(tmp_path))
    cases = {
        # A name the registry refuses stands in for a server without a model registry.
        "registry": (good, "team/gemma3", "could not register the model as 'team/gemma3'"),
        "model": (broken, "gemma3-tinystories", "could not log the checkpoint as an MLflow Model"),
    }
    for name, (ckpt, registered, warning) in cases.items():
        capsys.readouterr()
        tracker = start_run(
            enabled=True, experiment=name, root=tmp_path, tags={"stage": "train"},
            registered_model=registered,
        )  # fmt: skip
        tracker.log_best(ckpt, 1.5, 1)
        tracker.log_metrics({"loss/val": 1.5}, step=1)  # tracking goes on after the warning
        tracker.finish()
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "tracking: warning" in line]
        assert len(lines) == 1 and warning in lines[0], err
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["best_val_loss"] == 1.5
        assert run.data.metrics["loss/val"] == 1.5
        assert tracker.model_version is None
        models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
        # The good checkpoint is logged (not registered); the broken one left no model behind.
        assert [m.source_run_id for m in models] == (
            [run.info.run_id] if name == "registry" else []
        )
    assert client.search_registered_models() == []


# The train stage with a tracking failure injected mid-run: `mlflow.db` held by `BEGIN EXCLUSIVE`
# from another SQLite connection from the log at step LOCK_AT until the one at step RELEASE_AT.
LOCKED_DB = """
import os, runpy, sqlite3, sys
import gemma3.tracking as t

held, _log = [], t.Tracker.log_metrics

def log_metrics(self, metrics, step):
    if step == {lock_at} and not held:
        con = sqlite3.connect("mlflow.db", timeout=0, isolation_level=None)
        con.execute("BEGIN EXCLUSIVE")
        held.append(con)
    _log(self, metrics, step)
    if step == {release_at} and held:
        held.pop().execute("ROLLBACK")

t.Tracker.log_metrics = log_metrics
sys.argv = ["stages.train"]
runpy.run_module("stages.train", run_name="__main__")
"""

# ... or an artifact store that fills up while the model is uploaded: the weights are copied half
# way, then the disk is full.
FULL_ARTIFACT_STORE = """
import errno, os, pathlib, runpy, sys
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

_log_artifacts = LocalArtifactRepository.log_artifacts

def log_artifacts(self, local_dir, artifact_path=None):
    _log_artifacts(self, local_dir, artifact_path)
    for f in pathlib.Path(self.artifact_dir).rglob("model.safetensors"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

LocalArtifactRepository.log_artifacts = log_artifacts
sys.argv = ["stages.train"]
runpy.run_module("stages.train", run_name="__main__")
"""


def _train_with(
    tmp_path: Path, hook: str, system_metrics: bool = True
) -> subprocess.CompletedProcess[str]:
    tracking = {"enabled": True, "experiment": "faults", "system_metrics": system_metrics}
    write_params(tmp_path, tracking=tracking)
    write_tokens(tmp_path)
    e = env()
    e.pop("MLFLOW_TRACKING_URI", None)
    e["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    return subprocess.run(
        [sys.executable, "-c", hook], cwd=tmp_path, env=e, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def _only_run(tmp_path: Path):
    import mlflow

    # Not tracking_uri(): mlflow.set_tracking_uri in an earlier test of this worker sets
    # MLFLOW_TRACKING_URI in os.environ.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("faults")
    (run,) = client.search_runs([exp.experiment_id])
    return client, run


def test_a_locked_store_mid_run_still_ends_the_run_finished_with_its_model(tmp_path: Path) -> None:
    proc = _train_with(tmp_path, LOCKED_DB.format(lock_at=10, release_at=30))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "tracking: warning" in line]
    assert len(warnings) == 1 and "database is locked" in warnings[0], proc.stderr[-3000:]
    assert warnings[0].startswith("tracking: warning: MLflow log_metrics failed"), warnings
    client, run = _only_run(tmp_path)
    assert run.info.status == "FINISHED"
    # Tried once more at the end, with the store back: the model is logged and registered.
    assert client.get_model_version_by_alias("gemma3-tinystories", "champion").run_id == (
        run.info.run_id
    )
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/train")]
    assert steps == [5]  # the steps logged while the store was locked are in plots/train.csv
    # The stage's last lines name the run, where it opens, and the registered version.
    last = proc.stdout.strip().splitlines()[-2:]
    assert last[0].startswith(f"mlflow: run {run.info.run_id} (FINISHED) http://127.0.0.1:5000/")
    assert f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in last[0]
    assert last[1].startswith("mlflow: registered models:/gemma3-tinystories/1 (alias latest-run)")
    assert "champion: gemma3-tinystories version 1" in last[1]
    assert "alembic" not in proc.stderr and "INFO" not in proc.stderr  # quiet libraries
    # System metrics are on by default (params.yaml tracking.system_metrics: true).
    assert "system/cpu_utilization_percentage" in run.data.metrics


def test_a_full_artifact_store_leaves_no_partial_model_and_the_run_finished(
    tmp_path: Path,
) -> None:
    proc = _train_with(tmp_path, FULL_ARTIFACT_STORE, system_metrics=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "tracking: warning" in line]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert "could not log the checkpoint as an MLflow Model" in warnings[0]
    client, run = _only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["best_val_loss"] > 0
    assert client.search_logged_models(experiment_ids=[run.info.experiment_id]) == []
    assert list((tmp_path / "mlartifacts").rglob("model.safetensors")) == []
    assert client.search_registered_models() == []
    assert not [k for k in run.data.metrics if k.startswith("system/")]  # switched off


# Training itself fails (a full disk while validating at step 20).
FAILING_TRAINING = """
import errno, os, runpy, sys
import gemma3.train as t

_validate, calls = t.validate, []

def validate(run):
    calls.append(1)
    if len(calls) == 2:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "checkpoints")
    return _validate(run)

t.validate = validate
sys.argv = ["stages.train"]
runpy.run_module("stages.train", run_name="__main__")
"""


def test_a_failed_training_ends_its_run_failed(tmp_path: Path) -> None:
    proc = _train_with(tmp_path, FAILING_TRAINING, system_metrics=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    _, run = _only_run(tmp_path)
    assert run.info.status == "FAILED"
