"""GPU benchmark for the 270M preset: training tokens/s and MFU, peak memory, decode tokens/s.

Made for a lent GPU machine without network (see benchmarks/gpu.sh): it needs only torch, the
repository on PYTHONPATH and, for the side-by-side rows, transformers. Token ids are drawn in the
script from a Zipf-like distribution over the GPT-2 vocabulary (the shape of real TinyStories
batches: uint16 ids, block 128), so no data set is needed. Every section is guarded: a failure
prints one line and the next section runs, and sections are skipped once `--budget` seconds pass.

MFU = achieved training FLOP/s / the card's dense bf16 peak, with FLOPs per token from
`Config.flops_per_token` (6 x matmul params + attention; ~0.82 GFLOP/token at block 128). The
measured 8192^3 bf16 matmul rate is printed too, as the practical ceiling.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from gemma3.config import Config
from gemma3.model import Gemma3ForCausalLM

PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))
ROWS: list[dict[str, Any]] = []
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def peak_flops() -> float | None:
    name = torch.cuda.get_device_name()
    return next((f for key, f in PEAK_BF16 if key in name), None)


def zipf_tokens(n: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Token ids with a Zipf(1.1)-like frequency profile, like text; uint16 on disk, int64 here."""
    g = torch.Generator(device="cpu").manual_seed(0)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    probs = ranks.pow(-1.1)
    ids = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=g)
    perm = torch.randperm(vocab, generator=g)  # frequent ids spread over the vocabulary
    return perm[ids].to(torch.int32).to(device)


def batches(data: torch.Tensor, bs: int, block: int) -> Callable[[], tuple[torch.Tensor, ...]]:
    def get() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(0, data.numel() - block - 1, (bs,), device=data.device)
        offs = torch.arange(block + 1, device=data.device)
        chunk = data[ix[:, None] + offs].long()
        return chunk[:, :-1], chunk[:, 1:]

    return get


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t) / 1e12


def param_groups(model: torch.nn.Module, wd: float) -> list[dict[str, Any]]:
    params = list({id(p): p for p in model.parameters()}.values())
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def train_rate(
    label: str,
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    get: Callable[[], tuple[torch.Tensor, ...]],
    tokens_per_step: int,
    flops_per_token: float,
    *,
    compile_model: bool,
    warmup: int,
    steps: int,
    accum: int = 1,
    mode: str | None = None,
) -> dict[str, Any]:
    """Warm-up steps (compilation included), then `steps` optimizer steps timed with CUDA events.

    One step = `accum` micro-batches (forward + backward), clipping, fused AdamW, zero_grad;
    `tokens_per_step` counts all of its micro-batches.
    """
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), fused=True)
    run = torch.compile(model, mode=mode) if compile_model else model
    torch.cuda.reset_peak_memory_stats()

    def step() -> torch.Tensor:
        for _ in range(accum):
            if mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            x, y = get()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(run, x, y)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().clone()  # CUDA-graph outputs are overwritten by the next replay

    t = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t
    losses = []
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        losses.append(step())
    end.record()
    torch.cuda.synchronize()
    sec = start.elapsed_time(end) / 1e3
    tps = tokens_per_step * steps / sec
    peak = peak_flops()
    loss = float(torch.stack(losses).float().mean())
    if not math.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss}")
    row = {
        "what": label,
        "tokens/s": tps,
        "MFU": flops_per_token * tps / peak if peak else float("nan"),
        "step ms": 1e3 * sec / steps,
        "peak GiB": torch.cuda.max_memory_allocated() / 2**30,
        "warm-up s": warm_s,
        "loss": loss,
    }
    ROWS.append(row)
    log(
        f"{label}: {tps:,.0f} tok/s, MFU {row['MFU']:.1%}, {row['step ms']:.1f} ms/step, "
        f"peak {row['peak GiB']:.1f} GiB, warm-up {warm_s:.0f}s, loss {loss:.3f}"
    )
    return row


