"""DVC's view of training: metrics/train.json and plots/*.csv follow a running experiment (every
log step), a resumed run appends to them and a new one starts them fresh; metrics are
namespaced for `dvc exp show`; a params change is announced as a new run, not as a problem."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from gemma3.params import load_params
from gemma3.train import train
from tests.dvcrepo import sh
from tests.project import write_params, write_tokens
from tests.test_train import paths

LIVE = {"max_steps": 20, "log_interval": 5, "eval_interval": 10, "checkpoint_interval": 10}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _view(root: Path) -> dict:
    """What `dvc exp show` / `dvc plots show` would read now."""
    return {
        "metrics": json.loads((root / "metrics/train.json").read_text(encoding="utf-8")),
        "steps": [int(r["step"]) for r in _rows(root / "plots/train.csv")],
        "val": {int(r["step"]): float(r["val_loss"]) for r in _rows(root / "plots/val.csv")},
    }


class Watch:
    """A fault hook that reads the DVC files at given (0-based) steps, and can crash one."""

    def __init__(self, root: Path, at: tuple[int, ...], crash_at: int | None = None) -> None:
        self.root, self.at, self.crash_at, self.seen = root, at, crash_at, {}

    def __call__(self, step: int, loss):
        if step in self.at and step not in self.seen:
            self.seen[step] = _view(self.root)
        if step == self.crash_at:
            raise RuntimeError("simulated crash")
        return loss


def test_dvc_files_follow_the_run_resume_appends_and_a_new_run_starts_fresh(tmp_path) -> None:
    root = tmp_path
    write_params(root, train=LIVE)
    write_tokens(root)
    # Step index 5 starts after steps 1-5 (logged at 5); index 12 after the eval at 10; the
    # crash comes after step 15 was logged, with the last saved state at step 10.
    watch = Watch(root, at=(5, 12), crash_at=16)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(load_params(root / "params.yaml"), paths(root), progress=False, fault_hook=watch)
    first, second = watch.seen[5], watch.seen[12]
    assert first["steps"] == [5] and first["val"] == {}
    assert first["metrics"]["train"]["steps"] == 5
    assert first["metrics"]["train"]["best_val_loss"] is None  # nothing evaluated yet
    assert second["steps"] == [5, 10] and list(second["val"]) == [10]
    assert second["metrics"]["train"]["best_val_loss"] == pytest.approx(second["val"][10])
    assert _view(root)["steps"] == [5, 10, 15]  # the crashed run's last logged step is on disk

    # Resumed from the step-10 state: step 15 is logged again, once; nothing is lost or doubled.
    metrics = train(load_params(root / "params.yaml"), paths(root), progress=False)
    done = _view(root)
    assert done["steps"] == [5, 10, 15, 20] and list(done["val"]) == [10, 20]
    assert done["metrics"]["train"] == {k: v for k, v in metrics.items() if k != "mlflow_run_id"}
    assert set(done["metrics"]) == {"train"}  # no tracker: no run id anywhere
    assert done["metrics"]["train"]["best_val_loss"] == pytest.approx(min(done["val"].values()))

    # Other params: a new run, whose first log step replaces the previous run's rows.
    write_params(root, train={**LIVE, "lr": 1e-3})
    watch = Watch(root, at=(5,))
    train(load_params(root / "params.yaml"), paths(root), progress=False, fault_hook=watch)
    fresh = watch.seen[5]
    assert fresh["steps"] == [5] and fresh["val"] == {}
    assert fresh["metrics"]["train"]["steps"] == 5


def test_unreadable_state_is_a_warning_and_a_fresh_start(tmp_path, capfd) -> None:
    write_params(
        tmp_path, train={"max_steps": 2, "warmup_steps": 1, "eval_interval": 2, "log_interval": 1}
    )
    write_tokens(tmp_path)
    state = tmp_path / "checkpoints/state"
    state.mkdir(parents=True)
    (state / "state.json").write_text("{not json", encoding="utf-8")
    train(load_params(tmp_path / "params.yaml"), paths(tmp_path), progress=False)
    err = capfd.readouterr().err
    assert "warning: " in err and "state.json: unreadable or incomplete training state" in err


@pytest.mark.slow
def test_dvc_exp_run_with_new_params_reads_as_a_new_run_and_exp_show_is_namespaced(
    repo_copy: Path,
) -> None:
    repo = repo_copy
    proc = sh(["dvc", "exp", "run", "-n", "lr-new", "-S", "train.lr=0.002"], repo)
    out = proc.stdout + proc.stderr
    assert "new params: training from step 0 (checkpoints/state holds another params' run" in out
    assert "warning:" not in out and "different params" not in out, out[-3000:]

    shown = json.loads(sh(["dvc", "exp", "show", "--json"], repo).stdout)
    exps = [ex["data"] for rev in shown for e in rev.get("experiments") or [] for ex in e["revs"]]
    for data in [shown[0]["data"], *exps]:  # the workspace/baseline and the experiment
        files = data["metrics"]
        assert set(files["metrics/train.json"]["data"]) == {"train", "mlflow"}
        assert set(files["metrics/eval.json"]["data"]) == {"eval"}
        assert len(files["metrics/train.json"]["data"]["mlflow"]["run_id"]) == 32
    header = sh(["dvc", "exp", "show", "--csv"], repo).stdout.splitlines()[0].split(",")
    for column in ("train.best_val_loss", "train.steps", "eval.loss", "eval.perplexity"):
        assert column in header, header
    assert "eval.bits_per_byte" in header and "mlflow.run_id" in header
    run_id_columns = [c for c in header if "run_id" in c]
    assert run_id_columns == ["mlflow.run_id"], header  # the run id, once
    assert "loss" not in header and "perplexity" not in header  # nothing unprefixed
