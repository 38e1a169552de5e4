"""The real pipeline end to end: `dvc repro`, `dvc exp run -S`, `dvc exp show`, `dvc plots diff`,
and what MLflow recorded, read back through a real `mlflow server`'s REST API."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from tests.dvcrepo import MlflowServer, make_repo, metrics, read_json, sh, tags

pytestmark = pytest.mark.slow

STEPS, LOG, EVAL = 12, 3, 6  # tests/dvcrepo.TINY_PIPELINE


def _set_param(repo: Path, section: str, key: str, value: object) -> None:
    p = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    p[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False), encoding="utf-8")


def test_repro_experiments_and_mlflow(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    sh(["dvc", "repro"], repo)

    # ---- outputs of every stage ----
    raw = (repo / "data/raw/train.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(raw) == 300 and all(json.loads(line)["text"] for line in raw)
    meta = read_json(repo / "data/tokens/meta.json")
    assert (repo / "data/tokens/train.bin").stat().st_size == 2 * meta["train"]["tokens"]
    assert (repo / "checkpoints/best/model.safetensors").is_file()
    train = read_json(repo / "metrics/train.json")
    assert train["steps"] == STEPS and train["best_val_loss"] < math.log(50257)
    ev = read_json(repo / "metrics/eval.json")
    assert ev["loss"] < math.log(50257) and ev["perplexity"] == pytest.approx(
        math.exp(ev["loss"]), rel=1e-3
    )
    with open(repo / "plots/train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(LOG, STEPS + 1, LOG))
    assert [r["step"] for r in rows if r["val_loss"]] == [str(s) for s in (EVAL, STEPS)]
    assert "Once upon a time" in (repo / "samples/samples.md").read_text(encoding="utf-8")
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
    assert set(lock["stages"]) == {"download", "tokenize", "train", "evaluate", "sample"}
    status = sh(["dvc", "status", "--json"], repo)
    assert json.loads(status.stdout) == {}
    baseline_run = train["mlflow_run_id"]
    assert baseline_run and ev["mlflow_run_id"] == baseline_run

    # ---- changing an eval param re-runs evaluate only, logging into the same MLflow run ----
    _set_param(repo, "eval", "batch_size", 4)
    out = sh(["dvc", "repro"], repo).stdout
    assert "Running stage 'evaluate'" in out
    assert "Running stage 'train'" not in out and "Running stage 'sample'" not in out
    ev2 = read_json(repo / "metrics/eval.json")
    assert ev2["mlflow_run_id"] == baseline_run
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "baseline run"], repo)

    # ---- two experiments with different lr ----
    for name, lr in (("lr-high", 0.004), ("lr-low", 0.0005)):
        sh(["dvc", "exp", "run", "-n", name, "-S", f"train.lr={lr}"], repo)
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], repo).stdout)
    exps = {}
    for rev in shown:
        for e in rev.get("experiments") or []:
            for ex in e["revs"]:
                exps[ex["name"]] = ex["data"]
    assert {"lr-high", "lr-low"} <= set(exps)
    exp_runs = {}
    for name, lr in (("lr-high", 0.004), ("lr-low", 0.0005)):
        d = exps[name]
        assert d["params"]["params.yaml"]["data"]["train"]["lr"] == lr
        m = d["metrics"]
        assert m["metrics/eval.json"]["data"]["loss"] < math.log(50257)
        exp_runs[name] = m["metrics/train.json"]["data"]["mlflow_run_id"]
    assert len({baseline_run, *exp_runs.values()}) == 3

    plots = json.loads(sh(["dvc", "plots", "diff", "lr-high", "lr-low", "--json"], repo).stdout)
    loss = plots["data"]["loss"][0]
    assert set(loss["revisions"]) == {"lr-high", "lr-low"}
    points = loss["content"]["data"]["values"]
    assert {p["rev"] for p in points} == {"lr-high", "lr-low"}
    assert {p["field"] for p in points} == {"train_loss", "val_loss"}
    for rev in ("lr-high", "lr-low"):  # every logged step of both runs is on the chart
        steps = sorted(
            int(p["step"]) for p in points if p["rev"] == rev and p["field"] == "train_loss"
        )
        assert steps == list(range(LOG, STEPS + 1, LOG))

    # ---- what MLflow recorded, through a real server ----
    server = MlflowServer(f"sqlite:///{repo / 'mlflow.db'}", tmp_path)
    try:
        runs = {r["info"]["run_id"]: r for r in server.runs("e2e")}
        assert set(runs) == {baseline_run, *exp_runs.values()}  # evaluate re-run made no new run

        base = runs[baseline_run]
        eval_hist = server.history(baseline_run, "eval/loss")
        assert len(eval_hist) == 2  # the first evaluate and the re-run after eval.batch_size
        eval_hist.sort(key=lambda h: h["timestamp"])
        assert [h["value"] for h in eval_hist] == pytest.approx([ev["loss"], ev2["loss"]], abs=1e-4)
        assert tags(base)["preset"] == "gemma3-tiny"

        for name, run_id in exp_runs.items():
            run = runs[run_id]
            t = tags(run)
            assert run["info"]["run_name"] == name and t["dvc.exp_name"] == name
            assert t["mlflow.source.git.commit"] and t["dvc.baseline_rev"]
            params = {p["key"]: p["value"] for p in run["data"]["params"]}
            assert float(params["train.lr"]) == (0.004 if name == "lr-high" else 0.0005)
            for key, n in (
                ("train/loss", 4),
                ("lr", 4),
                ("grad_norm", 4),
                ("tokens_per_s", 4),
                ("val/loss", 2),
            ):
                hist = server.history(run_id, key)
                assert sorted(h["step"] for h in hist) == (
                    [EVAL, STEPS] if key == "val/loss" else list(range(LOG, STEPS + 1, LOG))
                ), key
                assert len(hist) == n
            m = metrics(run)
            assert {"eval/loss", "eval/perplexity", "eval/bits_per_byte", "best_val_loss"} <= set(m)
            assert run["info"]["status"] == "FINISHED"
            assert "checkpoint/best" in server.artifacts(run_id, "checkpoint")
            ckpt_files = server.artifacts(run_id, "checkpoint/best")
            assert "checkpoint/best/model.safetensors" in ckpt_files
            assert "checkpoint/best/config.json" in ckpt_files
            assert "samples/samples.md" in server.artifacts(run_id, "samples")
    finally:
        server.close()
