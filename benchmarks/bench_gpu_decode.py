"""Decode throughput on one device: ours (static cache, one-token step compiled; CUDA graphs on
CUDA) against transformers' `generate` on the same bf16 weights, batch 1 and batch 32.

    python -m benchmarks.bench_gpu_decode --device cuda            # 270M preset, 200 new tokens
    python -m benchmarks.bench_gpu_decode --device cpu             # smoke test: tiny preset, eager

`decode_rows(device, ckpt_dir)` returns one dict per row (setup, tokens_per_s, vs_transformers,
peak_mem_gib) for benchmarks/gpu.sh to print. Greedy, no early stop: every row decodes exactly
`new_tokens` per prompt. Each setup runs once untimed with 16 new tokens (compilation and graph
capture happen there; the compiled step's shapes do not depend on the length), then up to
`repeats` timed runs (one when a run takes over 5 s, as a host-bound `generate` does); the median
is reported. Peak memory is the CUDA allocator's peak for the timed runs on CUDA and the
process's peak resident memory elsewhere. With CUDA graphs asked for, a row notes when inductor
ran the step without them.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from gemma3.config import Config
from gemma3.generation import generate
from gemma3.model import Gemma3ForCausalLM

PROMPT_LEN = 13
REPEAT_IF_UNDER = 5.0  # seconds: a slower timed run is not repeated (host-bound generate)


def _model(device: torch.device, ckpt_dir: str | None, preset: str) -> Gemma3ForCausalLM:
    if ckpt_dir is not None:
        from gemma3.hf import load_checkpoint

        return load_checkpoint(ckpt_dir, device=device, dtype=torch.bfloat16)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(Config.from_name(preset)).to(device, torch.bfloat16).eval()


def _prompts(batch: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(0, vocab, (batch, PROMPT_LEN), generator=g).tolist()


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB (Linux)


def _time(
    fn: Callable[[int], object],
    device: torch.device,
    new_tokens: int,
    repeats: int,
    *,
    warm_tokens: int,
    deadline: float | None,
) -> float:
    """Median seconds of up to `repeats` calls of `new_tokens`, after one untimed call of
    `warm_tokens` (compilation and graph capture: the static cache's compiled step has the same
    shapes for any length up to its rounded slots). A call slower than REPEAT_IF_UNDER seconds,
    or one that would end past `deadline`, is not repeated: one timed run is then the figure."""
    fn(warm_tokens)
    times: list[float] = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn(new_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        slow = times[-1] > REPEAT_IF_UNDER
        if slow or (deadline is not None and time.perf_counter() + times[-1] > deadline):
            break
    return statistics.median(times)


def decode_rows(
    device: str,
    ckpt_dir: str | None,
    *,
    preset: str | None = None,
    new_tokens: int = 200,
    batches: tuple[int, ...] = (1, 32),
    compile: bool | None = None,
    repeats: int = 3,
    transformers: bool = True,
    deadline: float | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Rows for ours and transformers at each batch size (see the module docstring).

    Defaults: the 270M preset on CUDA, the tiny preset elsewhere (a smoke test); `compile`
    defaults to on for CUDA (CUDA graphs) and off elsewhere (compiling on a CPU takes minutes).
    `deadline` (a time.perf_counter() value) skips the setups not started by then (their rows
    have `skipped` set); `on_row` gets each row as soon as it is measured, so a caller that may be
    stopped keeps what it has (`vs_transformers` is filled in place once theirs is measured). A
    setup that raises gives a row with `error` set and the others still run; when our compiled
    step raises, the eager static cache is measured in its place (and at the later batches).
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    preset = preset or ("gemma3-270m" if cuda else "gemma3-tiny")
    compile = cuda if compile is None else compile
    model = _model(dev, ckpt_dir, preset)
    hf = None
    if transformers:
        from gemma3.hf import to_transformers

        hf = to_transformers(model).to(dev, torch.bfloat16).eval()
    compiled = "static cache + " + ("CUDA graphs" if cuda else "torch.compile")
    rows: list[dict[str, Any]] = []
    for batch in batches:
        prompts = _prompts(batch, model.config.vocab_size)

        def measure(name: str, fn: Callable[[int], object], batch: int = batch) -> dict:
            row = {"setup": f"{name}, bf16, {preset}, batch {batch}, {new_tokens} new"}
            row |= {"tokens_per_s": None, "vs_transformers": None, "peak_mem_gib": None}
            if deadline is not None and time.perf_counter() > deadline:
                row["skipped"] = "time budget"
            else:
                try:
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(dev)
                    warm = min(16, new_tokens)
                    sec = _time(fn, dev, new_tokens, repeats, warm_tokens=warm, deadline=deadline)
                    row |= {
                        "tokens_per_s": batch * new_tokens / sec,
                        "peak_mem_gib": _peak_gib(dev),
                    }
                except Exception as e:  # noqa: BLE001 - one setup failing must not lose the rest
                    last = (str(e).strip().splitlines() or [""])[-1]
                    row["error"] = f"{type(e).__name__}: {last}"[:300]
            rows.append(row)
            if on_row is not None:
                on_row(row)
            return row

        if compile:
            skips = _cudagraph_skips()
            row = measure(f"ours, {compiled}", _ours(model, prompts, compile=True))
            if cuda and _cudagraph_skips() > skips:  # compiled, but run without CUDA graphs
                row["note"] = "inductor skipped CUDA graphs (its reason is in the log)"
            if "error" in row:
                compile = False  # measured eager from here on; the rows' names say which ran
                measure("ours, static cache, eager (compiled failed)", _ours(model, prompts))
        else:
            measure("ours, static cache, eager", _ours(model, prompts))
        if hf is not None:
            theirs = measure(THEIRS, _theirs(hf, prompts, dev))
            for row in rows[:-1]:
                if (
                    row["setup"].endswith(f"batch {batch}, {new_tokens} new")
                    and row["tokens_per_s"]
                ):
                    rate = theirs["tokens_per_s"]
                    row["vs_transformers"] = row["tokens_per_s"] / rate if rate else None
            theirs["vs_transformers"] = 1.0 if theirs["tokens_per_s"] else None
    return rows


THEIRS = "transformers generate (default)"


def _cudagraph_skips() -> int:
    """How often inductor fell back from CUDA graphs in this process (0 if torch won't say)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["cudagraph_skips"])
    except Exception:  # noqa: BLE001 - a private counter: its absence is no failure
        return 0


def _ours(model: Gemma3ForCausalLM, prompts: list[list[int]], *, compile: bool = False) -> Callable:
    def fn(n: int) -> object:
        return generate(model, prompts, n, temperature=0, stop_token=None, static=True,
                        compile=compile)  # fmt: skip

    return fn


def _theirs(hf: Any, prompts: list[list[int]], dev: torch.device) -> Callable:
    ids = torch.tensor(prompts, device=dev)

    def fn(n: int) -> object:
        with torch.inference_mode():
            return hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )

    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ckpt", default=None, help="checkpoint directory (default: random weights)")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--new", type=int, default=200)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = decode_rows(
        args.device,
        args.ckpt,
        preset=args.preset,
        new_tokens=args.new,
        batches=tuple(args.batches),
        repeats=args.repeats,
    )
    print("| setup | tokens/s | vs transformers | peak GiB |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        vs = "" if r["vs_transformers"] is None else f"{r['vs_transformers']:.2f}x"
        rate = r.get("error") or r.get("skipped") or f"{r['tokens_per_s']:.1f}"
        peak = "" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        print(f"| {r['setup']} | {rate} | {vs} | {peak} |")


if __name__ == "__main__":
    main()
