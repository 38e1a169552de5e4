"""Every CPU benchmark side by side in one process; writes benchmarks/RESULTS.md.

    python -m benchmarks.run                        # everything (10-15 min on 2 cores)
    python -m benchmarks.run --only decode --out /tmp/decode.md   # some sections, elsewhere
    python -m benchmarks.run --repeats 5 --new 200  # tighter medians, longer decode

Sections: the training step against transformers' Gemma3ForCausalLM (same weights, same batch,
same optimizer) per precision for gemma3-small and gemma3-270m; greedy decode of the 270M preset
against transformers' `generate` per dtype and against full recompute, with the weight-bandwidth
bound measured in the same run; the chunked loss's memory; peak RSS of 270M generation;
tokenization against raw tiktoken (benchmarks/bench_tokenize.py, when present). Runs of the
things compared are interleaved (ours, theirs, ours, ...) so load from other processes hits both;
tables give medians and the min-max spread. The "## Profile notes" and "## GPU" sections of an
existing RESULTS.md are kept (written by hand / by benchmarks/gpu.sh).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from gemma3.config import Config
from gemma3.generate import generate
from gemma3.model import Gemma3ForCausalLM

RESULTS = Path(__file__).with_name("RESULTS.md")
PROMPT_IDS = [7454, 2402, 257, 640, 11, 612, 373, 257, 1310, 2576, 3706, 20037, 13]  # 13 tokens
PRECISIONS = {"fp32": None, "bf16 autocast": torch.bfloat16}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---- measuring ---------------------------------------------------------------------------------
def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn `repeats` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def spread(xs: list[float], scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    """'median (min-max)' of xs * scale."""
    v = sorted(x * scale for x in xs)
    return f"{fmt.format(statistics.median(v))} ({fmt.format(v[0])}-{fmt.format(v[-1])})"


def target(ratio: float, goal: float) -> str:
    return "met" if ratio >= goal else f"missed by {100 * (1 - ratio / goal):.0f}%"


def random_model(preset: str, dtype: torch.dtype = torch.float32) -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    return Gemma3ForCausalLM(Config.from_name(preset)).to(dtype)


def hf_copy(model: Gemma3ForCausalLM):
    from gemma3.hf import to_transformers

    return to_transformers(model)


# ---- sections ----------------------------------------------------------------------------------
def machine() -> list[str]:
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.*)", info).group(1)
        flags = set(re.search(r"flags\s*:\s*(.*)", info).group(1).split())
    except (OSError, AttributeError):
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")
    have = ", ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted)
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import transformers

        versions.append(f"transformers {transformers.__version__}")
    except ImportError:
        versions.append("transformers not installed")
    return [
        f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu}; torch threads: {torch.get_num_threads()}; flags: {have}",
        f"- Versions: {', '.join(versions)}",
    ]


def train_section(presets: list[str], repeats: int, batch: int, block: int) -> list[str]:
    out = [
        "## Training step vs transformers",
        "",
        f"One optimizer step (forward, backward, torch.optim.AdamW) on a {batch}x{block} batch of "
        "random GPT-2 token ids, the same weights and the same optimizer for both; transformers "
        "computes its loss with `labels=` (its own shift and fp32 cross-entropy), ours with the "
        f"chunked loss. Seconds per step, median (min-max) of {repeats}.",
        "",
        "| preset | precision | ours s/step | transformers s/step | speed vs transformers "
        "| target >= 1.0x |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for preset in presets:
        out += _train_rows(preset, repeats, batch, block)
    return out


def _train_rows(preset: str, repeats: int, batch: int, block: int) -> list[str]:
    ours = random_model(preset)
    hf = hf_copy(ours)
    ours.train()
    hf.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, ours.config.vocab_size, (batch, block + 1), generator=g)
    opts = {
        "ours": torch.optim.AdamW(ours.parameters(), lr=1e-5),
        "hf": torch.optim.AdamW(hf.parameters(), lr=1e-5),
    }

    def step(name: str, dtype: torch.dtype | None) -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            if name == "ours":
                loss = ours(x[:, :-1], x[:, 1:])[1]
            else:
                loss = hf(input_ids=x, labels=x).loss
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    rows = []
    for label, dtype in PRECISIONS.items():
        fns = {n: (lambda n=n, dtype=dtype: step(n, dtype)) for n in opts}
        times = interleaved(fns, repeats)
        ratio = statistics.median(times["hf"]) / statistics.median(times["ours"])
        rows.append(
            f"| {preset} | {label} | {spread(times['ours'])} | {spread(times['hf'])} "
            f"| {ratio:.2f}x | {target(ratio, 1.0)} |"
        )
        print(rows[-1], flush=True)
    return rows


def bandwidth_bound(model: Gemma3ForCausalLM, repeats: int) -> tuple[float, float]:
    """(seconds, bytes) of one pass of one-row F.linear over every matrix a decode step reads."""
    mats = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    mats = list({id(w): w for w in mats}.values())
    nbytes = sum(w.numel() * w.element_size() for w in mats)
    x = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in mats}

    def one_pass() -> None:
        for w in mats:
            F.linear(x[w.shape[1]], w)

    with torch.inference_mode():
        times = interleaved({"pass": one_pass}, repeats * 5)["pass"]
    return statistics.median(times), nbytes


def decode_section(preset: str, n_new: int, repeats: int, recompute: bool) -> list[str]:
    out = [
        "## Greedy decode vs transformers `generate`",
        "",
        f"{preset}, batch 1, a {len(PROMPT_IDS)}-token prompt, {n_new} new tokens with no early "
        "stop, random weights (in fp32 the methods must agree token for token; the 'same "
        "tokens' column checks ours against transformers). The bound is the weight-bandwidth ceiling "
        "measured here: one pass of one-row `F.linear` over every matrix a decode step reads, "
        f"timed in the same run. Tokens/s, median (min-max) of {repeats}.",
        "",
        "| dtype | method | tokens/s | vs transformers | % of bound | same tokens |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    base = random_model(preset)
    verdicts = []
    for label, dtype in DTYPES.items():
        rows, verdict = _decode_rows(base.to(dtype).eval(), label, n_new, repeats, recompute)
        out += rows
        verdicts.append(verdict)
    return out + ["", *verdicts]


def _decode_rows(
    ours: Gemma3ForCausalLM, label: str, n_new: int, repeats: int, recompute: bool
) -> tuple[list[str], str]:
    hf = hf_copy(ours).to(ours.lm_head.weight.dtype).eval()
    x = torch.tensor([PROMPT_IDS])
    result: dict[str, list[int]] = {}

    def run_ours() -> None:
        result["ours"] = generate(ours, [PROMPT_IDS], n_new, temperature=0, stop_token=None)[0]

    def run_hf() -> None:
        with torch.inference_mode():
            seq = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                pad_token_id=None,
                eos_token_id=None,
            )
        result["hf"] = seq[0, len(PROMPT_IDS) :].tolist()

    times = interleaved({"ours": run_ours, "hf": run_hf}, repeats)
    bound_s, nbytes = bandwidth_bound(ours, repeats)
    tps = {k: [n_new / t for t in v] for k, v in times.items()}
    ours_med, hf_med = statistics.median(tps["ours"]), statistics.median(tps["hf"])
    same = "yes" if result["ours"] == result["hf"] else "no"
    pct = 100 * ours_med * bound_s
    rows = [
        f"| {label} | ours, KV cache | {spread(tps['ours'], fmt='{:.1f}')} "
        f"| {ours_med / hf_med:.2f}x | {pct:.0f}% | {same} |",
        f"| {label} | transformers generate | {spread(tps['hf'], fmt='{:.1f}')} | 1.00x "
        f"| {100 * hf_med * bound_s:.0f}% | |",
        f"| {label} | bound: {nbytes / 1e9:.2f} GB of weights at {nbytes / bound_s / 1e9:.1f} "
        f"GB/s | {1 / bound_s:.1f} | | 100% | |",
    ]
    verdict = f"- {label}: {ours_med / hf_med:.2f}x transformers (target 1.5x: "
    verdict += f"{target(ours_med / hf_med, 1.5)})"
    if label == "bf16":
        verdict += f"; {pct:.0f}% of the bound (target 70%: {target(pct / 100, 0.7)})"
    print("\n".join(rows), flush=True)
    if recompute and label == "fp32":
        t0 = time.perf_counter()
        full = generate(ours, [PROMPT_IDS], n_new, temperature=0, stop_token=None, use_cache=False)
        rec = n_new / (time.perf_counter() - t0)
        rows.append(
            f"| fp32 | ours, full recompute (the seed's way), 1 run | {rec:.1f} "
            f"| {rec / hf_med:.2f}x | {100 * rec * bound_s:.0f}% "
            f"| {'yes' if full[0] == result['ours'] else 'no'} (vs cache) |"
        )
        print(rows[-1], flush=True)
    return rows, verdict


# Peak resident set of this process so far, in kB: VmHWM starts afresh at exec (ru_maxrss
# would carry the parent's peak over fork/exec).
_HWM = "lambda: int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"

_RSS_CHILD = f"""
import sys, torch
hwm = {_HWM}
from gemma3.config import Config
from gemma3.generate import generate
from gemma3.model import Gemma3ForCausalLM
dtype = getattr(torch, sys.argv[1])
base = hwm()
torch.set_default_dtype(dtype)  # weights are created in the dtype: no fp32 copy on the way
model = Gemma3ForCausalLM(Config.from_name("gemma3-270m")).eval()
torch.set_default_dtype(torch.float32)
loaded = hwm()
generate(model, [list(range(100, 113))], int(sys.argv[2]), temperature=0, stop_token=None)
peak = hwm()
print(base, loaded, peak)
"""

_LOSS_CHILD = f"""
import sys, time, torch, torch.nn.functional as F
hwm = {_HWM}
from gemma3.model import chunked_loss
rows, d, V = int(sys.argv[2]), 640, 50257
torch.manual_seed(0)
w = (torch.randn(V, d) * 0.02).requires_grad_()
h = torch.randn(rows, d).requires_grad_()
y = torch.randint(0, V, (rows,))
before = hwm()
t0 = time.perf_counter()
if sys.argv[1] == "plain":
    loss = F.cross_entropy(F.linear(h, w).float(), y)
