"""Decode throughput on one device: ours (static cache, one-token step compiled; CUDA graphs on
CUDA) against transformers' `generate` on the same bf16 weights, batch 1 and batch 32.

    python -m benchmarks.bench_gpu_decode --device cuda            # 270M preset, 200 new tokens
    python -m benchmarks.bench_gpu_decode --device cpu             # smoke test: tiny preset, eager

`decode_rows(device, ckpt_dir)` returns one dict per row (setup, tokens_per_s, vs_transformers,
peak_mem_gib) for benchmarks/gpu.sh to print. Greedy, no early stop: every row decodes exactly
`new_tokens` per prompt. Each setup runs once untimed (compilation and graph capture happen
there), then `repeats` timed runs; the median is reported. Peak memory is the CUDA allocator's
peak for the timed runs on CUDA and the process's peak resident memory elsewhere.
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


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
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
) -> list[dict[str, Any]]:
    """Rows for ours and transformers at each batch size (see the module docstring).

    Defaults: the 270M preset on CUDA, the tiny preset elsewhere (a smoke test); `compile`
    defaults to on for CUDA (CUDA graphs) and off elsewhere (compiling on a CPU takes minutes).
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    preset = preset or ("gemma3-270m" if cuda else "gemma3-tiny")
    compile = cuda if compile is None else compile
    model = _model(dev, ckpt_dir, preset)
    vocab = model.config.vocab_size
    hf = None
    if transformers:
        from gemma3.hf import to_transformers

        hf = to_transformers(model).to(dev, torch.bfloat16).eval()
    ours_name = "static cache + " + ("CUDA graphs" if cuda and compile else "torch.compile")
    ours_name = ours_name if compile else "static cache, eager"
    rows: list[dict[str, Any]] = []
    for batch in batches:
        prompts = _prompts(batch, vocab)
        kw = dict(temperature=0, stop_token=None, static=True, compile=compile)

        def ours(prompts: list[list[int]] = prompts, kw: dict = kw) -> object:
            return generate(model, prompts, new_tokens, **kw)

        setups = {f"ours, {ours_name}": ours}
        if hf is not None:
            ids = torch.tensor(prompts, device=dev)

            def theirs(ids: torch.Tensor = ids) -> object:
                with torch.inference_mode():
                    return hf.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                        pad_token_id=0,
                        eos_token_id=None,
                    )

            setups["transformers generate (default)"] = theirs
        rates: dict[str, float] = {}
        for name, fn in setups.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            rates[name] = batch * new_tokens / _time(fn, dev, repeats)
            rows.append(
                {
                    "setup": f"{name}, bf16, {preset}, batch {batch}, {new_tokens} new",
                    "tokens_per_s": rates[name],
                    "vs_transformers": None,
                    "peak_mem_gib": _peak_gib(dev),
                }
            )
        hf_rate = rates.get("transformers generate (default)")
        for row, name in zip(rows[-len(setups) :], setups, strict=True):
            row["vs_transformers"] = rates[name] / hf_rate if hf_rate else None
    return rows


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
        print(f"| {r['setup']} | {r['tokens_per_s']:.1f} | {vs} | {r['peak_mem_gib']:.2f} |")


if __name__ == "__main__":
    main()
