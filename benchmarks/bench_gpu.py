"""GPU benchmark: the 270M train stage through `dvc exp run`, the step's split and compile rows,
decode rows, peak memory; one table, and the GPU section of benchmarks/RESULTS.md.

Made for a lent GPU machine without network (see benchmarks/gpu.sh), within a time budget:
sections run in order of what they tell, each in its own guard (a failure prints one line and the
next section runs), and a section that would not fit in the time left is skipped, so the table
always prints. The table is written after every section (and every decode row) into
benchmarks/RESULTS.md and $OUT/RESULTS.md, so a run stopped part way leaves what it measured; at
the hard limit (budget + 30 s) or on SIGTERM the script writes it, stops the stage and exits 3.
`--dry-run` (or GEMMA3_GPU_BENCH_DEVICE=cpu) runs the same path on the CPU with the tiny preset
and a few steps, to test the script itself; it writes only $OUT/RESULTS.md (a copy of
benchmarks/RESULTS.md with its table), never benchmarks/RESULTS.md.

Rows:
- the train stage itself: a temp git + DVC copy of this repository, synthetic Zipf-distributed
  tokens (GPT-2 vocabulary) written there as data/tokens, `dvc exp run -s train` with the seed
  recipe (`gemma3 recipe seed-270m`) and max_steps shortened; tokens/s and MFU are the stage's
  own (plots/train.csv, metrics/train.json), steady state = median of the logged intervals after
  the first (which holds compilation). Without a git binary the copy is committed by dulwich
  (`dvc exp run` needs no git binary); without dvc, or when `dvc exp run` fails before the
  trainer logs a step, it runs `python -m stages.train` there and says so. A stage stopped by
  the time limit still gives its row from the intervals it logged.
- the same optimizer step (131,072 tokens) in this script's own loop: eager at the stage's
  micro-batch, compiled at the recipe's 32 x 32 split.
- decode at batch 1 and 32, ours vs transformers, from benchmarks/bench_gpu_decode.py when it
  is in this build.

MFU = training FLOPs (`Config.flops_per_token`, 6 x matmul params + attention) x tokens/s over
the card's dense bf16 peak; validation counts forward FLOPs only (a third).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gemma3.config import Config  # noqa: E402
from gemma3.model import Gemma3ForCausalLM  # noqa: E402
from gemma3.recipes import dvc_set_args, load_recipe  # noqa: E402
from gemma3.runtime import peak_flops  # noqa: E402

ROWS: list[dict[str, Any]] = []
NOTES: list[str] = []
T0 = time.perf_counter()
# The budget and the hard limit count from gpu.sh's start (wheel install and torch's import from a
# cold disk included), so the whole call keeps to its minutes.
with contextlib.suppress(ValueError):
    T0 -= min(120.0, max(0.0, time.time() - float(os.environ.get("GEMMA3_GPU_T0", "x"))))
# What the watchdog and publish() need to know: the section running, the stage's process (its
# group is killed on the hard limit), the table's header, where the table goes.
NOW: dict[str, Any] = {"section": "start", "stage": None, "title": "", "header": "", "targets": []}
LOCK = threading.RLock()
STAGE_RESERVE = 75  # seconds the train stage leaves to the sections after it (GPU)
BEGIN, END = "<!-- gpu.sh: begin -->", "<!-- gpu.sh: end -->"
# The files a pipeline copy needs (as tests/dvcrepo.py copies them).
PROJECT_FILES = ("gemma3", "stages", "dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config")
TOOL_ENV = {
    "PYTHONUNBUFFERED": "1",
    "DVC_NO_ANALYTICS": "1",
    "GIT_AUTHOR_NAME": "gpu.sh",
    "GIT_AUTHOR_EMAIL": "gpu.sh@localhost",
    "GIT_COMMITTER_NAME": "gpu.sh",
    "GIT_COMMITTER_EMAIL": "gpu.sh@localhost",
}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def left(budget: float) -> float:
    return budget - (time.perf_counter() - T0)


@contextlib.contextmanager
def section(name: str, budget: float, needs: float) -> Iterator[bool]:
    """Run a section if `needs` seconds are left; a failure is one line, the rest still runs."""
    if left(budget) < needs:
        log(f"SKIPPED {name}: {left(budget):.0f}s left of the budget, it needs ~{needs:.0f}s")
        NOTES.append(f"{name}: skipped (time budget)")
        yield False
        return
    log(f"--- {name}")
    NOW["section"] = name
    try:
        yield True
    except Exception as e:  # one section failing must not lose the others
        first = (str(e).strip().splitlines() or [""])[-1][:300]
        log(f"FAILED {name}: {type(e).__name__}: {first}")
        NOTES.append(f"{name}: failed ({type(e).__name__}: {first})")
    finally:
        if torch.cuda.is_available():
            with contextlib.suppress(Exception):  # a broken context must not stop the table
                torch.cuda.empty_cache()
        publish()  # after every section: a run stopped later still leaves this much


# ---- what runs where ----------------------------------------------------------------------


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "dvc"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent or broken: say so in the table's header
            out[name] = "not installed"
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        with contextlib.suppress(Exception):
            smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            run = subprocess.run(smi, capture_output=True, text=True, timeout=20)
            out["driver"] = run.stdout.strip()
    return out


def commit() -> str:
    given = os.environ.get("GEMMA3_COMMIT")
    if given:
        return given
    try:
        git = {"cwd": REPO, "capture_output": True, "text": True, "timeout": 20}
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **git)
        dirty = subprocess.run(["git", "status", "--porcelain"], **git)
        if rev.returncode == 0:
            return rev.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown (no git here; pass GEMMA3_COMMIT)"


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12


# ---- the train stage through dvc exp run --------------------------------------------------


def zipf_tokens(n: int, vocab: int, seed: int) -> np.ndarray:
    """Token ids with a Zipf(1.1)-like frequency profile, like text (uint16, as tokenize writes)."""
    rng = np.random.default_rng(seed)
    probs = np.arange(1, vocab + 1, dtype=np.float64) ** -1.1
    ids = rng.choice(vocab, size=n, p=probs / probs.sum())
    return rng.permutation(vocab).astype(np.uint16)[ids]  # frequent ids spread over the vocab


def make_workspace(root: Path, n_train: int, n_val: int) -> None:
    """A copy of the pipeline (committed to git when git is here) with synthetic data/tokens."""
    for name in PROJECT_FILES:
        src, dst = REPO / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dst)
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    # The pipeline here is the train stage alone, unchanged: its data/tokens are made below, not
    # by download + tokenize (whose missing outputs `dvc exp run` would otherwise clear).
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    pipeline["stages"] = {"train": pipeline["stages"]["train"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False), encoding="utf-8")
    tokens = root / "data" / "tokens"
    tokens.mkdir(parents=True)
    (root / "data" / ".gitignore").write_text("/tokens\n", encoding="utf-8")  # not for git
    zipf_tokens(n_train, 50257, 0).tofile(tokens / "train.bin")
    zipf_tokens(n_val, 50257, 1).tofile(tokens / "validation.bin")
    split = {"tokens": 0, "stories": 0, "bytes": 0}
    meta = {"train": {**split, "tokens": n_train}, "validation": {**split, "tokens": n_val}}
    meta |= {"vocab_size": 50257, "dtype": "uint16", "eot": True, "eot_id": 50256}
    meta |= {"tokenizer": "gpt2", "source": {"synthetic-zipf": True}}
    (tokens / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def tool_env(root: Path) -> dict[str, str]:
    """`python` on PATH is this interpreter (dvc.yaml runs `python -m stages.train`)."""
    bindir = root.parent / "bin"
    bindir.mkdir(exist_ok=True)
    # A wrapper, not a symlink: a venv's interpreter reached through a link elsewhere would not
    # find its own site-packages.
    (bindir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n', encoding="utf-8")
    (bindir / "python").chmod(0o755)
    env = {**os.environ, **TOOL_ENV}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    return env


def stage_settings(args: argparse.Namespace) -> list[str]:
    """`-S` overrides: the seed recipe, max_steps shortened (tiny and fewer rows on --dry-run)."""
    recipe = load_recipe("seed-270m")
    recipe |= {"train.max_steps": args.stage_steps, "train.log_interval": 4}
    recipe |= {"tracking.enabled": False, "data.source": "synthetic"}
    if args.dry_run:
        recipe |= {"model.preset": "gemma3-tiny", "train.batch_size": 4, "train.grad_accum": 4}
        recipe |= {"train.block_size": 32, "train.warmup_steps": 2, "train.eval_interval": 4}
        recipe |= {"train.eval_batches": 4, "train.log_interval": 2}
    return dvc_set_args(recipe)


def commit_workspace(root: Path, env: dict[str, str]) -> str:
    """Make `root` a git repository with one commit: with git, else with dulwich (a DVC
    dependency, carried in .whl; `dvc exp run` itself needs no git binary). Returns which."""
    if shutil.which("git") is not None:
        for c in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "gpu.sh"]):
            subprocess.run(c, cwd=root, env=env, check=True, capture_output=True)
        return "git"
    code = (
        "import sys; from dulwich import porcelain as p; r = sys.argv[1]; p.init(r); p.add(r); "
        "p.commit(r, message=b'gpu.sh', author=b'gpu.sh <gpu.sh@localhost>', "
        "committer=b'gpu.sh <gpu.sh@localhost>')"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(root)], env=env, check=True, capture_output=True
    )
    return "dulwich"


def apply_settings(root: Path, sets: list[str]) -> None:
    """Write the `-S` overrides into params.yaml, as `dvc exp run -S` would."""
    from gemma3.params import ParamsLoader
    from gemma3.recipes import apply

    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    pairs = (s.split("=", 1) for s in sets[1::2])  # sets is ["-S", "key=value", ...]
    flat = {k: yaml.load(v, Loader=ParamsLoader) for k, v in pairs}  # noqa: S506
    text = yaml.safe_dump(apply(params, flat), sort_keys=False)
    (root / "params.yaml").write_text(text, encoding="utf-8")


def run_stage(
    args: argparse.Namespace, root: Path, budget: float, *, direct: bool = False
) -> tuple[str, float, str | None]:
    """`dvc exp run -s train` in a git + DVC copy (`python -m stages.train` without dvc, or with
    `direct`), stopped (its whole process group) when the time left to it is spent.
    Returns how it ran, its wall time and why it failed (None when it finished)."""
    env, sets = tool_env(root), stage_settings(args)
    have_dvc = subprocess.run([sys.executable, "-c", "import dvc, dulwich"], capture_output=True)
    if direct or have_dvc.returncode != 0:
        how = "python -m stages.train" + ("" if direct else " (no dvc here)")
        if not direct:
            NOTES.append("train stage: dvc is not importable here, ran `python -m stages.train`")
        apply_settings(root, sets)
        cmd = [sys.executable, "-m", "stages.train"]
    else:
        how = "dvc exp run -s train"
        try:
            if commit_workspace(root, env) == "dulwich":
                NOTES.append(
                    "train stage: no git binary here; the workspace was committed by dulwich"
                )
        except (OSError, subprocess.CalledProcessError) as e:  # no commit: no `dvc exp run`
            why = getattr(e, "stderr", b"") or b""
            why = why.decode(errors="replace").strip().splitlines()[-1:] or [str(e)]
            return how, 0.0, f"committing the workspace failed: {why[0][:300]}"
        cmd = [sys.executable, "-m", "dvc", "exp", "run", "-s", "train", *sets]
    reserve = STAGE_RESERVE if args.device == "cuda" else 10
    timeout = max(30.0, left(budget) - reserve)
    log(f"{how} (at most {timeout:.0f}s): {' '.join(sets)}")
    logfile = Path(os.environ.get("OUT") or root.parent) / "train_stage.log"
    t = time.perf_counter()
    with open(logfile, "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        NOW["stage"] = proc
        try:
            code = proc.wait(timeout=timeout)
            error = None if code == 0 else f"{how} exit {code}: {tail(logfile)}"
        except subprocess.TimeoutExpired:
            kill_group(proc)
            error = f"{how} stopped by the time limit after {timeout:.0f}s"
        finally:
            NOW["stage"] = None
    return how, time.perf_counter() - t, error


def kill_group(proc: subprocess.Popen) -> None:
    """The stage and everything it started (dvc's trainer, compile workers)."""
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)


