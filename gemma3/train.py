"""The training engine: AdamW + warmup/cosine, grad accumulation, clipping, eval, checkpoints.

Read top to bottom: the pure pieces (schedule, batch order), what "auto" resolves to, then
`train` -> `setup` -> `resume` -> `fit`, which runs `train_step` and `log_row` until the last
step, and `finish`. The training state a run resumes from lives in `gemma3.state`.

Design choices that make runs reproducible and crash-safe:
- The learning rate is a pure function of the optimizer step, and the micro-batch for global
  index g comes from `sample_batch(seed, step=g)`. Resuming therefore needs only the step number,
  the weights and the optimizer moments; nothing else about the data order is state.
- Under torchrun, rank r of w takes global micro-batch g = (step * grad_accum + micro) * w + r,
  so N processes with accumulation A see exactly the batches one process with accumulation N*A
  would, and gradients (averaged by DDP) match. Only rank 0 reads and writes files; it sends the
  resume decision and the state to the others, so ranks need no shared disk.
- Everything written (best checkpoint, training state) goes through atomic renames, and a fresh
  run replaces the previous run's files only when it writes its own.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gemma3.config import Config
from gemma3.data.tokens import fixed_batches, load_tokens, read_tokens_meta, sample_batch
from gemma3.errors import Gemma3EnvironmentError, Gemma3Error
from gemma3.fileio import atomic_write_json, atomic_write_text, exclusive_lock
from gemma3.hf import check_trainable, save_checkpoint
from gemma3.model import Gemma3ForCausalLM
from gemma3.params import Params
from gemma3.runtime import (
    Dist,
    all_reduce_mean,
    any_rank,
    autocast,
    broadcast_object,
    init_process_group,
    peak_flops,
    resolve_device,
    resolve_precision,
    warn,
    weight_dtype,
)
from gemma3.state import (
    STATE_JSON,
    TrainState,
    fingerprint,
    load_state,
    read_state_info,
    read_state_tensors,
    save_state,
)

PLOT_FIELDS = ("step", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu")
VAL_PLOTS = "val.csv"  # beside the plots file: step,val_loss at evaluated steps only
Tracker = Any  # gemma3.tracking's run (log_params, log_metrics, log_artifact, finish) or None
TrackerFactory = Callable[[str | None, "Runtime", Config], Tracker]
FaultHook = Callable[[int, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Pure pieces (tested directly)
# ---------------------------------------------------------------------------------------------


def lr_at(
    step: int,
    *,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    max_steps: int,
    warmup_start_factor: float = 0.0,
) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_lr.

    Warmup step s runs at lr * (f + (1 - f) * (s + 1) / warmup_steps): f = 0 ramps from
    lr / warmup_steps, f = 1/3 follows the seed's LinearLR(start_factor=1/3). With min_lr > lr
    the "decay" rises from lr to min_lr (the seed's defect, kept visible).
    """
    if warmup_steps > 0 and step < warmup_steps:
        f = warmup_start_factor
        return lr * (f + (1.0 - f) * (step + 1) / warmup_steps)
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


# ---------------------------------------------------------------------------------------------
# What "auto" means here
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """Decisions derived from params + hardware, made once."""

    device: torch.device
    precision: str  # fp32, bf16-autocast or bf16-pure (never "auto")
    compile: bool
    fused_adamw: bool
    vocab_pad_multiple: int
    micro_batch: int = 1  # sequences per forward/backward pass (divides batch_size x grad_accum)
    eval_batch_size: int = 1  # sequences per validation forward pass
    dist: Dist = field(default_factory=Dist)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def world_size(self) -> int:
        return self.dist.world_size


# Tokens per forward/backward pass that train.micro_batch: auto aims at on CUDA: the 270M preset
# at 256 x 128 fits in ~30 GiB and ran 3.3x the tokens/s of 32 x 128 on an H100 (RESULTS.md).
AUTO_MICRO_TOKENS = 32_768


def largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, max(1, at_most)) + 1) if n % d == 0)