def ours_loss(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return m(x, y)[1]


def hf_loss(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = m(input_ids=x).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


def largest_batch(
    model: torch.nn.Module, get_for: Callable[[int], Any], candidates: list[int]
) -> int:
    """Largest micro-batch whose eager fwd+bwd fits (eager needs more memory than compiled)."""
    for bs in candidates:
        try:
            x, y = get_for(bs)()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x, y)[1]
            loss.backward()
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            return bs
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return candidates[-1]


@torch.inference_mode()
def decode_rate(model: Gemma3ForCausalLM, new: int) -> float:
    from gemma3.generate import generate

    prompt = [[464, 3290, 373, 257, 1310, 2576, 13]]
    generate(model, prompt, 8, temperature=0.0, stop_token=None)
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = generate(model, prompt, new, temperature=0.0, stop_token=None)
    torch.cuda.synchronize()
    return len(out[0]) / (time.perf_counter() - t)


@torch.inference_mode()
def hf_decode_rate(hf: Any, new: int) -> float:
    ids = torch.tensor([[464, 3290, 373, 257, 1310, 2576, 13]], device="cuda")
    kw = {"do_sample": False, "max_new_tokens": new, "min_new_tokens": new, "pad_token_id": 0}
    hf.generate(ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = hf.generate(ids, **kw)
    torch.cuda.synchronize()
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t)


def engine_run(steps: int, bs: int) -> dict[str, Any]:
    """The real train stage (`python -m stages.train`) on the 270M preset in a temp workspace.

    This exercises the engine's own GPU paths (precision policy, torch.compile, fused AdamW with
    its on-device non-finite guard, the padded head, pinned batch transfer, checkpoint writes) on
    learnable patterned tokens, and reads its tokens/s and MFU from metrics/train.json.
    """
    import json
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    from tests.project import write_params, write_tokens

    repo = Path(__file__).resolve().parents[1]
    root = Path(tempfile.mkdtemp(prefix="gemma3-engine-"))
    write_tokens(root, n_train=8_000_000, n_val=200_000, vocab=50257)
    train = {
        "max_steps": steps,
        "batch_size": bs,
        "block_size": 128,
        "grad_accum": 1,
        "lr": 6e-4,
        "min_lr": 6e-5,
        "warmup_steps": 10,
        "eval_interval": steps,
        "eval_batches": 4,
        "log_interval": 20,
        "checkpoint_interval": steps,
        "compile": True,
    }
    write_params(root, model={"preset": "gemma3-270m", "overrides": {}}, train=train)
    path = os.pathsep.join(x for x in (str(repo), os.environ.get("PYTHONPATH")) if x)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "stages.train"], cwd=root, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"train stage exit {proc.returncode}: {proc.stderr.strip()[-400:]}")
    log(f"train stage stdout: {proc.stdout.strip().splitlines()[-1]}")
    log("train stage plots/train.csv:\n" + (root / "plots/train.csv").read_text())
    m = json.loads((root / "metrics/train.json").read_text())["train"]
    row = {
        "what": f"train stage (engine), {m['precision']}, compile, mb {bs}, last {20} steps",
        "tokens/s": m["tokens_per_s"],
        "MFU": m["mfu"] if m["mfu"] is not None else float("nan"),
        "warm-up s": wall,
        "loss": m["final_train_loss"],
    }
    ROWS.append(row)
    log(f"engine: {m}")
    return row