def tail(path: Path, n: int = 400) -> str:
    """The last non-empty line of a log that says something, cut to `n` characters."""
    lines = [x.strip() for x in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [x for x in lines if x and not x.startswith("$ ")]
    return (lines[-1] if lines else "(no output)")[-n:]


def stage_rows(args: argparse.Namespace, budget: float) -> Path | None:
    root = Path(tempfile.mkdtemp(prefix="gemma3-gpu-stage-")) / "repo"
    root.mkdir()
    n = 20_000 if args.dry_run else 10_000_000
    make_workspace(root, n_train=n, n_val=max(n // 20, 20_000))
    log(f"workspace {root}")
    how, wall, error = run_stage(args, root, budget)
    plots = root / "plots" / "train.csv"
    if error and how.startswith("dvc") and not plots.exists():
        # dvc failed before the trainer logged anything (a version conflict among the carried
        # wheels, say): the stage's own command still gives the row, if there is time for it.
        log(f"train stage: {error}")
        NOTES.append(f"train stage: `dvc exp run` failed before training ({error[:300]})")
        reserve, needs = (STAGE_RESERVE, 60) if args.device == "cuda" else (10, 20)
        if left(budget) - reserve < needs:
            raise RuntimeError(error)
        how, wall2, error = run_stage(args, root, budget, direct=True)
        wall += wall2
    if not plots.exists():
        raise RuntimeError(error or "the stage logged no step")
    with open(plots, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    m = json.loads((root / "metrics/train.json").read_text(encoding="utf-8"))["train"]
    if not rows:
        raise RuntimeError(error or "the stage logged no step")
    if error:
        log(f"train stage: {error}")
        NOTES.append(f"train stage: {error[:300]}; its row holds the steps logged until then")
    log(f"stage: {wall:.0f}s wall; metrics {m}")
    for r in rows:
        log("  " + ", ".join(f"{k}={v}" for k, v in r.items() if v))
    stage_row(args, how, wall, m, rows, stopped=error is not None)
    best = root / "checkpoints" / "best"
    return best if (best / "config.json").is_file() else None


def stage_row(
    args: argparse.Namespace,
    how: str,
    wall: float,
    m: dict[str, Any],
    rows: list[dict[str, str]],
    *,
    stopped: bool,
) -> None:
    """The stage's rows in the table, from its own plots/train.csv and metrics/train.json."""
    # Steady state: the logged intervals after the first (which holds compilation).
    steady = [float(r["tokens_per_s"]) for r in rows[1:] if r["tokens_per_s"]]
    tps = statistics.median(steady) if steady else float(m["tokens_per_s"] or 0)
    peak = peak_flops(torch.device(args.device))
    preset, block = ("gemma3-tiny", 32) if args.dry_run else ("gemma3-270m", 128)
    pad = 64 if args.device == "cuda" else 1  # train.vocab_pad_multiple: auto
    fpt = Config.from_name(preset, vocab_pad_multiple=pad).flops_per_token(block)
    tokens_per_step = m["tokens"] / m["steps"] if m.get("steps") else None
    steps = f"{m['steps']} of {args.stage_steps}" if stopped else f"{args.stage_steps}"
    ROWS.append(
        {
            "what": f"train stage, `{how}`, seed recipe {steps} steps"
            + (" (tiny preset)" if args.dry_run else "")
            + f", {m['precision']}, micro-batch {m.get('micro_batch')}",
            "tokens/s": tps,
            "MFU": fpt * tps / peak if peak else None,
            "ms/step": 1e3 * tokens_per_step / tps if tps and tokens_per_step else None,
            "peak GiB": m.get("peak_memory_gib"),
            "notes": f"{wall:.0f}s stage wall (compile included"
            + ("; stopped by the time limit" if stopped else "")
            + f"); median of {len(steady)} logged intervals after the first; "
            f"final loss {m['final_train_loss']}",
        }
    )
    if m.get("val_tokens_per_s"):
        vt = float(m["val_tokens_per_s"])
        ROWS.append(
            {
                "what": "train stage validation (forward only, inference mode)",
                "tokens/s": vt,
                "MFU": m.get("val_mfu"),
                "notes": f"the last validation pass (step {m['steps']})",
            }
        )
        if not args.dry_run and tps:
            # The seed's 1,875 steps x 131,072 tokens, plus 118 validations of 500 x 32 x 128
            # (every 16 steps and at the end).
            sec = 245_760_000 / tps + (1875 // 16 + 1) * 500 * 32 * 128 / vt
            NOTES.append(
                f"seed recipe projected from these measured rates: {sec / 60:.1f} min "
                "(245,760,000 training tokens + 118 validations of 2,048,000 tokens; "
                "checkpoint writes and compilation not included)"
            )


# ---- the step in this script's own loop ---------------------------------------------------


def train_rate(
    label: str,
    model: torch.nn.Module,
    micro: int,
    accum: int,
    block: int,
    device: str,
    *,
    compiled: bool,
    steps: int,
    fpt: float,
) -> None:
    """One warm-up step (compilation included), then `steps` timed optimizer steps.

    Each step is `accum` forward/backward passes of `micro` x `block` tokens, clipping and fused
    AdamW, with nothing read back to the host, as in gemma3.train.
    """
    from gemma3.train import param_groups

    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), fused=True)
    run = torch.compile(model, dynamic=False) if compiled else model
    gen = torch.Generator(device=device).manual_seed(0)
    vocab = model.config.vocab_size
    data = torch.randint(0, vocab, (accum, micro, block + 1), device=device, generator=gen)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step() -> torch.Tensor:
        total = torch.zeros((), device=device)
        for w in data:
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = run(w[:, :-1], w[:, 1:])[1]
            (loss / accum).backward()
            total += loss.detach().float()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total / accum

    t = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    warm = time.perf_counter() - t
    t = time.perf_counter()
    losses = [step() for _ in range(steps)]
    loss = float(torch.stack(losses).mean())  # the one host read, after the timed steps
    sec = time.perf_counter() - t
    tps = micro * accum * block * steps / sec
    peak = peak_flops(torch.device(device))
    if not math.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss}")
    ROWS.append(
        {
            "what": label,
            "tokens/s": tps,
            "MFU": fpt * tps / peak if peak else None,
            "ms/step": 1e3 * sec / steps,
            "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "notes": f"warm-up {warm:.0f}s; loss {loss:.3f}",
        }
    )
    log(f"{label}: {tps:,.0f} tokens/s, {1e3 * sec / steps:.0f} ms/step, warm-up {warm:.0f}s")


# ---- decode (the gen branch's module, when it is in this build) ---------------------------


def decode_section(device: str, ckpt: Path | None, deadline: float, new_tokens: int) -> None:
    """Decode rows (ours vs transformers), each in the table as soon as it is measured."""
    try:
        from benchmarks.bench_gpu_decode import decode_rows
    except ImportError:
        log("decode: not available in this build")
        NOTES.append("decode: not available in this build (benchmarks/bench_gpu_decode.py)")
        return
    import importlib.util

    theirs = importlib.util.find_spec("transformers") is not None
    if not theirs:
        NOTES.append("decode: transformers is not installed here; its rows are missing")

    def add(r: dict[str, Any]) -> None:
        with LOCK:
            ROWS.append({"what": f"decode: {r['setup']}", "decode": r})
        state = r.get("error") or r.get("skipped") or f"{r['tokens_per_s']:,.1f} tokens/s"
        log(f"decode: {r['setup']}: {state}")
        publish()

    ckpt_dir = str(ckpt) if ckpt is not None else None
    if ckpt is None:
        NOTES.append("decode: random weights (the train stage left no checkpoint)")
    decode_rows(device, ckpt_dir, new_tokens=new_tokens, transformers=theirs, deadline=deadline,
                on_row=add)  # fmt: skip


# ---- the table and RESULTS.md -------------------------------------------------------------


def table(title: str) -> str:
    def f(v: Any, fmt: str) -> str:
        ok = isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))
        return format(v, fmt) if ok else ""

    lines = [f"| {title} | tokens/s | MFU | ms/step | peak GiB | notes |"]
    lines.append("| --- | ---: | ---: | ---: | ---: | --- |")
    for r in ROWS:
        if "decode" in r:  # filled in place by decode_rows (vs transformers comes later)
            d = r["decode"]
            vs = d.get("vs_transformers")
            note = f"{vs:.2f}x transformers" if isinstance(vs, (int, float)) else ""
            note = "; ".join(x for x in (note, d.get("note")) if x)
            note = d.get("error") or (f"skipped ({d['skipped']})" if d.get("skipped") else note)
            r = {**r, "tokens/s": d.get("tokens_per_s"), "peak GiB": d.get("peak_mem_gib")}
            r["notes"] = note
        lines.append(
            f"| {r['what']} | {f(r.get('tokens/s'), ',.0f')} | {f(r.get('MFU'), '.1%')} "
            f"| {f(r.get('ms/step'), '.0f')} | {f(r.get('peak GiB'), '.1f')} "
            f"| {r.get('notes', '')} |"
        )
    return "\n".join(lines)


