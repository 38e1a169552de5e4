"""What a user writes reaches the engine as meant: switches, impossible configs, a busy workspace,
a machine without the memory asked for, and a previous run's files kept until replaced."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gemma3.config import Config
from gemma3.fileio import exclusive_lock
from gemma3.params import load_params
from tests.project import env, run_stage, stage_cmd, write_params
from tests.test_train import make_project

BOOL_SWITCHES = [
    "train.tf32",
    "train.resume",
    "tokenize.eot",
    "sample.stop_at_eot",
    "tracking.enabled",
]
AUTO_SWITCHES = ["train.compile", "train.fused_adamw"]


def _get(p, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(p, section), key)


@pytest.mark.parametrize("switch", BOOL_SWITCHES + AUTO_SWITCHES)
@pytest.mark.parametrize(
    ("written", "meant"), [(True, True), (False, False), ("true", True), ("False", False)]
)
def test_switches_take_booleans_and_strings_in_params_yaml(
    tmp_path, switch, written, meant
) -> None:
    section, key = switch.split(".")
    write_params(tmp_path, **{section: {key: written}})
    assert _get(load_params(tmp_path / "params.yaml"), switch) is meant


DVC_SET_CASES = [
    (switch, value)
    for switch in AUTO_SWITCHES + ["train.tf32"]
    for value in ["true", "false", "True", "'true'"] + (["auto"] if switch in AUTO_SWITCHES else [])
]


@pytest.mark.parametrize(("switch", "value"), DVC_SET_CASES)
def test_switches_take_what_dvc_exp_run_set_writes(tmp_path, switch, value) -> None:
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` calls

    write_params(tmp_path)
    apply_overrides(str(tmp_path / "params.yaml"), [f"{switch}={value}"])
    expected = {"true": True, "false": False, "auto": "auto"}[value.strip("'").lower()]
    assert _get(load_params(tmp_path / "params.yaml"), switch) == expected


def test_a_switch_given_a_word_it_does_not_know_names_the_choices(tmp_path) -> None:
    write_params(tmp_path, train={"compile": "maybe"})
    proc = run_stage(tmp_path, "train", check=False)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith("train.compile: must be one of auto, true, false, got 'maybe'")
    )


# ---- #12 item 1: qk_norm: false is rejected in one line ------------------------------------


def test_qk_norm_false_is_one_line_error_before_training(tmp_path) -> None:
    root = make_project(tmp_path, model={"overrides": {"qk_norm": False}})
    proc = run_stage(root, "train", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.overrides.qk_norm: must be true" in proc.stderr.strip().splitlines()[-1]
    assert not (root / "checkpoints" / "best").exists()


# ---- #12 item 7: the vocabulary limit belongs to the uint16 token files --------------------


def test_model_vocab_above_uint16_trains_on_uint16_tokens(tmp_path) -> None:
    cfg = Config.from_name("gemma3-tiny", vocab_size=262_144)  # Gemma's own vocabulary
    assert cfg.vocab_size == 262_144
    root = make_project(
        tmp_path, model={"overrides": {"vocab_size": 70_000}}, train={"max_steps": 4}
    )
    run_stage(root, "train")
    cfg_json = json.loads((root / "checkpoints/best/config.json").read_text())
    assert cfg_json["vocab_size"] == 70_000


# ---- #11 (c): out of memory at build, a meta device ----------------------------------------


def test_model_too_big_for_memory_is_one_line_naming_the_size(tmp_path) -> None:
    root = make_project(tmp_path, model={"overrides": {"emb_dim": 1_000_000_000}})
    proc = run_stage(root, "train", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    # 512 x 1e9 embedding + per-layer matrices: the message names the count and GiB asked for.
    n = Config.from_name("gemma3-tiny", vocab_size=512, emb_dim=1_000_000_000).param_counts()
    assert f"{n['total']:,} parameters need" in last and "GiB" in last


@pytest.mark.parametrize("where", ["params", "cli"])
def test_meta_device_is_one_line(tmp_path, where) -> None:
    if where == "params":
        root = make_project(tmp_path, train={"device": "meta"})
        proc = run_stage(root, "train", check=False)
    else:
        cmd = [sys.executable, "-m", "gemma3.cli", "generate", "x", "--device", "meta"]
        cmd += ["--model", str(tmp_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    if where == "params":
        assert last.endswith("train.device: must be one of auto, cpu, cuda, mps, got 'meta'")
    else:
        assert "--device: unknown device 'meta'; use auto, cpu, cuda, cuda:N or mps" in last


# ---- #11 (a): a fresh run keeps the previous run's files until it writes its own -----------


def _digest(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def test_fresh_run_that_fails_early_keeps_previous_best_and_state(tmp_path) -> None:
    root = make_project(tmp_path, train={"max_steps": 10})
    run_stage(root, "train")
    best, state = _digest(root / "checkpoints/best"), _digest(root / "checkpoints/state")
    write_params(root, train={"max_steps": 10, "lr": 1e4, "warmup_steps": 0})  # diverges at once
    proc = run_stage(root, "train", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "non-finite" in last, proc.stderr[-2000:]
    assert "checkpoints/best is the previous run's, left as it was" in last
    assert _digest(root / "checkpoints/best") == best
    assert _digest(root / "checkpoints/state") == state


# ---- #11 (b): one writer per workspace; no orphan trainer ----------------------------------


def test_second_trainer_in_the_same_workspace_fails_in_one_line(tmp_path) -> None:
    root = make_project(tmp_path)
    with exclusive_lock(root / "checkpoints", "held by the test"):  # what a running trainer holds
        proc = run_stage(root, "train", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "another trainer is writing here" in proc.stderr.strip().splitlines()[-1]
    assert not (root / "checkpoints/best").exists()
    run_stage(root, "train")  # the lock went with its holder


def test_trainer_exits_when_its_parent_is_killed(tmp_path) -> None:
    root = make_project(tmp_path, train={"max_steps": 100_000, "checkpoint_interval": 100_000})
    parent = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen({stage_cmd('train')!r}, stderr=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", parent], cwd=root, env=env(), stdout=subprocess.PIPE, text=True
    )
    child = int(proc.stdout.readline())
    # The trainer asks for the signal first thing; the lock directory appears after that.
    deadline = time.time() + 120
    while not (root / "checkpoints").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()  # kill -9 of the parent (dvc in real life)
    proc.wait()
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        # A zombie is reaped by init once the parent is gone; /proc tells us it is dead.
        stat = Path(f"/proc/{child}/stat")
        if stat.exists() and stat.read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the trainer outlived its parent")


@pytest.mark.slow
def test_fresh_run_failing_under_dvc_repro_keeps_previous_checkpoints(tmp_path) -> None:
    from tests.dvcrepo import make_repo, sh

    repo = make_repo(tmp_path / "repo", {"tracking": {"enabled": False}})
    sh(["dvc", "repro", "train"], repo)
    best, state = _digest(repo / "checkpoints/best"), _digest(repo / "checkpoints/state")
    p = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    p["train"] |= {"lr": 1e4, "warmup_steps": 0}  # a params change: a fresh run that diverges
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False), encoding="utf-8")
    proc = sh(["dvc", "repro", "train"], repo, check=False)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("train: error:")]
    assert len(errors) == 1 and "is the previous run's, left as it was" in errors[0], proc.stderr
    assert _digest(repo / "checkpoints/best") == best
    assert _digest(repo / "checkpoints/state") == state
