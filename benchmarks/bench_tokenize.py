"""Tokenize speed: the tokenize stage (datasets.map + uint16 writes) vs bare tiktoken.

Both encode the same stories (synthetic, `text_mb` MB of UTF-8) with the same GPT-2 encoding:

- `tiktoken encode_ordinary_batch`: the lower bound on work, lists of ids in memory, nothing read
  or written (1 and 2 threads); and `encode_ordinary` in a plain loop, which is what each
  process of the stage calls (the batch call hands every story to a thread pool, which costs
  time even with one thread).
- `tokenize stage`: `gemma3.data.tokens.tokenize_split` as the DVC stage runs it: the raw .jsonl
  read into a `datasets.Dataset`, `.map(batched=True, num_proc=N)`, ids written to a uint16 file
  (1 and 2 processes).

Targets (issue #13): stage with 1 process >= 0.8x bare tiktoken with 1 thread; stage with 2
processes >= 1.7x the stage with 1. Best of `repeats` runs each, interleaved, so a busy neighbour
on a shared machine hurts all methods alike. Run on demand:

    python benchmarks/bench_tokenize.py --text-mb 20 --repeats 3

Prints a Markdown table (paste into benchmarks/RESULTS.md with the machine it ran on).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from gemma3.data.raw import write_split
from gemma3.data.synthetic import synthetic_stories
from gemma3.data.tokens import tokenize_split
from gemma3.tokenizer import get_encoding


def make_stories(text_mb: float) -> list[str]:
    """Synthetic stories adding up to `text_mb` MB of UTF-8."""
    stories, total, target = [], 0, int(text_mb * 1e6)
    for story in synthetic_stories(10**9, seed=0):
        stories.append(story)
        total += len(story.encode("utf-8"))
        if total >= target:
            return stories
    return stories


def _bare(stories: list[str], threads: int, batch: int) -> float:
    enc = get_encoding()
    t0 = time.perf_counter()
    for i in range(0, len(stories), batch):
        enc.encode_ordinary_batch(stories[i : i + batch], num_threads=threads)
    return time.perf_counter() - t0


def _loop(stories: list[str]) -> float:
    enc = get_encoding()
    t0 = time.perf_counter()
    for story in stories:
        enc.encode_ordinary(story)
    return time.perf_counter() - t0


def _stage(raw: Path, out: Path, procs: int, batch: int) -> float:
    t0 = time.perf_counter()
    tokenize_split(raw, "train", out, num_proc=procs, batch_stories=batch, progress=False)
    return time.perf_counter() - t0


def run(text_mb: float = 20.0, repeats: int = 3, batch: int = 1024) -> list[dict[str, Any]]:
    """One row per method: MB/s (best of `repeats`) and the ratios the targets are about."""
    stories = make_stories(text_mb)
    mb = sum(len(s.encode("utf-8")) for s in stories) / 1e6
    get_encoding()  # built once, outside the timings
    methods = {
        ("tiktoken encode_ordinary, plain loop", 1): None,
        ("tiktoken encode_ordinary_batch", 1): None,
        ("tiktoken encode_ordinary_batch", 2): None,
        ("tokenize stage (datasets.map)", 1): None,
        ("tokenize stage (datasets.map)", 2): None,
    }
    best: dict[tuple[str, int], float] = {k: float("inf") for k in methods}
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        raw = Path(tmp) / "raw"
        write_split(raw, "train", stories)
        files: dict[int, bytes] = {}
        # Warm-up, untimed: imports and the first worker pool are not what we measure.
        write_split(Path(tmp) / "warm", "train", stories[:400])
        for n in (1, 2):
            _stage(Path(tmp) / "warm", Path(tmp) / "warm.bin", n, 50)
        for _ in range(repeats):
            for name, n in methods:
                if name.endswith("plain loop"):
                    seconds = _loop(stories)
                elif name.startswith("tiktoken"):
                    seconds = _bare(stories, n, batch)
                else:
                    out = Path(tmp) / f"train-{n}.bin"
                    seconds = _stage(raw, out, n, batch)
                    files[n] = out.read_bytes()
                best[(name, n)] = min(best[(name, n)], seconds)
        assert files[1] == files[2], "1 and 2 processes wrote different token files"
    rate = {k: mb / seconds for k, seconds in best.items()}
    bare1 = rate[("tiktoken encode_ordinary_batch", 1)]
    loop = rate[("tiktoken encode_ordinary, plain loop", 1)]
    rows = []
    for (name, n), r in rate.items():
        rows.append(
            {
                "method": name,
                "workers": n,
                "unit": "processes" if name.startswith("tokenize") else "threads",
                "text_mb": round(mb, 2),
                "mb_per_s": round(r, 2),
                "vs_bare_1": round(r / bare1, 2),
                "vs_loop": round(r / loop, 2),
                "vs_same_method_1": round(r / rate[(name, 1)], 2),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | workers | MB/s | vs encode_ordinary_batch, 1 thread | vs plain loop "
        "| vs same method, 1 worker |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['workers']} {r['unit']} | {r['mb_per_s']:.1f} | "
            f"{r['vs_bare_1']:.2f}x | {r['vs_loop']:.2f}x | {r['vs_same_method_1']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text-mb", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1024, help="stories per batch (both methods)")
    args = ap.parse_args()
    rows = run(args.text_mb, args.repeats, args.batch)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the end, {rows[0]['text_mb']} MB of text"
    )
    print(markdown(rows))


if __name__ == "__main__":
    main()