def section(name: str, budget: float) -> contextlib.AbstractContextManager[Any]:
    @contextlib.contextmanager
    def guard() -> Any:
        if time.perf_counter() - T0 > budget:
            log(f"SKIPPED {name}: time budget spent")
            yield False
            return
        try:
            yield True
        except Exception as e:  # a benchmark section failing must not lose the others
            log(f"FAILED {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        finally:
            torch.cuda.empty_cache()

    return guard()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per row")
    ap.add_argument("--budget", type=float, default=420, help="seconds; later sections skip")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    ap.add_argument("--engine-steps", type=int, default=80, help="0 skips the train-stage row")
    ap.add_argument("--cudagraphs", action="store_true", help="add a reduce-overhead row")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device visible", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = torch.device("cuda")
    log(
        f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    )
    log(
        f"bf16 8192^3 matmul: {matmul_tflops():.0f} TFLOP/s (dense bf16 peak used for MFU: "
        f"{(peak_flops() or float('nan')) / 1e12:.0f})"
    )

    cfg = Config.from_name("gemma3-270m", vocab_pad_multiple=64)
    fpt = cfg.flops_per_token(args.block)
    log(
        f"gemma3-270m: {cfg.param_counts()['total']:,} params, {fpt / 1e9:.3f} GFLOP/token at block {args.block}"
    )
    data = zipf_tokens(20_000_000, cfg.vocab_size, dev)
    get_for = lambda bs: batches(data, bs, args.block)  # noqa: E731
    B = args.block

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).to(dev)
    with section("eager bs32", args.budget) as ok:
        if ok:
            train_rate(
                "ours eager, bf16 autocast, mb 32",
                model,
                ours_loss,
                get_for(32),
                32 * B,
                fpt,
                compile_model=False,
                warmup=3,
                steps=args.steps,
            )
    with section("compiled bs32", args.budget) as ok:
        if ok:
            train_rate(
                "ours compiled, bf16 autocast, mb 32",
                model,
                ours_loss,
                get_for(32),
                32 * B,
                fpt,
                compile_model=True,
                warmup=3,
                steps=args.steps,
            )
    big = 32
    with section("largest micro-batch", args.budget) as ok:
        if ok:
            big = largest_batch(model, get_for, [512, 256, 128, 64])
            log(f"largest micro-batch that fits (eager probe): {big}")
    with section(f"compiled bs{big}", args.budget) as ok:
        if ok and big != 32:
            torch._dynamo.reset()
            train_rate(
                f"ours compiled, bf16 autocast, mb {big}",
                model,
                ours_loss,
                get_for(big),
                big * B,
                fpt,
                compile_model=True,
                warmup=3,
                steps=max(10, args.steps // 2),
            )
    with section(f"compiled bs{big} x accum 4", args.budget) as ok:
        if ok:
            train_rate(
                f"ours compiled, bf16 autocast, mb {big} x grad accum 4",
                model,
                ours_loss,
                get_for(big),
                4 * big * B,
                fpt,
                compile_model=True,
                warmup=1,
                steps=max(4, args.steps // 6),
                accum=4,
            )
    with section("cuda graphs bs32", args.budget) as ok:
        if ok and args.cudagraphs:
            torch._dynamo.reset()
            train_rate(
                "ours compiled reduce-overhead (CUDA graphs), bf16 autocast, mb 32",
                model,
                ours_loss,
                get_for(32),
                32 * B,
                fpt,
                compile_model=True,
                warmup=3,
                steps=args.steps,
                mode="reduce-overhead",
            )
    with section("engine", args.budget) as ok:
        if ok and args.engine_steps:
            engine_run(args.engine_steps, 64)
    with section("decode", args.budget) as ok:
        if ok:
            torch._dynamo.reset()
            m16 = model.to(torch.bfloat16).eval()
            r = decode_rate(m16, 200)
            ROWS.append({"what": "ours decode, bf16, batch 1, 200 new", "tokens/s": r})
            log(f"ours decode bf16 batch 1: {r:.1f} tok/s")
    if not args.no_hf:
        with section("transformers", args.budget) as ok:
            if ok:
                from gemma3.hf import to_transformers

                torch._dynamo.reset()
                plain = Gemma3ForCausalLM(Config.from_name("gemma3-270m"))  # unpadded for HF
                hf = to_transformers(plain).to(dev).train()
                del plain
                train_rate(
                    "transformers compiled, bf16 autocast, mb 32",
                    hf,
                    hf_loss,
                    get_for(32),
                    32 * B,
                    fpt,
                    compile_model=True,
                    warmup=3,
                    steps=args.steps,
                )
                hf16 = hf.to(torch.bfloat16).eval()
                r = hf_decode_rate(hf16, 200)
                ROWS.append({"what": "transformers decode, bf16, batch 1, 200 new", "tokens/s": r})
                log(f"transformers decode bf16 batch 1: {r:.1f} tok/s")

    print(
        f"\n| {torch.cuda.get_device_name()} | tokens/s | MFU | ms/step | peak GiB | warm-up s | loss |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in ROWS:

        def f(k: str, fmt: str, r: dict[str, Any] = r) -> str:
            v = r.get(k)
            return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

        print(
            f"| {r['what']} | {f('tokens/s', ',.0f')} | {f('MFU', '.1%')} | {f('step ms', '.1f')} "
            f"| {f('peak GiB', '.1f')} | {f('warm-up s', '.0f')} | {f('loss', '.3f')} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
