"""Writes interrupted at a chosen point, deterministically, through the stage entry points.

A hook (`FAULT`, run before `gemma3` is imported) makes the process SIGKILL itself at one point
of one write: half-way through the tensor file, at the fsync, or at either rename that puts a new
version in place. The previous version must then be what the next reader sees, byte for byte,
and the next run must carry on from it. A full disk (ENOSPC) at a write names the file.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from gemma3.config import Config
from gemma3.data.raw import write_source_info, write_split
from tests.project import write_params
from tests.test_bad_input import (
    CKPT,
    CKPT_CFG,
    GEN,
    STATE,
    assert_clean_error,
    build_workspace,
    run,
    snapshot,
    stderr_lines,
)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("template"))


@pytest.fixture
def ws(template: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(template, root)
    return root


# FAULT_TARGET: the name of the file or directory whose write is interrupted; FAULT_AT: which of
# its writes (1 = the first); FAULT_POINT: where. The hook counts writes by the temp file or
# directory each one creates (`.<name>.XXXX.tmp`).
FAULT = """
import errno, os, pathlib, signal, tempfile
import safetensors.torch

target, point, at = os.environ["FAULT_TARGET"], os.environ["FAULT_POINT"], int(os.environ["FAULT_AT"])
seen = []
_mkstemp, _mkdtemp, _replace = tempfile.mkstemp, tempfile.mkdtemp, os.replace
_fsync, _save, _write_bytes = os.fsync, safetensors.torch.save_file, pathlib.Path.write_bytes

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def count(fn):
    def wrapped(*a, **kw):
        out = fn(*a, **kw)
        path = out[1] if isinstance(out, tuple) else out
        name = pathlib.Path(path).name  # .<target>.XXXXXXXX.tmp, not .<target>.json.XXXX.tmp
        if name.startswith(f".{target}.") and "." not in name[len(target) + 2 : -len(".tmp")]:
            seen.append(os.path.abspath(path))
        return out
    return wrapped

tempfile.mkstemp, tempfile.mkdtemp = count(_mkstemp), count(_mkdtemp)

def in_write(path):  # a file inside the armed temp dir, or the armed temp file itself
    p = pathlib.Path(os.path.abspath(path))
    return len(seen) == at and seen[-1] in (str(p), str(p.parent))

