"""benchmarks/gpu.sh, the one prepared GPU run (issue #19), on the CPU: its dry run takes the same
path as on a lent GPU (the train stage through `dvc exp run`, decode rows, the table written into
$OUT/RESULTS.md), and a run cut short still leaves the rows it measured."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dvcrepo import tool_env

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- gpu.sh: begin -->", "<!-- gpu.sh: end -->"


def gpu_sh(out: Path, *args: str, path: str | None = None, timeout: float = 600):
    env = tool_env(OUT=str(out), GEMMA3_COMMIT="test", GEMMA3_GPU_BENCH_DEVICE="cpu")
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def block(results: Path) -> str:
    text = results.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "one gpu.sh block, in place"
    return text.split(BEGIN, 1)[1].split(END, 1)[0]


def path_without_git(tmp_path: Path) -> str:
    """PATH with this venv and every other directory's commands except git (links to them)."""
    bindir = tmp_path / "bin-nogit"
    bindir.mkdir()
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not d or not Path(d).is_dir():
            continue
        for f in Path(d).iterdir():
            if f.name != "git" and not f.name.startswith("git-") and not (bindir / f.name).exists():
                (bindir / f.name).symlink_to(f)
    return f"{Path(sys.executable).parent}{os.pathsep}{bindir}"


