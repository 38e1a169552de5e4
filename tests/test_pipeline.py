"""The real pipeline end to end, on the session's trained baseline (tests/conftest.py): `dvc repro`
outputs, `dvc exp run --queue`, `dvc exp show --only-changed`, `dvc plots`, and what MLflow recorded,
read back through the store and a real `mlflow server`'s REST API."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import QUEUED, Trained
from tests.dvcrepo import (
    PROMPT,
    MlflowServer,
    copy_repo,
    greedy_cli,
    metrics,
    read_json,
    sh,
    tags,
    tool_env,
)

pytestmark = pytest.mark.slow

STEPS, LOG, EVAL = 12, 3, 6  # tests/dvcrepo.TINY_PIPELINE


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _set_param(repo: Path, section: str, key: str, value: object) -> None:
    p = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    p[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False), encoding="utf-8")


def test_baseline_outputs_and_mlflow_run(trained: Trained, repo_copy: Path) -> None:
    repo = repo_copy  # dvc commands take the repo's lock: never run them in the shared baseline
    raw = (repo / "data/raw/train.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(raw) == 300 and all(json.loads(line)["text"] for line in raw)
    meta = read_json(repo / "data/tokens/meta.json")
    assert (repo / "data/tokens/train.bin").stat().st_size == 2 * meta["train"]["tokens"]
    assert json.loads(sh(["dvc", "status", "--json"], repo).stdout) == {}
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
    assert set(lock["stages"]) == {"download", "tokenize", "train", "evaluate", "sample"}

    # Plots: every logged step in train.csv, validation points exactly at the eval steps.
    rows = _csv(repo / "plots/train.csv")
    assert [int(r["step"]) for r in rows] == list(range(LOG, STEPS + 1, LOG))
    val = _csv(repo / "plots/val.csv")
    assert [int(r["step"]) for r in val] == [EVAL, STEPS]
    by_step = {r["step"]: r["val_loss"] for r in rows if r["val_loss"]}
    assert {r["step"]: r["val_loss"] for r in val} == by_step

    train_doc = read_json(repo / "metrics/train.json")
    train = train_doc["train"]
    assert train["steps"] == STEPS
    assert train["best_val_loss"] == pytest.approx(min(float(r["val_loss"]) for r in val))
    ev = read_json(repo / "metrics/eval.json")["eval"]
    assert ev["perplexity"] == pytest.approx(math.exp(ev["loss"]), rel=1e-3)

    # The sample stage's story is what the CLI generates greedily from the same checkpoint.
    samples = read_json(repo / "samples/samples.json")["samples"]
    assert [s["prompt"] for s in samples] == [PROMPT]
    story = PROMPT + samples[0]["completion"]
    assert greedy_cli(repo, 12) == story
    assert f"**{PROMPT}**{samples[0]['completion']}" in (repo / "samples/samples.md").read_text()

    # MLflow: one run, named after the commit it trained at, with the same tags as an experiment.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == train_doc["mlflow"]["run_id"]
    assert run.info.run_name == f"repro@{trained.run_commit[:7]}"
    assert run.info.status == "FINISHED"
    t = run.data.tags
    assert t["mlflow.source.git.commit"] == trained.run_commit
    assert t["dvc.baseline_rev"] == trained.run_commit
    assert t["preset"] == "gemma3-tiny" and t["stage"] == "train"
    # Train and val loss share the `loss/` chart section, at the steps in the plots files.
    hist = {k: client.get_metric_history(run.info.run_id, k) for k in ("loss/train", "loss/val")}
    assert [(m.step, m.value) for m in hist["loss/train"]] == [
        (int(r["step"]), pytest.approx(float(r["train_loss"]))) for r in rows
    ]
    assert [(m.step, m.value) for m in hist["loss/val"]] == [
        (int(r["step"]), pytest.approx(float(r["val_loss"]))) for r in val
    ]
    assert run.data.metrics["eval/loss"] == pytest.approx(ev["loss"], abs=1e-4)
    # Dataset lineage: the tokens DVC produced, by their dvc.lock md5, with their counts.
    (ds,) = run.inputs.dataset_inputs
    tokens_md5 = next(o["md5"] for o in lock["stages"]["tokenize"]["outs"])
    profile = json.loads(ds.dataset.profile)
    assert ds.dataset.digest == tokens_md5[:36] and profile["dvc_md5"] == tokens_md5
    assert profile["train_tokens"] == meta["train"]["tokens"]
    assert profile["validation_tokens"] == meta["validation"]["tokens"]
    assert profile["source"] == "synthetic"
    assert {t.key: t.value for t in ds.tags} == {"mlflow.data.context": "training"}

    # The model registry: version 1 of gemma3-tinystories is this run's best checkpoint.
    (mv,) = client.search_model_versions("name='gemma3-tinystories'")
    assert mv.run_id == run.info.run_id and str(mv.version) == "1"
    ckpt = read_json(repo / "checkpoints/best/gemma3.json")
    assert float(mv.tags["val_loss"]) == pytest.approx(train["best_val_loss"], abs=1e-4)
    assert int(mv.tags["step"]) == ckpt["step"] == train["best_step"]
    assert mv.tags["git.commit"] == trained.run_commit
    assert mv.tags["dvc.experiment"] == "workspace (dvc repro)"
    assert t["registered_model"] == "gemma3-tinystories/1"


def test_eval_param_change_reruns_evaluate_only_into_the_same_run(repo_copy: Path) -> None:
    repo = repo_copy
    before = read_json(repo / "metrics/eval.json")["eval"]
    run_id = read_json(repo / "metrics/train.json")["mlflow"]["run_id"]
    _set_param(repo, "eval", "batch_size", 4)
    out = sh(["dvc", "repro"], repo).stdout
    assert "Running stage 'evaluate'" in out
    assert "Running stage 'train'" not in out and "Running stage 'sample'" not in out
    after = read_json(repo / "metrics/eval.json")["eval"]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    hist = sorted(client.get_metric_history(run_id, "eval/loss"), key=lambda m: m.timestamp)
    assert [m.value for m in hist] == pytest.approx([before["loss"], after["loss"]], abs=1e-4)


def test_queued_experiments_plots_and_leaderboard(queued: Path, tmp_path: Path) -> None:
    repo = copy_repo(queued, tmp_path / "repo")  # two queued experiments against the baseline
    head = sh(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    lrs = QUEUED

    shown = json.loads(sh(["dvc", "exp", "show", "--json"], repo).stdout)
    exps = {ex["name"]: ex["data"] for rev in shown for e in rev.get("experiments") or [] for ex in e["revs"]}  # fmt: skip
    assert set(exps) == set(lrs)
    run_ids = {}
    for name, lr in lrs.items():
        assert exps[name]["params"]["params.yaml"]["data"]["train"]["lr"] == lr
        run_ids[name] = exps[name]["metrics"]["metrics/train.json"]["data"]["mlflow"]["run_id"]
    # The temporary copies the queue ran in are gone.
    exps_tmp = repo / ".dvc" / "tmp" / "exps"
    assert not exps_tmp.exists() or not list(exps_tmp.rglob("params.yaml"))

    # --only-changed: the one param that differs, not the dozens that do not.
    changed = sh(["dvc", "exp", "show", "--only-changed", "--csv"], repo).stdout.splitlines()
    header = changed[0].split(",")
    assert "train.lr" in header and "train.max_steps" not in header and "seed" not in header

    # Plots across experiments: validation points at the eval steps only, four charts, no junk.
    plots = json.loads(sh(["dvc", "plots", "diff", "HEAD", "lr-high", "--json"], repo).stdout)
    assert set(plots["data"]) == {"loss", "lr", "grad_norm", "throughput"}
    loss = plots["data"]["loss"][0]["content"]
    points = loss["data"]["values"]
    assert {p["rev"] for p in points} == {"HEAD", "lr-high"}
    for rev in ("HEAD", "lr-high"):
        series = {}
        for p in points:
            if p["rev"] == rev:
                series.setdefault(p["filename::field"], []).append(int(p["step"]))
        assert series == {
            "train.csv::train_loss": list(range(LOG, STEPS + 1, LOG)),
            "val.csv::val_loss": [EVAL, STEPS],
        }
    assert all(float(p["dvc_inferred_y_value"]) > 0 for p in points)
    assert loss["encoding"]["x"]["title"] == "optimizer step"
    assert loss["layer"][0]["encoding"]["y"]["title"] == "cross-entropy loss (nats/token)"

    # MLflow through a real server: the queued runs, their artifacts under this repo's root.
    server = MlflowServer(f"sqlite:///{repo / 'mlflow.db'}", tmp_path)
    try:
        runs = {r["info"]["run_name"]: r for r in server.runs("e2e")}
        assert set(lrs) <= set(runs)
        for name, run_id in run_ids.items():
            run = runs[name]
            assert run["info"]["run_id"] == run_id and run["info"]["status"] == "FINISHED"
            assert run["info"]["artifact_uri"].startswith((repo / "mlartifacts").as_uri())
            t = tags(run)
            assert t["dvc.exp_name"] == name
            assert t["mlflow.source.git.commit"] == head and t["dvc.baseline_rev"] == head
            assert server.artifacts(run_id, "checkpoint") == []  # the weights: in the Model only
            assert "samples/samples.md" in server.artifacts(run_id, "samples")
            assert [h["step"] for h in server.history(run_id, "loss/val")] == [EVAL, STEPS]
        # `gemma3 runs`: the same leaderboard from the local store and from the server.
        evals = {n: metrics(r).get("eval/loss") for n, r in runs.items()}
        order = sorted(evals, key=lambda n: evals[n])
        for env in (tool_env(), tool_env(MLFLOW_TRACKING_URI=server.url)):
            proc = subprocess.run(
                [sys.executable, "-m", "gemma3.cli", "runs"],
                cwd=repo, env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            lines = proc.stdout.splitlines()
            assert lines[1].startswith("champion: models:/gemma3-tinystories@champion = version")
            assert lines[2].split()[:2] == ["run", "train.lr"], lines  # the one param that differs
            rows = [line.split() for line in lines[3:-1]]
            assert [r[0] for r in rows] == order
            for r in rows:
                assert f"{evals[r[0]]:.4f}" in r
            eid = server.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name="e2e")
            view = (
                f"/#/experiments/{eid['experiment']['experiment_id']}?workflowType=machine_learning"
            )
            assert lines[-1].endswith(view), lines[-1]
    finally:
        server.close()