def resolve_batches(t: Any, cuda: bool) -> tuple[int, int]:
    """(micro_batch, eval_batch_size) for train.micro_batch / train.eval_batch_size "auto".

    Off CUDA, auto keeps batch_size for both (nothing to fill). On CUDA, auto takes the largest
    divisor of batch_size x grad_accum within AUTO_MICRO_TOKENS (never below batch_size), and
    validation the largest divisor of its rows within 2 x that (forward only needs less memory).
    """
    rows = t.batch_size * t.grad_accum
    micro = t.micro_batch
    if micro == "auto":
        budget = AUTO_MICRO_TOKENS // t.block_size
        micro = largest_divisor(rows, budget) if cuda and budget > t.batch_size else t.batch_size
    eval_bs = t.eval_batch_size
    if eval_bs == "auto":
        eval_rows = t.eval_batches * t.batch_size
        eval_bs = largest_divisor(eval_rows, 2 * micro) if cuda else t.batch_size
    return micro, eval_bs


def resolve_runtime(p: Params, d: Dist | None = None) -> Runtime:
    t, d = p.train, d or Dist()
    device = resolve_device(t.device)
    if device.type == "cuda" and d.world_size > 1:
        device = torch.device("cuda", d.local_rank)
    cuda = device.type == "cuda"
    micro_batch, eval_batch_size = resolve_batches(t, cuda)
    return Runtime(
        device=device,
        precision=resolve_precision(t.precision, device),
        compile=cuda if t.compile == "auto" else t.compile,
        # Fused AdamW also lets a non-finite step be skipped on the device, without a host sync.
        fused_adamw=device.type in ("cuda", "cpu") if t.fused_adamw == "auto" else t.fused_adamw,
        vocab_pad_multiple=t.vocab_pad_multiple
        if isinstance(t.vocab_pad_multiple, int)
        else (64 if cuda else 1),
        micro_batch=micro_batch,
        eval_batch_size=eval_batch_size,
        dist=d,
    )


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainPaths:
    data_dir: Path
    best_dir: Path
    state_dir: Path
    metrics: Path
    plots: Path


@dataclass
class Run:
    """What setup builds: one object the loop's helpers share instead of a dozen arguments."""

    p: Params
    paths: TrainPaths
    rt: Runtime
    cfg: Config
    data_meta: dict[str, Any]
    train_data: np.ndarray
    val_windows: torch.Tensor  # (eval_batches x batch_size, block_size + 1), on the device
    model: Gemma3ForCausalLM  # the raw module (what is saved)
    optimizer: torch.optim.Optimizer
    forward: torch.nn.Module  # what the loop calls: compiled and/or DDP-wrapped `model`
    eval_forward: torch.nn.Module  # what validation calls: `model`, compiled when training is
    tracker: Tracker = None


def build_model(cfg: Config, rt: Runtime, seed: int) -> Gemma3ForCausalLM:
    """The initialised model on its device; running out of memory is a one-line error."""
    check_trainable(cfg, rt.device, weight_dtype(rt.precision))  # arithmetic, before allocating
    torch.manual_seed(seed)
    size = cfg.param_counts()["total"] * weight_dtype(rt.precision).itemsize
    try:
        return Gemma3ForCausalLM(cfg).to(rt.device, weight_dtype(rt.precision))
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "memory" not in str(e).lower():
            raise
        raise Gemma3Error(
            f"params.yaml: model: {cfg.param_counts()['total']:,} parameters need "
            f"{size / 2**30:,.1f} GiB on {rt.device}, more than is free; use a smaller model"
        ) from None


def windows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, T + 1) token windows from a batch's inputs and targets (y is x shifted by one)."""
    return torch.cat((x, y[:, -1:]), dim=1)


def load_data(p: Params, paths: TrainPaths, cfg: Config) -> tuple[np.ndarray, torch.Tensor]:
    block, bs = p.train.block_size, p.train.batch_size
    vocab, need = cfg.vocab_size, block + 1
    train_data = load_tokens(paths.data_dir / "train.bin", vocab_size=vocab, min_tokens=need)
    val_data = load_tokens(paths.data_dir / "validation.bin", vocab_size=vocab, min_tokens=need)
    if len(train_data) < bs * block + 1:
        raise Gemma3Error(
            f"{paths.data_dir / 'train.bin'}: {len(train_data):,} tokens is fewer than one batch "
            f"(train.batch_size {bs} x train.block_size {block}); use more data or a smaller batch"
        )
    val = fixed_batches(val_data, p.train.eval_batches, bs, block, p.seed)
    return train_data, torch.cat([windows(x, y) for x, y in val])