def write_results(path: Path, header: str, body: str, base: str | None = None) -> None:
    """Replace the block between the gpu.sh markers in RESULTS.md (appended when absent);
    `base` is the text to put it in (default: the file's own)."""
    if base is None:
        base = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{BEGIN}\n{header}\n\n{body}\n{END}"
    if BEGIN in base and END in base:
        head, rest = base.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = base.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a run stopped mid-write leaves the previous table, not half of one


def body() -> str:
    return NOW["title"] and table(NOW["title"]) + (
        "\n\n" + "\n".join(f"- {n}" for n in NOTES) if NOTES else ""
    )


def publish(final: bool = False) -> None:
    """Write the table as it stands into every target (RESULTS.md, $OUT/RESULTS.md)."""
    with LOCK:
        if not NOW["targets"]:
            return
        took = time.perf_counter() - T0
        state = f"{took:.0f}s in the script" if final else (
            f"**partial: {took:.0f}s into the script, written after {NOW['section']}**"
        )  # fmt: skip
        header = NOW["header"].replace("{state}", state)
        for path, base in NOW["targets"]:
            try:
                write_results(path, header, body(), base)
            except OSError as e:
                log(f"could not write {path}: {e}")


def stop_now(why: str) -> None:
    """The hard limit (or SIGTERM): stop the stage, write the table, exit 3."""
    with LOCK:
        log(f"STOPPED: {why}, during {NOW['section']}; writing the table")
        NOTES.append(f"{NOW['section']}: stopped ({why})")
        if NOW["stage"] is not None:
            kill_group(NOW["stage"])
        publish(final=True)
        print("\n" + body(), flush=True)
    os._exit(3)


