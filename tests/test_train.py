"""Training engine: schedule, resume after SIGKILL, params-change safety, NaN guard, DDP, recipe."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gemma3.errors import Gemma3Error
from gemma3.params import ParamsLoader, load_params
from gemma3.recipes import apply, dvc_set_args, load_recipe
from gemma3.train import (
    TrainPaths,
    global_micro_index,
    lr_at,
    param_groups,
    train,
)
from tests.project import REPO, env, run_stage, stage_cmd, write_params, write_tokens


def make_project(root: Path, **sections) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_params(root, **sections)
    write_tokens(root)
    return root


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    sd = load_file(str(root / "checkpoints" / "state" / "state.safetensors"))
    return {k: v for k, v in sd.items() if k.startswith("model.")}


def paths(root: Path) -> TrainPaths:
    return TrainPaths(
        data_dir=root / "data" / "tokens",
        best_dir=root / "checkpoints" / "best",
        state_dir=root / "checkpoints" / "state",
        metrics=root / "metrics" / "train.json",
        plots=root / "plots" / "train.csv",
    )


# ---- pure functions against hand-computed values --------------------------------------------


def test_lr_schedule_hand_computed() -> None:
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kw) == pytest.approx(1e-4)  # 1/10 of lr
    assert lr_at(9, **kw) == pytest.approx(1e-3)  # end of warmup
    assert lr_at(10, **kw) == pytest.approx(1e-3)  # cosine starts at lr
    assert lr_at(60, **kw) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # halfway: cos(pi/2) = 0
    assert lr_at(110, **kw) == pytest.approx(1e-4)  # end: min_lr


def test_seed_schedule_rises_when_min_lr_exceeds_lr() -> None:
    kw = dict(lr=1e-4, min_lr=5e-4, warmup_steps=31, max_steps=1875)
    values = [lr_at(s, **kw) for s in range(31, 1875, 100)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert lr_at(1874, **kw) == pytest.approx(5e-4, rel=1e-3)


def test_global_micro_index_matches_single_process_accumulation() -> None:
    # 2 ranks x accumulation 2 draw the same micro-batches as 1 process x accumulation 4.
    for step in range(3):
        ddp = sorted(global_micro_index(step, m, 2, 2, r) for m in range(2) for r in range(2))
        single = sorted(global_micro_index(step, m, 4, 1, 0) for m in range(4))
        assert ddp == single


def test_no_weight_decay_on_norms() -> None:
    from gemma3.config import Config
    from gemma3.model import Gemma3ForCausalLM, RMSNorm

    model = Gemma3ForCausalLM(Config.from_name("gemma3-tiny"))
    decay, no_decay = param_groups(model, 0.1)
    norm_ids = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    assert {id(p) for p in no_decay["params"]} == norm_ids
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    total = sum(p.numel() for p in decay["params"]) + sum(p.numel() for p in no_decay["params"])
    assert total == model.num_parameters()


# ---- the stage, for real ---------------------------------------------------------------------


def test_train_stage_learns_and_writes_outputs(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    run_stage(root, "train")
    metrics = json.loads((root / "metrics" / "train.json").read_text())["train"]
    assert metrics["best_val_loss"] < math.log(512) - 1.0  # well below uniform
    rows = (root / "plots" / "train.csv").read_text().splitlines()
    assert rows[0] == "step,train_loss,val_loss,lr,grad_norm,tokens_per_s,mfu"
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(5, 41, 5))
    assert (root / "checkpoints" / "best" / "model.safetensors").is_file()
    meta = json.loads((root / "checkpoints" / "best" / "gemma3.json").read_text())
    assert meta["val_loss"] == pytest.approx(metrics["best_val_loss"], abs=1e-4)


def test_min_lr_above_lr_warns_in_one_line(tmp_path: Path) -> None:
    root = make_project(tmp_path, train={"max_steps": 4, "min_lr": 0.1, "lr": 1e-3})
    proc = run_stage(root, "train")
    lines = [ln for ln in proc.stderr.splitlines() if "min_lr" in ln]
    assert len(lines) == 1 and "RISES" in lines[0]


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path: Path) -> None:
    sections = {"train": {"max_steps": 120, "checkpoint_interval": 10}}
    clean = make_project(tmp_path / "clean", **sections)
    run_stage(clean, "train")

    crashed = make_project(tmp_path / "crashed", **sections)
    proc = subprocess.Popen(
        stage_cmd("train"), cwd=crashed, env=env(), stderr=subprocess.PIPE, text=True
    )
    state = crashed / "checkpoints" / "state" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert killed_at < 120, "the run finished before it could be killed; make it longer"
    # Whatever is on disk under a final name is complete.
    load_file(str(crashed / "checkpoints" / "state" / "state.safetensors"))

    again = run_stage(crashed, "train")
    assert f"resuming from checkpoints/state at step {killed_at}" in again.stderr
    a, b = final_weights(clean), final_weights(crashed)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert not list((crashed / "checkpoints").glob(".*.tmp"))

    # The plot history is continuous across the crash (all columns but the timing ones).
    def curve(root: Path) -> list[list[str]]:
        return [r.split(",")[:5] for r in (root / "plots" / "train.csv").read_text().splitlines()]

    assert curve(clean) == curve(crashed)


def test_params_change_after_crash_starts_fresh(tmp_path: Path) -> None:
    root = make_project(tmp_path / "a", train={"max_steps": 20})
    run_stage(root, "train")  # leaves a valid state at step 20, made with these params
    new = {"max_steps": 40, "lr": 1e-3}  # step 20 < 40 would be resumable if params matched
    write_params(root, train=new)
    proc = run_stage(root, "train")
    assert "new params: training from step 0" in proc.stderr and "warning" not in proc.stderr
    # The result equals a clean run with the new params: nothing was mixed in.
    fresh = make_project(tmp_path / "b", train=new)
    run_stage(fresh, "train")
    a, b = final_weights(root), final_weights(fresh)
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


def test_non_finite_loss_stops_with_step_and_keeps_best(tmp_path: Path) -> None:
    root = make_project(tmp_path, train={"max_steps": 30})
    p = load_params(root / "params.yaml")
    best = root / "checkpoints" / "best" / "model.safetensors"
    seen: dict[str, str] = {}

    def inject(step: int, loss: torch.Tensor) -> torch.Tensor:
        if step == 14:  # the best checkpoint was written at step 10
            seen["hash"] = hashlib.sha256(best.read_bytes()).hexdigest()
            return loss * float("nan")
        return loss

    with pytest.raises(Gemma3Error, match=r"non-finite loss at step 15") as e:
        train(p, paths(root), progress=False, fault_hook=inject)
    assert "\n" not in str(e.value)
    assert hashlib.sha256(best.read_bytes()).hexdigest() == seen["hash"]


@pytest.mark.slow
def test_ddp_two_processes_match_single_process_accumulation(tmp_path: Path) -> None:
    # lr * g / (|g| + eps) with eps >> |g| makes one AdamW step proportional to the gradient, so
    # comparing weights after one step compares the gradients.
    one_step = {
        "max_steps": 1,
        "warmup_steps": 0,
        "lr": 1.0e3,
        "eps": 1.0e3,
        "weight_decay": 0.0,
        "grad_clip": 0.0,
        "eval_interval": 1,
        "log_interval": 1,
        "checkpoint_interval": 1,
    }
    single = make_project(tmp_path / "single", train={**one_step, "grad_accum": 2})
    run_stage(single, "train")
    ddp = make_project(tmp_path / "ddp", train={**one_step, "grad_accum": 1})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "stages.train",
    ]
    proc = subprocess.run(cmd, cwd=ddp, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    from gemma3.model import Gemma3ForCausalLM

    p = load_params(single / "params.yaml")
    torch.manual_seed(p.seed)
    w0 = {f"model.{k}": v for k, v in Gemma3ForCausalLM(p.model_config()).state_dict().items()}
    a, b = final_weights(single), final_weights(ddp)
    delta = max((a[k] - w0[k]).abs().max().item() for k in a)
    assert delta > 1e-3  # the step really moved the weights
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5

    # The DDP run with more steps learns, and only rank 0 wrote files.
    more = make_project(tmp_path / "more", train={"max_steps": 30, "grad_accum": 1})
    proc = subprocess.run(cmd, cwd=more, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r.split(",") for r in (more / "plots" / "train.csv").read_text().splitlines()[1:]]
    assert float(rows[-1][1]) < float(rows[0][1]) - 1.0
    written = sorted(str(f.relative_to(more)) for f in more.rglob("*") if f.is_file())
    assert written == sorted(
        [
            "params.yaml",
            "data/tokens/train.bin",
            "data/tokens/validation.bin",
            "data/tokens/meta.json",
            "metrics/train.json",
            "plots/train.csv",
            "plots/val.csv",
            "checkpoints/state/state.json",
            "checkpoints/state/state.safetensors",
        ]
        + [f"checkpoints/best/{n}" for n in os.listdir(more / "checkpoints" / "best")]
    )


def test_seed_recipe_expands_to_the_seed_values(tmp_path: Path) -> None:
    from dvc.utils.hydra import apply_overrides

    recipe = load_recipe("seed-270m")
    # Apply the -S arguments exactly as `dvc exp run` does, to a copy of our params.yaml.
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    apply_overrides(str(tmp_path / "params.yaml"), dvc_set_args(recipe)[1::2])
    p = load_params(tmp_path / "params.yaml")
    ours = apply(yaml.safe_load((REPO / "params.yaml").read_text()), recipe)
    written = yaml.load((tmp_path / "params.yaml").read_text(), Loader=ParamsLoader)  # noqa: S506
    assert written == ours
    t = p.train
    # REFERENCE.md section 1, converted from the seed's micro-batch "iterations".
    assert p.model.preset == "gemma3-270m" and p.model.overrides == {}
    assert p.data.source == "roneneldan/TinyStories"
    assert (t.batch_size, t.block_size, t.grad_accum) == (32, 128, 32)
    assert t.max_steps * t.grad_accum == 60_000
    assert t.max_steps * t.grad_accum * t.batch_size * t.block_size == 245_760_000
    assert (t.lr, t.min_lr, t.weight_decay, t.grad_clip) == (1e-4, 5e-4, 0.1, 0.5)
    assert (t.beta1, t.beta2, t.eps) == (0.9, 0.95, 1e-9)
    assert t.warmup_steps == 1000 // 32
    assert t.warmup_start_factor == pytest.approx(1 / 3)  # LinearLR(start_factor=1/3)
    assert t.eval_interval == round(500 / 32)
    assert t.eval_batches == 500
    assert t.precision == "bf16-autocast"
    cfg = p.model_config()
    assert cfg.param_counts()["total"] == 164_654_976
    # The -S arguments are what dvc exp run receives.
    args = dvc_set_args(recipe)
    assert args[0::2] == ["-S"] * len(recipe)
    assert "train.lr=0.0001" in args and "model.preset=gemma3-270m" in args


def test_recipe_cli_prints_words_a_shell_substitution_passes_verbatim() -> None:
    import shlex
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "gemma3.cli", "recipe", "seed-270m"],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout  # fmt: skip
    # `$(gemma3 recipe ...)` splits on whitespace only; no quote may reach dvc.
    assert out.split() == dvc_set_args(load_recipe("seed-270m"))
    cmd = subprocess.run(
        [sys.executable, "-m", "gemma3.cli", "recipe", "seed-270m", "--command"],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout  # fmt: skip
    assert shlex.split(cmd)[5:] == out.split() and shlex.split(cmd)[:5] == [
        "dvc", "exp", "run", "-n", "seed-270m",
    ]  # fmt: skip