def save_file(tensors, filename, metadata=None):
    if point == "tensors" and in_write(filename):
        data = safetensors.torch.save(tensors, metadata=metadata)
        pathlib.Path(filename).write_bytes(data[: len(data) // 2])
        die()
    return _save(tensors, filename, metadata=metadata)

def write_bytes(self, data):
    if point == "write" and in_write(self):
        _write_bytes(self, data[: len(data) // 2])
        die()
    if point == "enospc" and in_write(self):
        _write_bytes(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # write() names no file
    return _write_bytes(self, data)

def fsync(fd):
    if point == "fsync" and in_write(os.readlink(f"/proc/self/fd/{fd}")):
        die()
    return _fsync(fd)

def replace(src, dst):
    name = pathlib.Path(dst).name
    if point == "rename-new-in" and name == target and in_write(src):
        die()
    out = _replace(src, dst)
    if point == "rename-old-away" and name == f".{target}.old" and len(seen) == at:
        die()
    return out

safetensors.torch.save_file, pathlib.Path.write_bytes = save_file, write_bytes
os.fsync, os.replace = fsync, replace
"""

SHORT = {
    "max_steps": 6,
    "warmup_steps": 1,
    "eval_interval": 2,
    "eval_batches": 1,
    "log_interval": 1,
    "checkpoint_interval": 2,
}


def run_with_fault(root: Path, stage: str, target: str, point: str, at: int):
    code = FAULT + f"import runpy; runpy.run_module('stages.{stage}', run_name='__main__')"
    env = {"FAULT_TARGET": target, "FAULT_POINT": point, "FAULT_AT": str(at)}
    return run(root, "python", "-c", code, extra_env=env)


STATE_POINTS = ["tensors", "fsync", "rename-old-away", "rename-new-in"]


@pytest.mark.parametrize("point", STATE_POINTS)
def test_kill_during_the_state_write_keeps_the_previous_state_and_resumes(
    ws: Path, point: str
) -> None:
    """Killed in its second state write (step 4), the run resumes from the first one (step 2)."""
    write_params(ws, train=SHORT)
    killed = run_with_fault(ws, "train", "state", point, at=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = ws / STATE
    # What the next reader finds: the step-2 state, whole (the reader puts a swapped-out
    # directory back first, as the train stage does).
    resumed = run(ws, "train")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {STATE} at step 2/6" in resumed.stderr, resumed.stderr
    assert json.loads((state / "state.json").read_text())["step"] == 6
    assert len(load_file(str(state / "state.safetensors"))) > 0
    assert json.loads((ws / "metrics/train.json").read_text())["train"]["steps"] == 6
    leftovers = sorted(p.name for p in (ws / "checkpoints").iterdir())
    assert leftovers == ["best", "state"], leftovers


BEST_POINTS = ["tensors", "rename-old-away", "rename-new-in"]


@pytest.mark.parametrize("point", BEST_POINTS)
def test_kill_during_the_best_checkpoint_write_keeps_the_previous_one(ws: Path, point: str) -> None:
    """Killed in its second best-checkpoint write (step 4), step 2's checkpoint is what the
    evaluate stage reads."""
    write_params(ws, train=SHORT)
    killed = run_with_fault(ws, "train", "best", point, at=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ev = run(ws, "evaluate")
    assert ev.returncode == 0, ev.stderr
    assert json.loads((ws / "metrics/eval.json").read_text())["eval"]["checkpoint_step"] == 2
    assert json.loads((ws / CKPT / "gemma3.json").read_text())["step"] == 2


@pytest.mark.parametrize("point", ["write", "fsync", "rename-new-in"])
def test_kill_during_a_single_file_write_keeps_the_previous_file(ws: Path, point: str) -> None:
    before = snapshot(ws)
    killed = run_with_fault(ws, "evaluate", "eval.json", point, at=1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    after = snapshot(ws)
    assert after["metrics/eval.json"] == before["metrics/eval.json"]
    # The only other trace is the killed writer's temp file, never under the final name.
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert all(Path(k).name.startswith(".eval.json.") for k in changed), changed
    if point == "write":  # the leftover temp file does not stop the next run (once is enough)
        assert run(ws, "evaluate").returncode == 0


def test_full_disk_at_a_single_file_write_names_the_file(ws: Path) -> None:
    before = snapshot(ws)
    full = run_with_fault(ws, "evaluate", "eval.json", "enospc", at=1)
    needles = ("OSError: [Errno 28] No space left on device: 'metrics/eval.json'",)
    assert_clean_error(full, "evaluate", needles, root=ws, before=before, code=1)


def test_checkpoint_larger_than_free_memory_is_one_line_naming_its_size(ws: Path) -> None:
    """A consistent checkpoint too big for this machine: refused before allocating, naming the
    size (the machine's free memory is faked to 1 MB; the model needs ~7 MB in float32)."""
    before = snapshot(ws)
    code = (
        "import gemma3.hf, runpy; gemma3.hf._available_memory = lambda: 1_000_000; "
        "runpy.run_module('gemma3.cli', run_name='__main__')"
    )
    proc = run(ws, "python", "-c", code, *GEN)
    n = Config.param_counts(CKPT_CFG)["total"]
    needles = (f"checkpoints/best/config.json: the model it describes has {n:,} parameters",
               "more than the 0.0 GB of memory available")  # fmt: skip
    assert_clean_error(proc, "gemma3", needles, root=ws, before=before)


@pytest.fixture
def small_disk(ws: Path) -> Iterator[Path]:
    """`ws/data` on a 200 KB tmpfs holding only data/raw (~90 KB of stories): tokenizing fills it.
    Skipped where mounting is not permitted (not root, or in a container without the right)."""
    data = ws / "data"
    shutil.rmtree(data)
    data.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(data)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        story = "Tom had a red ball and a little dog named Max. They played in the park. "
        stories = [f"Story {i}. {story * 3}" for i in range(300)]
        write_split(data / "raw", "train", stories[:280])
        write_split(data / "raw", "validation", stories[280:])
        write_source_info(data / "raw", {"source": "test"})
        yield ws
    finally:
        subprocess.run(["umount", str(data)], check=True)


def test_full_disk_during_tokenize_exits_1_naming_the_file(small_disk: Path) -> None:
    """README: 1 for disk/OS errors. The message names where the write failed and says the
    previous output is unchanged; nothing is left behind on the full disk."""
    before = snapshot(small_disk)
    proc = run(small_disk, "tokenize")
    needles = ("data/.tokens.", "cannot write (No space left on device)", "previous output")
    assert_clean_error(proc, "tokenize", needles, root=small_disk, before=before, code=1)


# A batch too big for the GPU, as the trainer meets it: torch's OutOfMemoryError out of a training
# pass (step OOM_AT + 1) or out of the validation model's forward (its OOM_AT-th call), since no
# CPU test can fill a GPU.
OOM = """
import os, runpy, torch
import gemma3.train as engine

at, _train_step, _wrap_model = int(os.environ["OOM_AT"]), engine.train_step, engine.wrap_model

def oom():
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.07 GiB.")

def train_step(run, step, *args, **kwargs):
    if os.environ["OOM_IN"] == "training" and step == at:
        oom()
    return _train_step(run, step, *args, **kwargs)

class EvalForward(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, *args):
        self.calls += 1
        if os.environ["OOM_IN"] == "validation" and self.calls == at:
            oom()
        return self.inner(*args)

def wrap_model(run):
    _wrap_model(run)
    run.eval_forward = EvalForward(run.eval_forward)

engine.train_step, engine.wrap_model = train_step, wrap_model
runpy.run_module("stages.train", run_name="__main__")
"""


# Where the OOM strikes -> (the batch setting, OOM_AT, what the line must say).
OOM_CASES = {
    "training": ("micro_batch", 3, ("in step 4 at train.micro_batch 4 x", "= 8, e.g. 2")),
    "validation": ("eval_batch_size", 2, ("validating after step 4 at train.eval_batch_size 4 x", "smaller value, e.g. 2")),
}  # fmt: skip


@pytest.mark.parametrize("where", list(OOM_CASES))
def test_out_of_memory_is_one_line_naming_a_split_that_resumes(ws: Path, where: str) -> None:
    """README: exit 1, one line naming the batch that failed (train.micro_batch, or
    train.eval_batch_size in validation) and a value to try, for training a smaller divisor of
    the rows per optimizer step; the state saved at step 2 stays, and a re-run with that value
    resumes. (Validation runs one pass at each even step: its 2nd is the one after step 4.)"""
    knob, at, needles = OOM_CASES[where]
    train = {**SHORT, "batch_size": 4, "grad_accum": 2, "eval_batch_size": 4}
    write_params(ws, train=train)
    proc = run(ws, "python", "-c", OOM, extra_env={"OOM_AT": str(at), "OOM_IN": where})
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in stderr_lines(proc.stderr) if ": error: " in ln]
    assert len(errors) == 1, proc.stderr
    for needle in ("out of CPU memory", *needles, "resumes from step 2"):
        assert needle in errors[0], errors[0]
    assert json.loads((ws / STATE / "state.json").read_text())["step"] == 2
    write_params(ws, train={**train, knob: 2})
    resumed = run(ws, "train")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {STATE} at step 2/6" in resumed.stderr, resumed.stderr
    assert json.loads((ws / "metrics/train.json").read_text())["train"]["steps"] == 6


@pytest.mark.parametrize("where", ["training", "validation"])
def test_out_of_memory_at_one_row_per_pass_names_what_else_to_shrink(ws: Path, where: str) -> None:
    """At a batch of one row there is no smaller split to suggest: the line says so and names
    the model, the block size and the device instead (never 'e.g. 1' again)."""
    write_params(ws, train={**SHORT, "batch_size": 2, "micro_batch": 1, "eval_batch_size": 1})
    proc = run(ws, "python", "-c", OOM, extra_env={"OOM_AT": "1", "OOM_IN": where})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [ln for ln in stderr_lines(proc.stderr) if ": error: " in ln]
    knob = "train.micro_batch 1" if where == "training" else "train.eval_batch_size 1"
    for needle in (f"even one row of block_size 32 per pass ({knob}) does not fit", "smaller model", "shorter train.block_size"):  # fmt: skip
        assert needle in line, line
    assert "e.g." not in line, line
