"""What "auto" means on this machine: the device, the precision, peak FLOPs, and the process group.

Training, evaluation, sampling and the CLI all resolve the device and the precision here, so one
setting (`train.device`, `train.precision`) means the same thing in every stage.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gemma3.errors import Gemma3Error

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


# ---- device ----------------------------------------------------------------------------------


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(requested: str, source: str = "params.yaml: train.device") -> torch.device:
    """The torch device for "auto", "cpu", "cuda", "cuda:N" or "mps"; `source` names the setting."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    usage = "use auto, cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise Gemma3Error(f"{source}: unknown device {requested!r}; {usage}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Gemma3Error(f"{source}: {requested!r} but no CUDA GPU is visible; use auto or cpu")
    if device.type == "mps" and not _mps_available():
        raise Gemma3Error(f"{source}: {requested!r} but MPS is not available; use auto or cpu")
    return device


# ---- precision -------------------------------------------------------------------------------


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX), where autocast pays off.

    Without it PyTorch emulates bf16 matmuls and autocast is slower than fp32.
    """
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(requested: str, device: torch.device) -> str:
    """ "auto" -> bf16-autocast on CUDA and on CPUs with native bf16, fp32 elsewhere."""
    from gemma3.params import PRECISIONS  # here: params needs pyyaml, inference must not

    if requested not in PRECISIONS:
        raise Gemma3Error(
            f"params.yaml: train.precision: must be one of {', '.join(PRECISIONS)}, got {requested!r}"
        )
    if requested != "auto":
        return requested
    native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    return "bf16-autocast" if native else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for a resolved precision (bf16-pure weights need none)."""
    if precision != "bf16-autocast":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def weight_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16-pure" else torch.float32


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a known GPU (for MFU); None elsewhere."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


# ---- processes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """This process's place under torchrun (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        e = os.environ
        return cls(
            int(e.get("RANK", "0")), int(e.get("WORLD_SIZE", "1")), int(e.get("LOCAL_RANK", "0"))
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()


def init_process_group(d: Dist, device: torch.device) -> bool:
    """Join torchrun's group (NCCL on CUDA, gloo elsewhere); True when this call created it."""
    if d.world_size <= 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of `x` over all ranks (x itself when run alone)."""
    if not d.active:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / d.world_size


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every rank when it is true on one: all ranks stop at the same step."""
    if not d.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: Any, d: Dist, device: torch.device) -> Any:
    """Rank 0's `obj` on every rank (tensors inside travel through the process group, not a file)."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device(device))
    return box[0]


PR_SET_PDEATHSIG = 1


def exit_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` when the parent (dvc, torchrun) dies, so no orphan keeps training.

    SIGTERM reaches the trainer's stop handler: it saves a resumable state and exits.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() == 1:  # the parent died before prctl: nobody will signal us
            os.kill(os.getpid(), sig)
