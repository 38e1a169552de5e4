"""Every CPU benchmark side by side in one process; writes benchmarks/RESULTS.md.

    python -m benchmarks.run                        # everything (10-15 min on 2 cores)
    python -m benchmarks.run --only decode --out /tmp/decode.md   # some sections, elsewhere
    python -m benchmarks.run --repeats 5 --new 200  # tighter medians, longer decode

Sections: the training step against transformers' Gemma3ForCausalLM (same weights, same batch,
same optimizer) per precision for gemma3-small and gemma3-270m; greedy decode of the 270M preset
(fp32, bf16, int8; ring and static caches) against transformers' `generate` per dtype and against
full recompute, with each dtype's weight-bandwidth bound measured in the same run; batch-16 decode
of prompts of different lengths and prefill against transformers; the chunked loss's memory;
peak RSS of 270M generation; tokenization against raw tiktoken (benchmarks/bench_tokenize.py, when present). Runs of the
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

from gemma3.config import Config
from gemma3.generation import generate
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
    """(seconds, bytes) of one pass of one-row matmuls over every matrix a decode step reads, in
    the model's own kernel (F.linear for fp32/bf16, the int8 kernel for Int8Linear)."""
    from gemma3.quant import Int8Linear

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    layers = list({id(getattr(m, "weight", m)): m for m in layers}.values())
    nbytes = 0
    for m in layers:
        if isinstance(m, Int8Linear):  # int8 codes + one fp32 scale per row
            nbytes += m.in_features * m.out_features + 4 * m.out_features
        else:
            nbytes += m.weight.numel() * m.weight.element_size()
    dtype = model.model.embed_tokens.weight.dtype
    x = {m.in_features: torch.randn(1, m.in_features, dtype=dtype) for m in layers}

    def one_pass() -> None:
        for m in layers:
            m(x[m.in_features])

    with torch.inference_mode():
        times = interleaved({"pass": one_pass}, repeats * 5)["pass"]
    return statistics.median(times), nbytes


def _hf_generate(hf, ids: torch.Tensor, mask: torch.Tensor, n_new: int) -> list[list[int]]:
    with torch.inference_mode():
        seq = hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return seq[:, ids.shape[1] :].tolist()


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p)
        mask[i, T - len(p) :] = 1
    return ids, mask


def _models(preset: str) -> dict[str, tuple[Gemma3ForCausalLM, object]]:
    """Ours per dtype (fp32, bf16, int8 computed from the fp32 weights) and transformers' copy
    (None for int8: it has no int8 CPU path of its own here)."""
    from gemma3.quant import quantize_int8

    base = random_model(preset).eval()
    out = {}
    for label, dtype in DTYPES.items():
        ours = base if dtype == torch.float32 else random_model(preset, dtype).eval()
        out[label] = (ours, hf_copy(ours).to(dtype).eval())
    out["int8"] = (quantize_int8(base), None)
    return out