else:
    loss = chunked_loss(h, w, y, V, int(sys.argv[3]))
loss.backward()
dt = time.perf_counter() - t0
print(before, hwm(), dt)
"""


def _child(code: str, *args: str) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    res = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, env=env
    )
    return [float(v) for v in res.stdout.split()]


def memory_section(n_new: int) -> list[str]:
    from gemma3.model import LOSS_CHUNK_ROWS

    out = [
        "## Memory",
        "",
        "Peak resident memory (VmHWM) of a fresh process, so nothing else is counted.",
        "",
        "Chunked loss vs `F.cross_entropy` on the full logits: forward and backward of the lm "
        "head and loss for micro-batch 32x128 (4,096 rows, 640 -> 50,257, fp32); growth of the "
        "peak over the inputs (the 32M-parameter head and its gradient are common to both).",
        "",
        "| loss | peak growth | seconds |",
        "| --- | ---: | ---: |",
    ]
    for kind in ("plain", "chunked"):
        before, peak, secs = _child(_LOSS_CHILD, kind, "4096", str(LOSS_CHUNK_ROWS))
        name = (
            "plain (full fp32 logits)" if kind == "plain" else f"chunked ({LOSS_CHUNK_ROWS} rows)"
        )
        out.append(f"| {name} | {(peak - before) / 1024:,.0f} MB | {secs:.2f} |")
        print(out[-1], flush=True)
    out += [
        "",
        f"gemma3-270m greedy generation, batch 1, 13-token prompt, {n_new} new tokens, weights "
        "created in the dtype:",
        "",
        "| dtype | after import | after model | peak during generate |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label in ("float32", "bfloat16"):
        base, loaded, peak = _child(_RSS_CHILD, label, str(n_new))
        out.append(
            f"| {label} | {base / 1024:,.0f} MB | {loaded / 1024:,.0f} MB | {peak / 1024:,.0f} MB |"
        )
        print(out[-1], flush=True)
    return out


def tokenize_section() -> list[str]:
    out = ["## Tokenize vs raw tiktoken", ""]
    try:
        mod = importlib.import_module("benchmarks.bench_tokenize")
    except ImportError:
        return out + ["Skipped: benchmarks/bench_tokenize.py is not in this checkout."]
    fn = next((getattr(mod, n) for n in ("run", "bench", "benchmark") if hasattr(mod, n)), None)
    if fn is None:
        return out + ["Skipped: benchmarks/bench_tokenize.py exposes no run()/bench() function."]
    res = fn()
    if isinstance(res, str):
        return out + [res]
    return out + [str(line) for line in res]


# ---- RESULTS.md ----------------------------------------------------------------------------------
KEPT = ("Profile notes", "GPU")  # hand-written / separately measured sections a rerun keeps


def kept_sections(text: str) -> str:
    """The KEPT sections (each up to the next '## ' heading) of an existing RESULTS.md."""
    kept = []
    for name in KEPT:
        for m in re.finditer(rf"^## {name}.*?(?=^## |\Z)", text, flags=re.M | re.S):
            kept.append(m.group(0).rstrip() + "\n")
    return "\n".join(kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sections = ["train", "decode", "memory", "tokenize"]
    ap.add_argument("--only", nargs="+", choices=sections, default=sections)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=100, help="new tokens per decode run")
    ap.add_argument("--presets", nargs="+", default=["gemma3-small", "gemma3-270m"])
    ap.add_argument("--decode-preset", default="gemma3-270m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--no-recompute", action="store_true", help="skip the full-recompute row")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    body = ["## Machine", "", *machine()]
    print("\n".join(body), flush=True)
    if "train" in args.only:
        body += ["", *train_section(args.presets, args.repeats, args.batch, args.block)]
    if "decode" in args.only:
        body += [
            "",
            *decode_section(args.decode_preset, args.new, args.repeats, not args.no_recompute),
        ]
    if "memory" in args.only:
        body += ["", *memory_section(args.new)]
    if "tokenize" in args.only:
        body += ["", *tokenize_section()]
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:])
    old = args.out.read_text() if args.out.exists() else ""
    header = [
        "# Benchmark results",
        "",
        "Written by `benchmarks/run.py`; every comparison ran side by side in one process on the "
        "same weights, so the ratios are the result and the absolute figures only make them "
        "concrete (they move by up to 2x between machines and with load from other processes). "
        "Re-run on your machine before quoting them.",
        "",
        f"Command: `{command.strip()}` ({(time.perf_counter() - t0) / 60:.1f} min).",
        "",
    ]
    text = "\n".join(header + body) + "\n"
    kept = kept_sections(old)
    args.out.write_text(text + ("\n" + kept if kept else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
