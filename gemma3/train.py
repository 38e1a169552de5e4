"""The training engine: AdamW + warmup/cosine, grad accumulation, clipping, eval, checkpoints.

Design choices that make runs reproducible and crash-safe:
- The learning rate is a pure function of the optimizer step, and the micro-batch for global
  index g comes from `sample_batch(seed, step=g)`. Resuming therefore needs only the step number,
  the weights and the optimizer moments; nothing else about the data order is state.
- Under torchrun, rank r of w takes global micro-batch g = (step * grad_accum + micro) * w + r,
  so N processes with accumulation A see exactly the batches one process with accumulation N*A
  would, and gradients (averaged by DDP) match.
- Everything written (best checkpoint, training state) goes through atomic renames.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file

from gemma3.config import Config
from gemma3.data.tokens import fixed_batches, load_tokens, read_tokens_meta, sample_batch
from gemma3.errors import Gemma3Error
from gemma3.hf import save_checkpoint, write_safetensors
from gemma3.io import atomic_dir, atomic_write_json, atomic_write_text
from gemma3.model import Gemma3ForCausalLM
from gemma3.params import Params

VAL_PLOTS = "val.csv"  # beside the plots file: step,val_loss at evaluated steps only
PLOT_FIELDS = ("step", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu")

# Dense bf16 peak FLOP/s (no sparsity), matched against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 125e12),
    ("A6000", 155e12),
    ("4090", 165e12),
    ("3090", 71e12),
)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Pieces that are pure functions (tested directly)
# ---------------------------------------------------------------------------------------------


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_lr.

    With min_lr > lr the "decay" rises from lr to min_lr (the seed's defect, kept visible).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def global_micro_index(step: int, micro: int, grad_accum: int, world_size: int, rank: int) -> int:
    return (step * grad_accum + micro) * world_size + rank


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear + embedding) only, never on the (1+w) norm weights."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def resolve_device(requested: str, source: str = "params.yaml: train.device") -> torch.device:
    """The torch device for "auto", "cpu", "cuda", "cuda:N" or "mps"; `source` names the setting."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps:
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise Gemma3Error(
            f"{source}: unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Gemma3Error(f"{source}: {requested!r} but no CUDA GPU is visible; use auto or cpu")
    if device.type == "mps" and not mps:
        raise Gemma3Error(f"{source}: {requested!r} but MPS is not available; use auto or cpu")
    return device


@dataclass(frozen=True)
class Runtime:
    """Decisions derived from params + hardware (what 'auto' means on this machine)."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    pure_bf16: bool
    compile: bool
    fused_adamw: bool
    vocab_pad_multiple: int
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_runtime(p: Params, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> Runtime:
    t = p.train
    device = resolve_device(t.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
    cuda = device.type == "cuda"
    precision = t.precision if t.precision != "auto" else ("bf16-autocast" if cuda else "fp32")
    if precision != "fp32" and device.type == "cpu":
        warn(f"train.precision={precision} on CPU is slow; fp32 is usual there")
    return Runtime(
        device=device,
        autocast_dtype=torch.bfloat16 if precision in ("bf16-autocast", "bf16-pure") else None,
        pure_bf16=precision == "bf16-pure",
        compile=(t.compile == "true") or (t.compile == "auto" and cuda),
        fused_adamw=cuda and t.fused_adamw in ("auto", "true"),
        vocab_pad_multiple=t.vocab_pad_multiple
        if isinstance(t.vocab_pad_multiple, int)
        else (64 if cuda else 1),
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
    )


def fingerprint(p: Params, data_meta: dict[str, Any], world_size: int) -> str:
    """Hash of everything that shapes the training trajectory; a saved state resumes only on a match."""
    relevant = {
        "seed": p.seed,
        "model": p.model_config().to_dict(),
        "train": {
            k: v
            for k, v in p.to_dict()["train"].items()
            if k
            not in (
                "eval_interval",
                "eval_batches",
                "log_interval",
                "checkpoint_interval",
                "resume",
                "device",
            )
        },
        "data": {
            k: data_meta.get(k) for k in ("train", "validation", "eot", "vocab_size", "source")
        },
        "world_size": world_size,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


# ---------------------------------------------------------------------------------------------
# Training state: weights + optimizer moments in safetensors, scalars and history in JSON
# ---------------------------------------------------------------------------------------------

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def save_state(
    directory: Path,
    model: Gemma3ForCausalLM,
    optimizer: torch.optim.Optimizer,
    info: dict[str, Any],
) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and model.config.tie_embeddings:
            continue
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    osd = optimizer.state_dict()
    for idx, st in osd["state"].items():
        for name, v in st.items():
            tensors[f"optim.{idx}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.torch_cuda"] = torch.cuda.get_rng_state()
    groups = [
        {k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
        for g in osd["param_groups"]
    ]
    with atomic_dir(directory) as tmp:
        write_safetensors(tensors, tmp / STATE_TENSORS)
        atomic_write_json(tmp / STATE_JSON, {**info, "param_groups": groups})


def read_state_info(directory: Path) -> dict[str, Any] | None:
    path = directory / STATE_JSON
    if not path.is_file() or not (directory / STATE_TENSORS).is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def load_state(
    directory: Path,
    model: Gemma3ForCausalLM,
    optimizer: torch.optim.Optimizer,
    info: dict[str, Any],
) -> None:
    try:
        tensors = load_file(str(directory / STATE_TENSORS))
    except (SafetensorError, OSError) as e:
        raise Gemma3Error(
            f"{directory / STATE_TENSORS}: unreadable training state ({e}); delete it to start fresh"
        ) from None
    own = model.state_dict()
    sd = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    if model.config.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    if set(sd) != set(own) or any(sd[k].shape != own[k].shape for k in own):
        raise Gemma3Error(
            f"{directory}: training state does not match the model config; delete it to start fresh"
        )
    model.load_state_dict(sd)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    torch.set_rng_state(tensors["rng.torch_cpu"])
    if "rng.torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.torch_cuda"])


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainPaths:
    data_dir: Path
    best_dir: Path
    state_dir: Path
    metrics: Path
    plots: Path


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a resumable state at the end of the step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum


def _write_plots(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PLOT_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in PLOT_FIELDS})
    atomic_write_text(path, buf.getvalue())
    # Validation points only where evaluated: an empty cell would be drawn as 0 by DVC's plots.
    val = "".join(f"{r['step']},{r['val_loss']}\n" for r in rows if r.get("val_loss") is not None)
    atomic_write_text(path.with_name(VAL_PLOTS), "step,val_loss\n" + val)


def _fmt(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


def train(
    p: Params,
    paths: TrainPaths,
    *,
    tracker_factory: Callable[[str | None, Runtime, Config], Any] | None = None,
    progress: bool = True,
    fault_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train from params; returns the metrics dict also written to `paths.metrics`.

    `tracker_factory(run_id, runtime, cfg)` returns an experiment tracker (or None); `run_id` is
    the run to continue when resuming. `fault_hook(step, loss)` lets tests inject faults.
    """
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    rt = resolve_runtime(p, rank, world, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if rt.device.type == "cuda" else "gloo")
    try:
        return _train(p, paths, rt, tracker_factory, progress, fault_hook)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    p: Params,
    paths: TrainPaths,
    rt: Runtime,
    tracker_factory: Callable[[str | None, Runtime, Config], Any] | None,
    progress: bool,
    fault_hook: Callable[[int, torch.Tensor], torch.Tensor] | None,
) -> dict[str, Any]:
    t = p.train
    if rt.device.type == "cuda":
        torch.cuda.set_device(rt.device)
        torch.backends.cuda.matmul.allow_tf32 = t.tf32
        torch.backends.cudnn.allow_tf32 = t.tf32
    if t.min_lr > t.lr and rt.is_main:
        warn(
            f"train.min_lr ({t.min_lr:g}) > train.lr ({t.lr:g}): the cosine schedule RISES from lr to "
            "min_lr after warmup (the seed recipe's defect); set min_lr <= lr for a real decay"
        )
    if t.eval_interval > t.max_steps and rt.is_main:
        warn(
            f"train.eval_interval ({t.eval_interval}) > train.max_steps ({t.max_steps}): validation runs only at the end"
        )

    # ---- data ----
    meta = read_tokens_meta(paths.data_dir)
    cfg = p.model_config(vocab_pad_multiple=rt.vocab_pad_multiple)
    block, bs = t.block_size, t.batch_size
    train_data = load_tokens(
        paths.data_dir / "train.bin", vocab_size=cfg.vocab_size, min_tokens=block + 1
    )
    val_data = load_tokens(
        paths.data_dir / "validation.bin", vocab_size=cfg.vocab_size, min_tokens=block + 1
    )
    if len(train_data) < bs * block + 1:
        raise Gemma3Error(
            f"{paths.data_dir / 'train.bin'}: {len(train_data):,} tokens is fewer than one batch "
            f"(train.batch_size {bs} x train.block_size {block}); use more data or a smaller batch"
        )
    eval_batches = fixed_batches(val_data, t.eval_batches, bs, block, p.seed)

    # ---- model + optimizer ----
    torch.manual_seed(p.seed)
    model = Gemma3ForCausalLM(cfg).to(rt.device)
    if rt.pure_bf16:
        model = model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(
        param_groups(model, t.weight_decay),
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        eps=t.eps,
        **({"fused": True} if rt.fused_adamw else {}),
    )

    # ---- resume ----
    fp = fingerprint(p, meta, rt.world_size)
    start_step, best_val, best_step, history, run_id = 0, math.inf, None, [], None
    info = read_state_info(paths.state_dir) if t.resume else None
    if info is not None:
        if info.get("fingerprint") != fp:
            if rt.is_main:
                warn(
                    f"{paths.state_dir}: saved training state was made with different params; starting fresh"
                )
            info = None
        elif info.get("step", 0) >= t.max_steps:
            info = None  # a finished run is not resumed: re-running trains again
    if info is not None:
        load_state(paths.state_dir, model, optimizer, info)
        start_step, best_val, best_step = info["step"], info["best_val_loss"], info["best_step"]
        history, run_id = info["history"], info.get("mlflow_run_id")
        if rt.is_main:
            print(
                f"resuming from {paths.state_dir} at step {start_step}/{t.max_steps}",
                file=sys.stderr,
            )
    elif rt.is_main:
        # Starting fresh: stale outputs from another run must not survive.
        for d in (paths.best_dir, paths.state_dir):
            if d.exists():
                shutil.rmtree(d)

    tracker = tracker_factory(run_id, rt, cfg) if (tracker_factory and rt.is_main) else None
    if tracker is not None and info is None:
        tracker.log_params(
            {**p.to_dict(), "runtime": {"device": str(rt.device), "world_size": rt.world_size}}
        )

    raw_model = model
    if rt.compile:
        model = torch.compile(model)
    if rt.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)

    flops_tok = cfg.flops_per_token(block)
    peak = peak_flops(rt.device)
    tokens_per_step = bs * block * t.grad_accum * rt.world_size

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if rt.autocast_dtype is None or rt.pure_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=rt.device.type, dtype=rt.autocast_dtype)

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total = 0.0
        for x, y in eval_batches:
            with autocast():
                _, loss = raw_model(x.to(rt.device), y.to(rt.device))
            total += loss.item()
        model.train()
        return total / len(eval_batches)

    def to_device(x: torch.Tensor) -> torch.Tensor:
        if rt.device.type == "cuda":
            return x.pin_memory().to(rt.device, non_blocking=True)
        return x.to(rt.device)

    def save_best(step: int, val: float) -> None:
        save_checkpoint(
            raw_model,
            paths.best_dir,
            meta={
                "step": step,
                "val_loss": val,
                "mlflow_run_id": getattr(tracker, "run_id", None),
                "block_size": block,
                "data": {"eot": meta.get("eot"), "source": meta.get("source")},
            },
        )

    def state_info(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "fingerprint": fp,
            "best_val_loss": best_val,
            "best_step": best_step,
            "history": history,
            "mlflow_run_id": getattr(tracker, "run_id", None),
        }

    model.train()
    stop = _StopFlag()
    bar = None
    if progress and rt.is_main:
        from tqdm import tqdm

        bar = tqdm(
            total=t.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
        )
    last_train_loss = None
    window_t0, window_tokens = time.perf_counter(), 0
    # The bar is closed however the loop ends, so an error message starts on a line of its own.
    with stop.installed(), bar if bar is not None else contextlib.nullcontext():
        for step in range(start_step, t.max_steps):
            lr = lr_at(
                step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, max_steps=t.max_steps
            )
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum = torch.zeros((), device=rt.device)
            for micro in range(t.grad_accum):
                g_idx = global_micro_index(step, micro, t.grad_accum, rt.world_size, rt.rank)
                x, y = sample_batch(train_data, bs, block, seed=p.seed, step=g_idx)
                x, y = to_device(x), to_device(y)
                sync = micro == t.grad_accum - 1
                ctx = (
                    model.no_sync()
                    if (rt.world_size > 1 and not sync)
                    else contextlib.nullcontext()
                )
                with ctx:
                    with autocast():
                        _, loss = model(x, y)
                    if fault_hook is not None:
                        loss = fault_hook(step, loss)
                    (loss / t.grad_accum).backward()
                loss_sum += loss.detach()
            clip = t.grad_clip if t.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), clip)
            train_loss = (loss_sum / t.grad_accum).item()
            gn = grad_norm.item()
            if not (math.isfinite(train_loss) and math.isfinite(gn)):
                if bar is not None:
                    bar.close()
                raise Gemma3Error(
                    f"non-finite {'loss' if not math.isfinite(train_loss) else 'gradient norm'} at step "
                    f"{step + 1} (loss {train_loss}, grad norm {gn}); training stopped, best checkpoint "
                    f"{paths.best_dir} left as it was; lower train.lr or raise train.warmup_steps"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last_train_loss = train_loss

            done = step + 1
            window_tokens += tokens_per_step
            row: dict[str, Any] | None = None
            if done % t.log_interval == 0 or done % t.eval_interval == 0 or done == t.max_steps:
                if rt.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - window_t0
                tps = window_tokens / elapsed if elapsed > 0 else 0.0
                mfu = flops_tok * tps / (peak * rt.world_size) if peak else None
                window_t0, window_tokens = time.perf_counter(), 0
                row = {
                    "step": done,
                    "train_loss": _fmt(train_loss),
                    "val_loss": None,
                    "lr": lr,
                    "grad_norm": _fmt(gn),
                    "tokens_per_s": round(tps, 1),
                    "mfu": _fmt(mfu),
                }
            if done % t.eval_interval == 0 or done == t.max_steps:
                val = evaluate()
                assert row is not None
                row["val_loss"] = _fmt(val)
                if val < best_val and rt.is_main:
                    best_val, best_step = val, done
                    save_best(done, val)
                window_t0 = time.perf_counter()  # eval time is not training throughput
            if row is not None and rt.is_main:
                history.append(row)
                if tracker is not None:
                    metrics = {
                        "train/loss": row["train_loss"],
                        "lr": lr,
                        "grad_norm": row["grad_norm"],
                        "tokens_per_s": row["tokens_per_s"],
                    }
                    if row["mfu"] is not None:
                        metrics["mfu"] = row["mfu"]
                    if row["val_loss"] is not None:
                        metrics["val/loss"] = row["val_loss"]
                    tracker.log_metrics(metrics, step=done)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{train_loss:.3f}",
                        val=f"{best_val:.3f}" if best_val < math.inf else "-",
                        lr=f"{lr:.2e}",
                        tok_s=f"{row['tokens_per_s']:.0f}",
                        **({"mfu": f"{row['mfu']:.1%}"} if row["mfu"] is not None else {}),
                    )
            if bar is not None:
                bar.update(1)
            interrupted = stop.signum is not None
            if rt.is_main and (
                done % t.checkpoint_interval == 0 or done == t.max_steps or interrupted
            ):
                save_state(paths.state_dir, raw_model, optimizer, state_info(done))
                _write_plots(paths.plots, history)
            if interrupted:
                if bar is not None:
                    bar.close()
                raise KeyboardInterrupt(
                    f"stopped at step {done}; training state saved to {paths.state_dir}, re-run to resume"
                )
    if bar is not None:
        bar.close()

    if not rt.is_main:
        return {}
    if not paths.best_dir.exists():
        # Resumed after the best checkpoint was deleted: the final weights are all we have.
        warn(
            f"{paths.best_dir} was missing after resume; saving the final weights as the checkpoint"
        )
        best_val, best_step = evaluate(), t.max_steps
        save_best(best_step, best_val)
    last = history[-1] if history else {}
    metrics = {
        "best_val_loss": _fmt(best_val),
        "best_step": best_step,
        "final_train_loss": _fmt(
            last_train_loss if last_train_loss is not None else last.get("train_loss")
        ),
        "final_val_loss": last.get("val_loss"),
        "steps": t.max_steps,
        "tokens": t.max_steps * tokens_per_step,
        "tokens_per_s": last.get("tokens_per_s"),
        "mfu": last.get("mfu"),
        "device": str(rt.device),
        "world_size": rt.world_size,
        "params": cfg.param_counts()["total"],
        "mlflow_run_id": getattr(tracker, "run_id", None),
    }
    atomic_write_json(paths.metrics, metrics)
    _write_plots(paths.plots, history)
    if tracker is not None:
        tracker.log_metrics({"best_val_loss": best_val}, step=t.max_steps)
        tracker.log_artifact(paths.best_dir, "checkpoint")
        tracker.finish()
    return metrics