@pytest.mark.slow
def test_dry_run_without_git_and_out_of_time_writes_the_table_to_out(tmp_path: Path) -> None:
    """No git binary (the lent machine may lack one): the stage's workspace is committed by
    dulwich and still runs through `dvc exp run`; a stage longer than its time gives its row from
    the steps it logged; the table lands in $OUT/RESULTS.md (the repo's RESULTS.md with its GPU
    block replaced), the repo's own file is left alone, and a section that would not fit the
    budget is skipped and says so."""
    pytest.importorskip("dvc")
    pytest.importorskip("dulwich")
    before = (REPO / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    nogit = path_without_git(tmp_path)
    assert shutil.which("git", path=nogit) is None
    out = tmp_path / "out"
    # 1000 steps do not fit the budget: the stage is stopped 10 s before it ends and its row
    # comes from the steps it logged; the eager step (5 s) still runs, the compiled one (2 min
    # on a CPU) is skipped.
    proc = gpu_sh(out, "--budget", "70", "--stage-steps", "1000", path=nogit)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "committed by dulwich" in log
    assert (REPO / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8") == before
    got = block(out / "RESULTS.md")
    outside = (out / "RESULTS.md").read_text(encoding="utf-8").replace(got, "")
    assert outside == before.replace(block(REPO / "benchmarks" / "RESULTS.md"), ""), (
        "only the block changes"
    )
    assert "**CPU dry run**, commit test" in got
    assert re.search(r"\| train stage, `dvc exp run -s train`, seed recipe \d+ of 1000 steps", got)
    assert "train stage: dvc exp run -s train stopped by the time limit after" in got
    assert "| same step, eager, micro-batch 4 x 4 |" in got
    assert "compiled step, the recipe's split: skipped (time budget)" in got
    assert (out / "gpu_bench.log").is_file() and (out / "train_stage.log").is_file()


@pytest.mark.slow
def test_hard_limit_writes_the_table_and_stops_the_stage(tmp_path: Path) -> None:
    """Past its hard limit the script writes what it has, kills the train stage (dvc and the
    trainer under it) and exits 3: the device call still brings a table back."""
    pytest.importorskip("dvc")
    out = tmp_path / "out"
    t = time.perf_counter()
    proc = gpu_sh(out, "--hard-limit", "15", "--stage-steps", "1000", timeout=300)
    took = time.perf_counter() - t
    log = proc.stdout + proc.stderr
    assert proc.returncode == 3, log[-3000:]
    assert took < 120, f"took {took:.0f}s after a 15 s hard limit"
    got = block(out / "RESULTS.md")
    assert "train stage: stopped (hard limit of 15s)" in got
    assert "| CPU dry run | tokens/s |" in got
    workspace = re.search(r"workspace (\S+)", log)
    assert workspace, log[-2000:]
    time.sleep(1)
    left = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if str(p.joinpath("cwd").resolve()).startswith(workspace.group(1)):
                    left.append(p.joinpath("cmdline").read_bytes().replace(b"\0", b" "))
            except OSError:
                continue
    assert not left, f"stage processes left running: {left}"


def test_decode_rows_keep_to_the_deadline() -> None:
    """Setups not started by the deadline are skipped (each reported as it comes), not run."""
    pytest.importorskip("transformers")
    from benchmarks.bench_gpu_decode import decode_rows

    seen = []
    rows = decode_rows(
        "cpu", None, new_tokens=3, batches=(1, 2), repeats=1, deadline=0.0, on_row=seen.append
    )
    assert seen == rows and len(rows) == 4
    assert all(r["skipped"] == "time budget" and r["tokens_per_s"] is None for r in rows)


def test_decode_rows_fall_back_to_eager_when_the_compiled_step_fails(monkeypatch) -> None:
    """Our compiled step raising (a CUDA-graph capture failing, say) costs one row: the eager
    static cache is measured in its place, at this batch and the next, and transformers still
    runs."""
    pytest.importorskip("transformers")
    import benchmarks.bench_gpu_decode as bd

    calls = []
    real = bd.generate

    def generate(model, prompts, n, *, compile, **kw):
        calls.append((len(prompts), compile))
        if compile:
            raise RuntimeError("capture failed")
        return real(model, prompts, n, compile=compile, **kw)

    monkeypatch.setattr(bd, "generate", generate)
    rows = bd.decode_rows("cpu", None, new_tokens=3, batches=(1, 2), repeats=1, compile=True)
    names = [r["setup"].split(", bf16")[0] for r in rows]
    assert names == [
        "ours, static cache + torch.compile",
        "ours, static cache, eager (compiled failed)",
        bd.THEIRS,
        "ours, static cache, eager",
        bd.THEIRS,
    ]
    assert rows[0]["error"] == "RuntimeError: capture failed" and rows[0]["tokens_per_s"] is None
    assert all(r["tokens_per_s"] > 0 for r in rows[1:])
    assert [c for c in calls if c[1]] == [(1, True)], "compiled once, never again after failing"
    assert rows[1]["vs_transformers"] == rows[1]["tokens_per_s"] / rows[2]["tokens_per_s"]


@pytest.mark.slow
def test_dvc_failing_before_training_falls_back_to_the_stage_command(tmp_path: Path) -> None:
    """A dvc that imports but cannot run (a carried wheel at odds with the image's packages)
    costs seconds, not the stage: `python -m stages.train` gives the row, and the note says why."""
    fake = tmp_path / "fake" / "dvc"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "0+broken"\n', encoding="utf-8")
    (fake / "__main__.py").write_text(
        "import sys\nsys.exit(\"ImportError: cannot import name 'glob' from 'fsspec'\")\n",
        encoding="utf-8",
    )
    env_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(fake.parent) + (os.pathsep + env_path if env_path else "")
    try:
        proc = gpu_sh(tmp_path / "out", "--budget", "60")
    finally:
        if env_path is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = env_path
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    got = block(tmp_path / "out" / "RESULTS.md")
    assert "dvc 0+broken" in got, "the broken dvc is the one that ran"
    assert re.search(r"\| train stage, `python -m stages.train`, seed recipe 8 steps", got)
    assert "train stage: `dvc exp run` failed before training (dvc exp run -s train exit 1: " in got
    assert "cannot import name 'glob' from 'fsspec'" in got


def test_a_stage_stopped_by_its_time_limit_keeps_the_steps_it_logged(monkeypatch) -> None:
    """The stage writes plots/train.csv and metrics/train.json at every logged step; when the
    time limit stops it, its row is made from those (steady rate = median after the first
    interval) and says it was stopped, rather than the stage giving no row at all."""
    import argparse
    import json

    import benchmarks.bench_gpu as bg

    def stopped_stage(args, root, budget, *, direct=False):
        (root / "plots").mkdir()
        (root / "metrics").mkdir()
        rows = [(2, 50.0), (4, 300.0), (6, 200.0)]  # the first interval holds compilation
        (root / "plots" / "train.csv").write_text(
            "step,train_loss,val_loss,lr,grad_norm,tokens_per_s,mfu\n"
            + "".join(f"{s},10.5,,0.001,1.0,{t},\n" for s, t in rows),
            encoding="utf-8",
        )
        m = {"steps": 6, "tokens": 6 * 512, "tokens_per_s": 200.0, "precision": "fp32"}
        m |= {"micro_batch": 4, "final_train_loss": 10.5}
        (root / "metrics" / "train.json").write_text(json.dumps({"train": m}), encoding="utf-8")
        return "dvc exp run -s train", 40.0, "dvc exp run -s train stopped by the time limit"

    monkeypatch.setattr(bg, "run_stage", stopped_stage)
    monkeypatch.setattr(bg, "ROWS", [])
    monkeypatch.setattr(bg, "NOTES", [])
    args = argparse.Namespace(dry_run=True, device="cpu", stage_steps=8)
    assert bg.stage_rows(args, budget=300) is None  # no checkpoint was written
    (row,) = bg.ROWS
    assert "seed recipe 6 of 8 steps" in row["what"]
    assert row["tokens/s"] == 250.0  # median of 300 and 200; the compiling interval left out
    assert row["ms/step"] == 1e3 * 512 / 250.0
    assert "stopped by the time limit" in row["notes"]
    assert any("stopped by the time limit" in n for n in bg.NOTES)
