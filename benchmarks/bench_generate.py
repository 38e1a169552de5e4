"""Decode speed: our KV cache vs full recompute (the seed's way) vs transformers' generate.

All three run side by side in one process on the same random weights, greedy, batch 1, a fixed
prompt, `--new` tokens with no early stop, so the ratios compare like with like. Run on demand:

    python benchmarks/bench_generate.py --presets gemma3-tiny gemma3-270m --new 200

Prints a Markdown table (paste into benchmarks/RESULTS.md with the machine it ran on).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from gemma3.config import Config
from gemma3.generate import generate
from gemma3.hf import to_transformers
from gemma3.model import Gemma3ForCausalLM
from gemma3.tokenizer import encode

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play in the park."


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench(preset: str, n_new: int, repeats: int, device: str) -> list[tuple[str, str, float]]:
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Config.from_name(preset)).to(device).eval()
    ids = encode(PROMPT)
    rows = []

    def ours(use_cache: bool):
        return generate(model, [ids], n_new, temperature=0, stop_token=None, use_cache=use_cache)

    ours(True)  # warm-up
    t_cache, out_cache = timed(lambda: ours(True), repeats)
    rows.append((preset, "gemma3 generate, KV cache", n_new / t_cache))
    t_full, out_full = timed(lambda: ours(False), 1)
    rows.append((preset, "gemma3 generate, full recompute", n_new / t_full))
    assert out_cache == out_full, "cache and recompute disagree"

    try:
        hf = to_transformers(model).to(device).eval()
    except ImportError:
        return rows
    x = torch.tensor([ids], device=device)

    def hf_generate():
        with torch.no_grad():
            return hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                pad_token_id=0,
            )

    hf_generate()
    t_hf, out_hf = timed(hf_generate, repeats)
    rows.append((preset, "transformers generate (same weights)", n_new / t_hf))
    assert out_hf[0, len(ids) :].tolist() == out_cache[0], "transformers disagrees"
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["gemma3-tiny", "gemma3-270m"])
    ap.add_argument("--new", type=int, default=200, help="new tokens per generation")
    ap.add_argument("--repeats", type=int, default=3, help="best of N (cached paths)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, device {args.device}, {args.new} new tokens, "
        f"prompt {len(encode(PROMPT))} tokens, greedy, batch 1\n"
    )
    print("| preset | method | tokens/s | vs full recompute |")
    print("| --- | --- | ---: | ---: |")
    for preset in args.presets:
        rows = bench(preset, args.new, args.repeats, args.device)
        base = rows[1][2]
        for p, method, tps in rows:
            print(f"| {p} | {method} | {tps:,.1f} | {tps / base:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
