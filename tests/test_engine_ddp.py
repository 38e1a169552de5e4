"""Two real processes in a gloo group, each in its OWN workspace directory (two machines without a
shared disk): the logged loss is the mean over ranks, a stop is agreed by both, and a resume works
when only rank 0's disk holds the state."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.project import REPO, env, write_params, write_tokens
from tests.test_bad_input import stderr_lines

# The stage's own `main`, with a fault hook that Ctrl-Cs one rank at a given step: the signal is
# delivered to that process only, at a known step, without a sleep.
DRIVER = """
import os, signal
from pathlib import Path
from gemma3.errors import run_main
from gemma3.params import load_params
from gemma3.train import TrainPaths, train

STOP_AT, STOP_RANK = int(os.environ.get("STOP_AT", "-1")), os.environ.get("STOP_RANK", "0")

def hook(step, loss):
    if step == STOP_AT and os.environ.get("RANK", "0") == STOP_RANK:
        os.kill(os.getpid(), signal.SIGINT)
    return loss

def main():
    d = Path(".")
    paths = TrainPaths(d / "data/tokens", d / "checkpoints/best", d / "checkpoints/state",
                       d / "metrics/train.json", d / "plots/train.csv")
    train(load_params(), paths, progress=False, fault_hook=hook)

run_main(main, prog="train")
"""

TRAIN = {
    "max_steps": 8,
    "warmup_steps": 2,
    "eval_interval": 4,
    "log_interval": 1,
    "checkpoint_interval": 4,
}


def workspace(root: Path, **train) -> Path:
    root.mkdir(parents=True)
    write_params(root, train={**TRAIN, **train})
    write_tokens(root)
    (root / "driver.py").write_text(DRIVER, encoding="utf-8")
    return root


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(dirs: list[Path], **extra: str) -> list[subprocess.CompletedProcess[str]]:
    """One process per directory, rank = position; returns when all have exited."""
    port, procs = str(_port()), []
    for rank, d in enumerate(dirs):
        e = env() | extra
        e |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(dirs))}
        e |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(
            subprocess.Popen(
                [sys.executable, "driver.py"], cwd=d, env=e, stderr=subprocess.PIPE, text=True
            )
        )
    done = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=180)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, "", err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
    return done


def losses(root: Path) -> list[float]:
    rows = (root / "plots/train.csv").read_text().splitlines()[1:]
    return [float(r.split(",")[1]) for r in rows]


def weights(root: Path) -> dict[str, torch.Tensor]:
    sd = load_file(str(root / "checkpoints/state/state.safetensors"))
    return {k: v for k, v in sd.items() if k.startswith("model.")}


@pytest.mark.slow
def test_logged_loss_is_the_mean_over_ranks(tmp_path: Path) -> None:
    # One process with accumulation 2 sees exactly the micro-batches two ranks see: its logged
    # loss (the mean of both) is the truth for the DDP run's logged loss.
    (single,) = [workspace(tmp_path / "single", grad_accum=2)]
    assert all(p.returncode == 0 for p in launch([single]))
    ranks = [workspace(tmp_path / f"rank{r}") for r in range(2)]
    for p in launch(ranks):
        assert p.returncode == 0, p.stderr[-3000:]
    assert losses(ranks[0]) == pytest.approx(losses(single), abs=2e-4)
    assert not (ranks[1] / "checkpoints").exists()  # only rank 0 writes


@pytest.mark.slow
def test_resume_with_state_only_on_rank0_disk_after_a_stop_on_rank1(tmp_path: Path) -> None:
    clean = [workspace(tmp_path / f"clean{r}") for r in range(2)]
    for p in launch(clean):
        assert p.returncode == 0, p.stderr[-3000:]

    ranks = [workspace(tmp_path / f"rank{r}") for r in range(2)]
    # Ctrl-C reaches rank 1 only, during step 3: both ranks stop after that same step.
    stopped = launch(ranks, STOP_AT="2", STOP_RANK="1")
    assert [p.returncode for p in stopped] == [130, 130], stopped[0].stderr[-3000:]
    assert "stopped at step 3" in stopped[0].stderr
    assert json.loads((ranks[0] / "checkpoints/state/state.json").read_text())["step"] == 3
    assert not (ranks[1] / "checkpoints").exists()  # rank 1's disk has no state to read

    resumed = launch(ranks)
    assert [p.returncode for p in resumed] == [0, 0], resumed[1].stderr[-3000:]
    assert "resuming from checkpoints/state at step 3" in resumed[0].stderr
    a, b = weights(clean[0]), weights(ranks[0])
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert losses(ranks[0]) == pytest.approx(losses(clean[0]), abs=2e-4)


def test_sigint_at_a_known_step_saves_that_step_and_exits_130(tmp_path: Path) -> None:
    root = workspace(tmp_path / "one", max_steps=100_000, checkpoint_interval=100_000)
    (p,) = launch([root], STOP_AT="4")
    assert p.returncode == 130 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        "train: interrupted: stopped at step 5; training state saved to checkpoints/state, "
        "re-run to resume"
    )
    assert json.loads((root / "checkpoints/state/state.json").read_text())["step"] == 5


def _worker_pid(port: str, rank: int, deadline: float) -> int:
    """The pid of torchrun's worker `rank` (found by its environment: no pid file exists)."""
    want = {f"RANK={rank}".encode(), f"MASTER_PORT={port}".encode()}
    while time.time() < deadline:
        for d in filter(str.isdigit, os.listdir("/proc")):
            try:
                environ = set(Path(f"/proc/{d}/environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if want <= environ:
                return int(d)
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank} on port {port}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker in /proc")
def test_torchrun_rank_killed_leaves_one_line_on_the_survivor(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node=2 -m stages.train`, rank 1 killed with -9 mid-run: rank 0's
    next collective fails (gloo: "Connection closed by peer"). It used to print a 30-line
    traceback; it prints one line naming the dead rank and the step, and exits 1."""
    root = workspace(tmp_path / "ws", max_steps=100_000, eval_interval=100_000)
    (root / "driver.py").unlink()
    port, logs = str(_port()), tmp_path / "logs"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=2", "--master_port", port, "--log-dir", str(logs),
           "--redirects", "3", "-m", "stages.train"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=root, env=env() | {"PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        state = root / "checkpoints/state/state.json"
        deadline = time.time() + 180
        while not state.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # the first state is saved at step 4: both ranks are in the loop
        os.kill(_worker_pid(port, 1, deadline), signal.SIGKILL)
        # Bounded, not timed: a survivor left waiting on the dead peer would sit out gloo's
        # 30-minute collective timeout; a loaded CI box may take a minute or two to tear down.
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    (rank0_log,) = logs.glob("*/attempt_0/0/stderr.log")
    err = rank0_log.read_text(encoding="utf-8")
    assert "Traceback" not in err, err
    lines = stderr_lines(err)
    assert len(lines) == 1, err
    assert re.fullmatch(
        r"train: error: rank 1 of 2 is gone \(it died or was killed\) during step \d+; rank 0 "
        r"stopped too: re-run to resume from the last training state saved in checkpoints/state",
        lines[0],
    ), lines[0]