def decode_section(preset: str, n_new: int, repeats: int, recompute: bool) -> list[str]:
    out = [
        "## Greedy decode vs transformers `generate`",
        "",
        f"{preset}, batch 1, a {len(PROMPT_IDS)}-token prompt, {n_new} new tokens with no early "
        "stop, random weights (in fp32 the methods must agree token for token; the 'same "
        "tokens' column checks ours against transformers, and int8 against our fp32). 'KV cache' "
        "is the ring-buffer cache, 'static cache' the fixed-shape one CUDA graphs capture. int8 "
        "is computed at load from the fp32 weights (gemma3.quant); transformers has no int8 "
        "CPU path, so int8 is compared with transformers' fastest dtype. The bound is the "
        "weight-bandwidth ceiling measured here in each dtype: one pass of one-row matmuls (the "
        "model's own kernel) over every matrix a decode step reads, timed in the same run. "
        f"Tokens/s, median (min-max) of {repeats}.",
        "",
        "| dtype | method | tokens/s | vs transformers | % of bound | same tokens |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    res: dict[str, dict] = {}
    for label, (ours, hf) in _models(preset).items():
        rows, res[label] = _decode_rows(ours, hf, label, n_new, repeats, recompute, res)
        out += rows
    return out + ["", *_decode_verdicts(res)]


def _decode_rows(
    ours: Gemma3ForCausalLM,
    hf,
    label: str,
    n_new: int,
    repeats: int,
    recompute: bool,
    earlier: dict[str, dict],
) -> tuple[list[str], dict]:
    x = torch.tensor([PROMPT_IDS])
    result: dict[str, list[int]] = {}
    fns = {}
    for name, static in (("cache", False), ("static", True)):

        def run(name: str = name, static: bool = static) -> None:
            result[name] = generate(
                ours, [PROMPT_IDS], n_new, temperature=0, stop_token=None, static=static
            )[0]

        fns[name] = run
    if hf is not None:
        fns["hf"] = lambda: result.__setitem__(
            "hf", _hf_generate(hf, x, torch.ones_like(x), n_new)[0]
        )
    times = interleaved(fns, repeats)
    bound_s, nbytes = bandwidth_bound(ours, repeats)
    tps = {k: [n_new / t for t in v] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in tps.items()}
    if hf is not None:
        ref_name, ref = "transformers", med["hf"]
        same = {k: "yes" if result[k] == result["hf"] else "no" for k in ("cache", "static")}
    else:  # int8: against transformers' fastest dtype, tokens against our fp32
        ref_name, ref = max((e["hf"], k) for k, e in earlier.items())[::-1]
        ref_name = f"transformers {ref_name}"
        fp32 = earlier["fp32"]["tokens"]
        agree = {k: sum(a == b for a, b in zip(result[k], fp32, strict=True)) for k in result}
        same = {k: f"{agree[k]}/{n_new} with fp32" for k in agree}
    rows = [
        f"| {label} | ours, {name} | {spread(tps[key], fmt='{:.1f}')} | "
        f"{med[key] / ref:.2f}x {'' if hf is not None else ref_name} | "
        f"{100 * med[key] * bound_s:.0f}% | {same[key]} |"
        for key, name in (("cache", "KV cache"), ("static", "static cache"))
    ]
    if hf is not None:
        rows.append(
            f"| {label} | transformers generate | {spread(tps['hf'], fmt='{:.1f}')} | 1.00x "
            f"| {100 * med['hf'] * bound_s:.0f}% | |"
        )
    rows.append(
        f"| {label} | bound: {nbytes / 1e9:.2f} GB of weights at {nbytes / bound_s / 1e9:.1f} "
        f"GB/s | {1 / bound_s:.1f} | | 100% | |"
    )
    print("\n".join(rows), flush=True)
    best = max(med["cache"], med["static"])
    if recompute and label == "fp32":
        t0 = time.perf_counter()
        full = generate(ours, [PROMPT_IDS], n_new, temperature=0, stop_token=None, use_cache=False)
        rec = n_new / (time.perf_counter() - t0)
        rows.append(
            f"| fp32 | ours, full recompute (the seed's way), 1 run | {rec:.1f} "
            f"| {rec / ref:.2f}x | {100 * rec * bound_s:.0f}% "
            f"| {'yes' if full[0] == result['cache'] else 'no'} (vs cache) |"
        )
        print(rows[-1], flush=True)
    summary = {"ours": best, "hf": med.get("hf"), "bound": 1 / bound_s, "tokens": result["cache"]}
    return rows, summary


def _decode_verdicts(res: dict[str, dict]) -> list[str]:
    """Issue #22's decode targets, from the rows above (ours = the faster of our two caches)."""
    out = []
    hf_best = max(r["hf"] for r in res.values() if r["hf"] is not None)
    for label, goal in (("fp32", 0.9), ("bf16", 0.8), ("int8", 0.7)):
        pct = res[label]["ours"] / res[label]["bound"]
        out.append(
            f"- {label}: {100 * pct:.0f}% of its bound (target {goal:.0%}: {target(pct, goal)})"
        )
    i8 = res["int8"]["ours"]
    r32, rhf = i8 / res["fp32"]["ours"], i8 / hf_best
    out.append(f"- int8 vs our fp32: {r32:.2f}x (target 2.5x: {target(r32, 2.5)})")
    out.append(f"- int8 vs transformers' fastest: {rhf:.2f}x (target 2x: {target(rhf, 2.0)})")
    return out


def _batch_prompts(batch: int, vocab: int) -> list[list[int]]:
    """`batch` prompts of different lengths (5 to 5 + 3 * (batch - 1) tokens), fixed ids."""
    g = torch.Generator().manual_seed(batch)
    return [torch.randint(0, vocab, (5 + 3 * i,), generator=g).tolist() for i in range(batch)]


def batch_section(preset: str, batch: int, n_new: int, repeats: int) -> list[str]:
    """Batched greedy sampling (left-padded prompts of different lengths), and prefill."""
    out = [
        f"## Batch {batch} decode and prefill vs transformers",
        "",
        f"{preset}, random weights, {batch} prompts of {5}-{5 + 3 * (batch - 1)} tokens, "
        "left-padded, greedy with no early stop. Decode: tokens/s over the batch for "
        f"{n_new} new tokens per row (prefill included). Prefill: prompt tokens/s of the first "
        "token (`generate` with one new token: the prompt pass and one pick) for the same batch "
        "and for batch 1 with a 128-token prompt. int8 is compared with transformers' fastest "
        f"dtype. Median (min-max) of {repeats}.",
        "",
        "| dtype | what | ours | transformers | ours vs transformers | same tokens |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    models = _models(preset)
    prompts = _batch_prompts(batch, models["fp32"][0].config.vocab_size)
    long_prompt = [(PROMPT_IDS * 10)[:128]]
    verdicts: dict[str, list[float]] = {"decode": [], "prefill": []}
    hf_best: dict[str, tuple[float, str]] = {}
    for label, (ours, hf) in models.items():
        for what, ps, new in (
            (f"decode, batch {batch}", prompts, n_new),
            (f"prefill, batch {batch}", prompts, 1),
            ("prefill, batch 1 x 128", long_prompt, 1),
        ):
            row, ratio, hf_rate = _batch_row(ours, hf, label, what, ps, new, repeats, hf_best)
            hf_best[what] = max(hf_best.get(what, (0.0, "")), (hf_rate, label))
            out.append(row)
            print(row, flush=True)
            verdicts["decode" if what.startswith("decode") else "prefill"].append(ratio)
    dec, pre = verdicts["decode"], verdicts["prefill"]
    out += [
        "",
        f"- batch {batch} decode vs transformers (target 1.5x): "
        + ", ".join(f"{r:.2f}x" for r in dec)
        + f" (fp32, bf16, int8); lowest {target(min(dec), 1.5)}",
        "- prefill vs transformers (target 1.0x): "
        + ", ".join(f"{r:.2f}x" for r in pre)
        + f" (fp32, bf16, int8; batch {batch} then 1 x 128 each); lowest {target(min(pre), 1.0)}",
    ]
    return out


def _batch_row(ours, hf, label, what, prompts, n_new, repeats, hf_best) -> tuple[str, float, float]:
    ids, mask = _left_padded(prompts)
    n_tokens = len(prompts) * n_new if n_new > 1 else int(mask.sum())
    result: dict[str, list[list[int]]] = {}

    def run_ours() -> None:
        result["ours"] = generate(ours, prompts, n_new, temperature=0, stop_token=None)

    fns = {"ours": run_ours}
    if hf is not None:
        fns["hf"] = lambda: result.__setitem__("hf", _hf_generate(hf, ids, mask, n_new))
    times = interleaved(fns, repeats)
    rate = {k: [n_tokens / t for t in v] for k, v in times.items()}
    ours_med = statistics.median(rate["ours"])
    if hf is not None:
        hf_med, ref = statistics.median(rate["hf"]), spread(rate["hf"], fmt="{:.1f}")
        same = "yes" if result["ours"] == result["hf"] else "no"
    else:
        hf_med, best_label = hf_best[what]
        ref, same = f"{hf_med:.1f} ({best_label})", ""
    row = (
        f"| {label} | {what} | {spread(rate['ours'], fmt='{:.1f}')} | {ref} "
        f"| {ours_med / hf_med:.2f}x | {same} |"
    )
    return row, ours_med / hf_med, hf_med


# Peak resident set of this process so far, in kB: VmHWM starts afresh at exec (ru_maxrss
# would carry the parent's peak over fork/exec).
_HWM = "lambda: int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"

_RSS_CHILD = f"""
import sys, torch
hwm = {_HWM}
from gemma3.config import Config
from gemma3.generation import generate
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
    if hasattr(mod, "markdown"):  # rows as a table (bench_tokenize's own layout)
        return out + mod.markdown(res).splitlines()
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
    sections = ["train", "decode", "batch", "memory", "tokenize"]
    ap.add_argument("--only", nargs="+", choices=sections, default=sections)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=100, help="new tokens per decode run")
    ap.add_argument("--presets", nargs="+", default=["gemma3-small", "gemma3-270m"])
    ap.add_argument("--decode-preset", default="gemma3-270m")
    ap.add_argument("--decode-batch", type=int, default=16, help="rows of the batched section")
    ap.add_argument("--batch-new", type=int, default=50, help="new tokens per row, batched")
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
    if "batch" in args.only:
        body += [
            "",
            *batch_section(args.decode_preset, args.decode_batch, args.batch_new, args.repeats),
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