def warn_about_settings(p: Params) -> None:
    t = p.train
    if t.min_lr > t.lr:
        warn(
            f"train.min_lr ({t.min_lr:g}) > train.lr ({t.lr:g}): the cosine schedule RISES from lr to "
            "min_lr after warmup (the seed recipe's defect); set min_lr <= lr for a real decay"
        )
    if t.eval_interval > t.max_steps:
        warn(
            f"train.eval_interval ({t.eval_interval}) > train.max_steps ({t.max_steps}): "
            "validation runs only at the end"
        )


def setup(p: Params, paths: TrainPaths, rt: Runtime) -> Run:
    t = p.train
    if rt.device.type == "cuda":
        torch.cuda.set_device(rt.device)
        torch.backends.cuda.matmul.allow_tf32 = t.tf32
        torch.backends.cudnn.allow_tf32 = t.tf32
    if rt.is_main:
        warn_about_settings(p)
    cfg = p.model_config(vocab_pad_multiple=rt.vocab_pad_multiple)
    data_meta = read_tokens_meta(paths.data_dir)
    train_data, val_windows = load_data(p, paths, cfg)
    val_windows = val_windows.to(rt.device)  # once: validation then never copies from the host
    model = build_model(cfg, rt, p.seed)
    optimizer = torch.optim.AdamW(
        param_groups(model, t.weight_decay),
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        eps=t.eps,
        **({"fused": True} if rt.fused_adamw else {}),
    )
    return Run(
        p, paths, rt, cfg, data_meta, train_data, val_windows, model, optimizer, model, model
    )


def wrap_model(run: Run) -> None:
    """Compile, then DDP (which also copies rank 0's weights, resumed or fresh, to every rank)."""
    forward: torch.nn.Module = run.model
    if run.rt.compile:
        # Static shapes: training and validation batches each get their own graph, instead of
        # the second shape turning the first graph into a slower dynamic one.
        forward = torch.compile(forward, dynamic=False)  # type: ignore[assignment]
    run.eval_forward = forward
    if run.rt.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        cuda = run.rt.device.type == "cuda"
        forward = DDP(forward, device_ids=[run.rt.dist.local_rank] if cuda else None)
    run.forward = forward


# ---------------------------------------------------------------------------------------------
# Resume: rank 0 decides and sends the state to the other ranks
# ---------------------------------------------------------------------------------------------