def start_watchdog(hard: float) -> None:
    """Past `hard` seconds (from the script's start) the table is written and the script ends,
    wherever it is (a compilation that overruns its estimate, a hang)."""
    timer = threading.Timer(max(1.0, hard - (time.perf_counter() - T0)), stop_now,
                            args=(f"hard limit of {hard:.0f}s",))  # fmt: skip
    timer.daemon = True
    timer.start()
    signal.signal(signal.SIGTERM, lambda *_: stop_now("SIGTERM"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=300, help="seconds; later sections skip")
    ap.add_argument("--hard-limit", type=float, help="seconds; the table is written and the "
                    "script stops, wherever it is (default: budget + 30)")  # fmt: skip
    ap.add_argument("--stage-steps", type=int, help="train stage max_steps (48; dry run 8)")
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps per bench row")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny preset: tests the script")
    ap.add_argument("--results", type=Path, help="RESULTS.md to write (default: on CUDA only)")
    args = ap.parse_args()
    args.dry_run = args.dry_run or os.environ.get("GEMMA3_GPU_BENCH_DEVICE") == "cpu"
    args.device = "cpu" if args.dry_run else "cuda"
    args.stage_steps = args.stage_steps or (8 if args.dry_run else 48)
    if args.dry_run:
        args.steps = min(args.steps, 2)
    elif not torch.cuda.is_available():
        print("bench_gpu: no CUDA device visible (--dry-run runs on the CPU)", file=sys.stderr)
        return 2
    if args.results is None and not args.dry_run:
        args.results = REPO / "benchmarks" / "RESULTS.md"
    start(args)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        with section("bf16 matmul", args.budget, 5) as ok:
            if ok:
                NOTES.append(f"bf16 8192^3 matmul on this card: {matmul_tflops():.0f} TFLOP/s")
    ckpt = None
    with section("train stage", args.budget, 150 if not args.dry_run else 30) as ok:
        if ok:
            ckpt = stage_rows(args, args.budget)
    bench_steps(args, compiled=False)  # seconds: before decode, which may use all that is left
    with section("decode", args.budget, 60 if not args.dry_run else 10) as ok:
        if ok:
            new = 20 if args.dry_run else 200  # the dry run tests the path, not the CPU
            decode_section(args.device, ckpt, deadline=T0 + args.budget - 10, new_tokens=new)
    bench_steps(args, compiled=True)
    publish(final=True)
    print("\n" + body(), flush=True)
    for path, _ in NOW["targets"]:
        log(f"wrote {path}")
    return 0


