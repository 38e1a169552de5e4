"""MLflow tracking: queued experiments keep their artifacts; a dead server never stops training."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from gemma3.tracking import flatten, tracking_uri
from tests.dvcrepo import MlflowServer, free_port, make_repo, read_json, sh
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


@pytest.mark.slow
def test_queued_experiments_keep_artifacts_after_temp_copies_are_gone(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    for name, lr in (("q-a", 0.002), ("q-b", 0.001)):
        sh(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}"], repo)
    sh(["dvc", "exp", "run", "--run-all"], repo)
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], repo).stdout)
    run_ids = {}
    for rev in shown:
        for e in rev.get("experiments") or []:
            for ex in e["revs"]:
                data = ex["data"]["metrics"]["metrics/train.json"]["data"]
                run_ids[ex["name"]] = data["mlflow_run_id"]
    assert set(run_ids) == {"q-a", "q-b"}
    # The temporary copies the queue ran in are gone...
    exps_tmp = repo / ".dvc" / "tmp" / "exps"
    leftovers = [p for p in exps_tmp.rglob("params.yaml")] if exps_tmp.exists() else []
    assert leftovers == []
    # ...but the runs and their artifacts live on under the repo root.
    server = MlflowServer(f"sqlite:///{repo / 'mlflow.db'}", tmp_path)
    try:
        runs = {r["info"]["run_name"]: r for r in server.runs("e2e")}
        assert set(runs) == {"q-a", "q-b"}
        for name, run_id in run_ids.items():
            assert runs[name]["info"]["run_id"] == run_id
            assert runs[name]["info"]["artifact_uri"].startswith((repo / "mlartifacts").as_uri())
            assert "checkpoint/best/model.safetensors" in server.artifacts(
                run_id, "checkpoint/best"
            )
            assert "samples/samples.md" in server.artifacts(run_id, "samples")
            assert len(server.history(run_id, "train/loss")) == 4
    finally:
        server.close()
    assert list((repo / "mlartifacts").rglob("model.safetensors"))


def test_dead_tracking_server_warns_once_and_training_completes(tmp_path: Path) -> None:
    write_params(tmp_path, tracking={"enabled": True, "experiment": "down"})
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
    assert m["steps"] == TINY_TRAIN["max_steps"] and m["best_val_loss"] is not None
    assert m["mlflow_run_id"] is None
    with open(tmp_path / "plots/train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(
        range(TINY_TRAIN["log_interval"], TINY_TRAIN["max_steps"] + 1, TINY_TRAIN["log_interval"])
    )
    assert read_json(tmp_path / "metrics/eval.json")["loss"] > 0