def _resumable_state(run: Run, fp: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """Rank 0: the saved state and its tensors if they continue this exact run, else None."""
    p, state_dir = run.p, run.paths.state_dir
    info = read_state_info(state_dir) if p.train.resume else None
    if info is None:
        if p.train.resume and (state_dir / STATE_JSON).is_file():  # there, but not readable
            warn(
                f"{state_dir / STATE_JSON}: unreadable or incomplete training state; starting fresh"
            )
        return None
    # The fingerprint of this run's params, for the model as the saved state trained it (its
    # vocab padding may be another machine's: load_state converts the padding rows).
    pad = info.get("vocab_pad_multiple", 1)
    made_here = (
        isinstance(pad, int)
        and 1 <= pad <= 2**20
        and info.get("fingerprint") == fingerprint(p, run.data_meta, run.rt.world_size, pad)
    )
    if not made_here:
        # The normal start of a new experiment (dvc exp run -S ...): a notice, not a warning.
        print(
            f"new params: training from step 0 ({state_dir} holds another params' run, "
            "replaced at this run's first save)",
            file=sys.stderr,
        )
        return None
    if info.get("step", 0) >= p.train.max_steps:
        return None  # a finished run is not resumed: re-running trains again
    return info, read_state_tensors(state_dir)


def resume(run: Run) -> TrainState:
    """The state to start from: the saved one when it continues this run, else a fresh one."""
    pad = run.cfg.vocab_pad_multiple
    fp = fingerprint(run.p, run.data_meta, run.rt.world_size, pad)
    found = _resumable_state(run, fp) if run.rt.is_main else None
    found = broadcast_object(found, run.rt.dist, run.rt.device)
    if found is None:
        return TrainState(fingerprint=fp, vocab_pad_multiple=pad)
    info, tensors = found
    state = load_state(run.paths.state_dir, run.model, run.optimizer, info, tensors)
    state.fingerprint, state.vocab_pad_multiple = fp, pad  # from now on, as trained here
    if run.rt.is_main:
        print(
            f"resuming from {run.paths.state_dir} at step {state.step}/{run.p.train.max_steps}",
            file=sys.stderr,
        )
    return state


# ---------------------------------------------------------------------------------------------
# One optimizer step, validation, logging
# ---------------------------------------------------------------------------------------------


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device copy; on CUDA from pinned memory without blocking the host."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


class StepBatches:
    """The token windows of each optimizer step, the next step's made while this one runs.

    Step s's rows are this process's micro-batches g = global_micro_index(s, m, ...) for
    m < grad_accum, concatenated: the recipe's data order, whatever the micro-batch split. A
    worker thread samples and pins step s + 1 while the device works on step s, and the copy is
    issued without blocking the host, so data loading stays off the critical path.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        self.next: tuple[int, Future[torch.Tensor]] | None = None

    def _host(self, step: int) -> torch.Tensor:
        t, d = self.run.p.train, self.run.rt.dist
        parts = []
        for micro in range(t.grad_accum):
            g = global_micro_index(step, micro, t.grad_accum, d.world_size, d.rank)
            parts.append(
                windows(
                    *sample_batch(
                        self.run.train_data,
                        t.batch_size,
                        t.block_size,
                        seed=self.run.p.seed,
                        step=g,
                    )
                )
            )
        rows = torch.cat(parts)
        return rows.pin_memory() if self.run.rt.device.type == "cuda" else rows

    def get(self, step: int) -> torch.Tensor:
        """Step `step`'s windows on the device, (batch_size x grad_accum, block_size + 1)."""
        if self.next is not None and self.next[0] == step:
            rows = self.next[1].result()
        else:
            rows = self._host(step)
        if step + 1 < self.run.p.train.max_steps:
            self.next = (step + 1, self.pool.submit(self._host, step + 1))
        return rows.to(self.run.rt.device, non_blocking=True)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def set_lr(optimizer: torch.optim.Optimizer, p: Params, step: int) -> float:
    t = p.train
    lr = lr_at(
        step,
        lr=t.lr,
        min_lr=t.min_lr,
        warmup_steps=t.warmup_steps,
        max_steps=t.max_steps,
        warmup_start_factor=t.warmup_start_factor,
    )
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr


def train_step(
    run: Run, step: int, rows: torch.Tensor, fault_hook: FaultHook | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward over `rows` in micro_batch passes, clip, step; returns (loss, grad norm).

    Each pass's mean loss is divided by the number of passes, so every split of the same rows
    gives the same gradient. Nothing here reads a value back to the host: loss and grad norm
    stay on the device, and a step whose loss or gradient is not finite is never applied
    (fused AdamW skips it on the device via found_inf; only the unfused path checks on the host).
    """
    rt, d = run.rt, run.rt.dist
    passes = rows.split(rt.micro_batch)
    loss_sum = torch.zeros((), device=rt.device)
    for i, w in enumerate(passes):
        no_sync = d.world_size > 1 and i < len(passes) - 1  # DDP: all-reduce after the last
        with run.forward.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
            with autocast(rt.precision, rt.device):
                _, loss = run.forward(w[:, :-1], w[:, 1:])
            if fault_hook is not None:
                loss = fault_hook(step, loss)
            (loss / len(passes)).backward()
        loss_sum += loss.detach().float()
    loss = loss_sum / len(passes)
    clip = run.p.train.grad_clip if run.p.train.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip).float()
    bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
    if rt.fused_adamw:
        run.optimizer.found_inf = bad.float()  # type: ignore[attr-defined]
        run.optimizer.step()
    elif not bad.item():
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


@torch.inference_mode()
def validate(run: Run) -> float:
    """Mean loss over the fixed validation rows, eval_batch_size rows per (compiled) pass.

    The rows already sit on the device and the loss is summed there: one host read at the end.
    """
    rows = run.val_windows
    run.eval_forward.eval()
    total = torch.zeros((), device=run.rt.device)
    for w in rows.split(run.rt.eval_batch_size):
        with autocast(run.rt.precision, run.rt.device):
            _, loss = run.eval_forward(w[:, :-1], w[:, 1:])
        total += loss.float() * len(w)  # every row has block_size targets: weight by rows
    run.eval_forward.train()
    return total.item() / len(rows)


def _fmt(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


class NonFinite:
    """The first step whose loss or gradient norm was not finite, kept on the device."""

    def __init__(self, device: torch.device) -> None:
        self.first = torch.full((3,), -1.0, device=device)  # step, loss, grad norm

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm)) & (self.first[0] < 0)
        # new_full, not torch.tensor(...): a tensor from Python data is a blocking host copy.
        now = torch.stack([loss.new_full((), float(step + 1)), loss, grad_norm])
        self.first = torch.where(bad, now, self.first)

    def check(self, run: Run, state: TrainState) -> None:
        """Host sync: raise if any step so far was not finite (its update was never applied)."""
        step, loss, gn = self.first.tolist()
        if step < 0:
            return
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        raise Gemma3Error(
            f"non-finite {what} at step {int(step)} (loss {loss}, grad norm {gn}); training "
            f"stopped without applying it; {checkpoint_status(run, state)}; "
            "lower train.lr or raise train.warmup_steps"
        )


def checkpoint_status(run: Run, state: TrainState) -> str:
    """What is true of checkpoints/best at this moment, for error messages."""
    best = run.paths.best_dir
    if state.best_step is not None:
        return f"{best} holds this run's best (step {state.best_step})"
    if best.exists():
        return f"{best} is the previous run's, left as it was"
    return f"no checkpoint was written to {best}"


def log_row(run: Run, state: TrainState, row: dict[str, Any], bar: Any) -> None:
    """Record one row: history, the DVC files (live), the tracker, the progress bar."""
    state.history.append(row)
    write_metrics(run, state)  # so `dvc exp show` / `dvc plots show` follow a running experiment
    if run.tracker is not None:
        names = {"train_loss": "loss/train", "val_loss": "loss/val", "lr": "lr"}
        names |= {"grad_norm": "grad_norm", "tokens_per_s": "tokens_per_s", "mfu": "mfu"}
        metrics = {names[k]: v for k, v in row.items() if k in names and v is not None}
        run.tracker.log_metrics(metrics, step=row["step"])
    if bar is not None:
        best = state.best_val_loss
        bar.set_postfix(
            loss=f"{row['train_loss']:.3f}",
            val=f"{best:.3f}" if best < math.inf else "-",
            lr=f"{row['lr']:.2e}",
            tok_s=f"{row['tokens_per_s']:.0f}",
            **({"mfu": f"{row['mfu']:.1%}"} if row["mfu"] is not None else {}),
        )


class Throughput:
    """Tokens/s and MFU over the steps since the last report (eval time excluded)."""

    def __init__(self, run: Run) -> None:
        t = run.p.train
        self.tokens_per_step = t.batch_size * t.block_size * t.grad_accum * run.rt.world_size
        self.block = t.block_size
        self.flops_per_token = run.cfg.flops_per_token(t.block_size)
        self.peak = peak_flops(run.rt.device)
        self.world = run.rt.world_size
        self.restart()

    def restart(self) -> None:
        self.t0, self.tokens = time.perf_counter(), 0

    def forward_rate(self, rows: int, seconds: float) -> dict[str, float | None]:
        """Validation tokens/s and MFU, counting forward FLOPs only (a third of training's)."""
        tps = rows * self.block / seconds if seconds > 0 else 0.0
        mfu = self.flops_per_token / 3 * tps / self.peak if self.peak else None
        return {"val_tokens_per_s": round(tps, 1), "val_mfu": _fmt(mfu)}

    def report(self) -> tuple[float, float | None]:
        elapsed = time.perf_counter() - self.t0
        tps = self.tokens / elapsed if elapsed > 0 else 0.0
        mfu = self.flops_per_token * tps / (self.peak * self.world) if self.peak else None
        self.restart()
        return round(tps, 1), _fmt(mfu)


def save_best(run: Run, state: TrainState, val: float, step: int) -> None:
    state.best_val_loss, state.best_step = val, step
    save_checkpoint(
        run.model,
        run.paths.best_dir,
        meta={
            "step": step,
            "val_loss": val,
            "mlflow_run_id": state.mlflow_run_id,
            "block_size": run.p.train.block_size,
            "data": {"eot": run.data_meta.get("eot"), "source": run.data_meta.get("source")},
            "training": training_summary(run),  # the model card's table
        },
    )


def training_summary(run: Run) -> dict[str, Any]:
    """The params that made this checkpoint, as the model card lists them."""
    t, rt = run.p.train, run.rt
    keys = ("max_steps", "batch_size", "block_size", "grad_accum", "lr", "min_lr", "warmup_steps")
    keys += ("weight_decay", "grad_clip")
    tokens = t.max_steps * t.batch_size * t.block_size * t.grad_accum * rt.world_size
    summary = {"seed": run.p.seed, **{k: getattr(t, k) for k in keys}}
    return summary | {"tokens": tokens, "precision": rt.precision, "world_size": rt.world_size}


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


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a resumable state at the end of the step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                previous[sig] = signal.signal(sig, self._handle)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        # A second Ctrl-C stops now. A repeated SIGTERM does not: killing `dvc repro`'s process
        # group sends one, and dvc's death another (exit_with_parent), to a trainer that should
        # save its state once, not die mid-step.
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def fit(run: Run, state: TrainState, fault_hook: FaultHook | None, bar: Any) -> None:
    t, rt = run.p.train, run.rt
    guard, speed, stop = NonFinite(rt.device), Throughput(run), StopFlag()
    batches = StepBatches(run)
    run.forward.train()
    with stop.installed(), contextlib.closing(batches):
        for step in range(state.step, t.max_steps):
            # ---- one optimizer step (lr set from the schedule first); no host sync ----
            lr = set_lr(run.optimizer, run.p, step)
            loss, grad_norm = train_step(run, step, batches.get(step), fault_hook)
            guard.record(step, loss, grad_norm)
            done, speed.tokens = step + 1, speed.tokens + speed.tokens_per_step
            last = done == t.max_steps
            evaluating = done % t.eval_interval == 0 or last
            due = evaluating or done % t.checkpoint_interval == 0 or done % t.log_interval == 0
            # Alone: stop after this step. Under DDP ranks agree at report steps (no extra sync).
            asked = stop.signum is not None
            stopping = any_rank(asked, rt.dist, rt.device) if due else asked and not rt.dist.active
            saving = done % t.checkpoint_interval == 0 or last or stopping
            logging = due or stopping
            # ---- report: the only host syncs; nothing is saved past a non-finite step ----
            if logging:
                guard.check(run, state)
                if rt.device.type == "cuda":
                    torch.cuda.synchronize()
                tps, mfu = speed.report()
                train_loss = all_reduce_mean(loss, rt.dist).item()
                row = {"step": done, "train_loss": _fmt(train_loss), "val_loss": None, "lr": lr}
                row |= {"grad_norm": _fmt(grad_norm.item()), "tokens_per_s": tps, "mfu": mfu}
            # ---- validate, keep the best ----
            if evaluating:
                started = time.perf_counter()
                val = validate(run)  # ends in a host read: the device is done when it returns
                row |= speed.forward_rate(len(run.val_windows), time.perf_counter() - started)
                row["val_loss"] = _fmt(val)
                if val < state.best_val_loss and rt.is_main:
                    save_best(run, state, val, done)
                speed.restart()  # eval time is not training throughput
            if logging and rt.is_main:
                log_row(run, state, row, bar)
            if bar is not None:
                bar.update(1)
            # ---- resumable state ----
            state.step = done
            if saving and rt.is_main:
                save_state(run.paths.state_dir, run.model, run.optimizer, state)
            if stopping:
                raise KeyboardInterrupt(
                    f"stopped at step {done}; training state saved to {run.paths.state_dir}, "
                    "re-run to resume"
                )


def train_metrics(run: Run, state: TrainState) -> dict[str, Any]:
    """The `train` section of metrics/train.json, as of the last logged step."""
    t, rt = run.p.train, run.rt
    last = state.history[-1] if state.history else {}
    steps = last.get("step", state.step)
    best = state.best_val_loss
    return {
        "best_val_loss": _fmt(best) if best < math.inf else None,
        "best_step": state.best_step,
        "final_train_loss": last.get("train_loss"),
        "final_val_loss": last.get("val_loss"),
        "steps": steps,
        "tokens": steps * t.batch_size * t.block_size * t.grad_accum * rt.world_size,
        "tokens_per_s": last.get("tokens_per_s"),
        "mfu": last.get("mfu"),
        "val_tokens_per_s": last.get("val_tokens_per_s"),
        "val_mfu": last.get("val_mfu"),
        "micro_batch": rt.micro_batch,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(rt.device) / 2**30, 2)
        if rt.device.type == "cuda"
        else None,
        "device": str(rt.device),
        "precision": rt.precision,
        "world_size": rt.world_size,
        "params": run.cfg.param_counts()["total"],
    }


def write_metrics(run: Run, state: TrainState) -> dict[str, Any]:
    """metrics/train.json and the plots, atomically: namespaced so `dvc exp show` reads
    `train.best_val_loss`, ... and `mlflow.run_id` (the one place the run id appears)."""
    metrics = train_metrics(run, state)
    doc: dict[str, Any] = {"train": metrics}
    if state.mlflow_run_id:
        doc["mlflow"] = {"run_id": state.mlflow_run_id}
    atomic_write_json(run.paths.metrics, doc)
    _write_plots(run.paths.plots, state.history)
    return metrics


def finish(run: Run, state: TrainState) -> dict[str, Any]:
    """Rank 0: metrics/train.json, the plot, the tracker's last words; returns the metrics."""
    t = run.p.train
    if state.best_step is None or not run.paths.best_dir.exists():
        # Resumed after checkpoints/best was deleted: the final weights are all we have.
        warn(f"{run.paths.best_dir} was missing; saving the final weights as the checkpoint")
        save_best(run, state, validate(run), t.max_steps)
    metrics = write_metrics(run, state)
    if run.tracker is not None:
        run.tracker.retry()  # a tracking failure mid-run: the end is tried once more
        run.tracker.log_best(run.paths.best_dir, state.best_val_loss, state.best_step)
        run.tracker.finish()
    return {**metrics, "mlflow_run_id": state.mlflow_run_id}


def start_tracker(run: Run, state: TrainState, factory: TrackerFactory | None) -> None:
    if factory is None or not run.rt.is_main:
        return
    run.tracker = factory(state.mlflow_run_id, run.rt, run.cfg)
    if run.tracker is not None and state.step == 0:
        rt = run.rt
        runtime = {"device": str(rt.device), "precision": rt.precision, "world_size": rt.world_size}
        run.tracker.log_params({**run.p.to_dict(), "runtime": runtime})
    state.mlflow_run_id = getattr(run.tracker, "run_id", None)


def _is_peer_loss(e: RuntimeError) -> bool:
    """A collective that failed because another rank is gone (gloo: "Connection closed by
    peer"; NCCL: a DistBackendError), as opposed to a bug on this rank."""
    backend_error = getattr(dist, "DistBackendError", ())
    words = ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL")
    return isinstance(e, backend_error) or any(w in str(e) for w in words)


@contextlib.contextmanager
def peers_alive(rt: Runtime, state: TrainState, state_dir: Path) -> Iterator[None]:
    """Under torchrun, a rank killed with -9 (or by the OOM killer) makes the others' next
    collective fail with a backend traceback; they say so in one line instead, naming the rank
    when it is knowable (of two, the other one) and the step, and exit 1 (not the input's fault).
    """
    try:
        yield
    except RuntimeError as e:
        if not (rt.dist.active and _is_peer_loss(e)):
            raise
        who = f"rank {1 - rt.dist.rank}" if rt.world_size == 2 else "a peer process"
        raise Gemma3EnvironmentError(
            f"{who} of {rt.world_size} is gone (it died or was killed) during step "
            f"{state.step + 1}; rank {rt.dist.rank} stopped too: re-run to resume from the last "
            f"training state saved in {state_dir}"
        ) from None


@contextlib.contextmanager
def memory_suffices(run: Run, state: TrainState) -> Iterator[None]:
    """A micro-batch or validation batch too big for the device (check_trainable only covers
    the weights and optimizer) is one line naming the setting and a value to try, not a CUDA
    traceback. Nothing is saved after it: the last saved state is what a re-run resumes from."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise Gemma3EnvironmentError(out_of_memory(run, state, e)) from None


def out_of_memory(run: Run, state: TrainState, e: BaseException) -> str:
    """What to change after an out-of-memory error in a training pass or in validation (known
    from whether `validate` is on the traceback's stack): half the batch that failed, kept to a
    divisor of the optimizer step's rows for training, so the step stays the same."""
    t, rt = run.p.train, run.rt
    validating = any(f.f_code is validate.__code__ for f, _ in traceback.walk_tb(e.__traceback__))
    if validating:
        where = f"validating after step {state.step + 1}"
        knob, batch = "train.eval_batch_size", rt.eval_batch_size
        advice = f"set {knob} to a smaller value, e.g. {batch // 2} (the loss is the same)"
    else:
        rows = t.batch_size * t.grad_accum
        where = f"in step {state.step + 1}"
        knob, batch = "train.micro_batch", rt.micro_batch
        advice = (
            f"set {knob} to a smaller divisor of batch_size x grad_accum = {rows}, e.g. "
            f"{largest_divisor(rows, batch // 2)} (the optimizer step stays the same)"
        )
    if batch == 1:  # no smaller split: the model itself (or the window) must shrink
        return (
            f"out of {rt.device.type.upper()} memory {where}: even one row of "
            f"block_size {t.block_size} per pass ({knob} 1) does not fit; use a smaller model, "
            "a shorter train.block_size or a device with more memory (each starts a new run)"
        )
    saved = read_state_info(run.paths.state_dir)
    resume = f"step {saved['step']}" if saved else "step 0 (no state saved yet)"
    return (
        f"out of {rt.device.type.upper()} memory {where} at {knob} {batch} x block_size "
        f"{t.block_size}: {advice}; a re-run resumes from {resume}"
    )


@contextlib.contextmanager
def tracker_ends_with(run: Run) -> Iterator[None]:
    """The MLflow run ends as training did: FAILED on an error, KILLED when stopped (Ctrl-C,
    SIGTERM: the state is saved to resume); `finish` ends it FINISHED."""
    try:
        yield
    except BaseException as e:
        if run.tracker is not None:
            run.tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise


def train(
    p: Params,
    paths: TrainPaths,
    *,
    tracker_factory: TrackerFactory | None = None,
    progress: bool = True,
    fault_hook: FaultHook | None = None,
) -> dict[str, Any]:
    """Train from params; returns the metrics also written to `paths.metrics` ({} off rank 0).

    `tracker_factory(run_id, runtime, cfg)` returns an experiment tracker (or None); `run_id` is
    the run to continue when resuming. `fault_hook(step, loss)` lets tests inject faults.
    """
    rt = resolve_runtime(p, Dist.from_env())
    created = init_process_group(rt.dist, rt.device)
    busy = "another trainer is writing here (it holds the lock); wait for it or stop it"
    lock = exclusive_lock(paths.best_dir.parent, busy) if rt.is_main else contextlib.nullcontext()
    try:
        with lock:
            run = setup(p, paths, rt)
            state = resume(run)
            start_tracker(run, state, tracker_factory)
            with tracker_ends_with(run):
                wrap_model(run)
                bar = None
                if progress and rt.is_main:
                    from tqdm import tqdm

                    bar = tqdm(
                        total=p.train.max_steps, initial=state.step, desc="train", unit="step"
                    )
                # The bar is closed however the loop ends, so an error starts on a line of its own.
                with bar if bar is not None else contextlib.nullcontext():
                    with peers_alive(rt, state, paths.state_dir), memory_suffices(run, state):
                        fit(run, state, fault_hook, bar)
                return finish(run, state) if rt.is_main else {}
    finally:
        if created:
            dist.destroy_process_group()