def start(args: argparse.Namespace) -> None:
    """The table's title, header and targets; the watchdog."""
    card = "CPU dry run"
    if args.device == "cuda":
        try:
            card = torch.cuda.get_device_name()
        except Exception as e:  # noqa: BLE001 - the sections will say what is wrong
            card = f"CUDA device ({type(e).__name__})"
    v, rev = versions(), commit()
    log(f"{card}; commit {rev}; " + ", ".join(f"{k} {x}" for k, x in v.items()))
    NOW["title"] = card
    NOW["header"] = (
        f"Measured by `bash benchmarks/gpu.sh` on **{card}**, commit {rev}, "
        + ", ".join(f"{k} {x}" for k, x in v.items())
        + "; {state}. "
        + (
            "Tiny preset, block 32 (a dry run of the script, not a measurement)."
            if args.dry_run
            else "270M preset, block 128, bf16 autocast, the seed recipe's 131,072 tokens per "
            "optimizer step. MFU against the card's dense bf16 peak (989 TFLOP/s for H100/H200 "
            "SXM)."
        )
    )
    base = (REPO / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    targets: list[tuple[Path, str | None]] = []
    if args.results is not None:
        targets.append((args.results, None))
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "RESULTS.md"
        if args.results is None or out.resolve() != args.results.resolve():
            targets.append((out, base))
    NOW["targets"] = targets
    start_watchdog(args.hard_limit or args.budget + 30)


def bench_steps(args: argparse.Namespace, *, compiled: bool) -> None:
    """The stage's optimizer step in this script's loop: eager at the stage's micro-batch, or
    compiled at the recipe's 32 x 32 split."""
    preset = "gemma3-tiny" if args.dry_run else "gemma3-270m"
    block, rows = (32, 16) if args.dry_run else (128, 1024)  # the stage's rows per step
    micro = (4 if args.dry_run else 32) if compiled else (4 if args.dry_run else 256)
    if compiled:
        name, needs = "compiled step, the recipe's split", 100 if not args.dry_run else 120
        label = f"same step, compiled, micro-batch {micro} x {rows // micro} (the recipe's split)"
    else:
        name, needs = "eager step", 30 if not args.dry_run else 5
        label = f"same step, eager, micro-batch {micro} x {rows // micro}"
    with section(name, args.budget, needs) as ok:
        if ok:
            cfg = Config.from_name(preset, vocab_pad_multiple=64 if args.device == "cuda" else 1)
            torch.manual_seed(0)
            model = Gemma3ForCausalLM(cfg).to(args.device)
            steps = max(1, args.steps // 2) if compiled else args.steps
            train_rate(label, model, micro, rows // micro, block, args.device, compiled=compiled,
                       steps=steps, fpt=cfg.flops_per_token(block))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
