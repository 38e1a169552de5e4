"""Int8 weights for generation, computed at load time from any float checkpoint (no new format).

Every `nn.Linear` (the lm head included, tied or not) becomes an `Int8Linear`: per-output-channel
symmetric int8 weights, `w ~= scale[n] * q[n, :]` with `scale[n] = max|w[n, :]| / 127`, so each
weight is off by at most scale/2. The matmul is torch's own fbgemm/x86 dynamic-quantization kernel
(`quantized::linear_dynamic`): it quantizes each input tensor on the fly to 8 bits (one scale per
tensor, 7-bit range as fbgemm requires to avoid overflow), multiplies in int32 and rescales to
fp32. On this project's CPUs it measured the fastest int8 path at batch 1 and batch 16
(benchmarks/RESULTS.md, "Int8 kernels"); `aten._weight_int8pack_mm` (weight-only) was up to 2x
slower at batch 1 and 3-6x slower at batch 16. The embedding lookup stays in float: it is a gather
of one row per token, not a matmul, so int8 would save no time.

Activations are quantized per tensor, so the rows of one batch share a scale: a batched int8 row
can differ slightly from the same row alone (fp32 and bf16 rows are independent).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from gemma3.errors import Gemma3Error

QMAX = 127  # symmetric: -127..127 (the -128 code is never used)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale fp32 (N,)): per-row symmetric quantization, |w - scale*q| <= scale/2."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / QMAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """`nn.Linear` without bias whose weight is stored as int8 with one fp32 scale per output row.

    Inputs of any float dtype are computed in fp32 and returned in the input's dtype.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        if weight.device.type != "cpu":
            raise ValueError("int8 weights run on the CPU only (torch's fbgemm/x86 kernels)")
        self.out_features, self.in_features = weight.shape
        q, scale = quantize_weight(weight)
        self.register_buffer("scale", scale, persistent=False)
        with warnings.catch_warnings():  # quantized tensor types are deprecated (the kernel is not)
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(
                q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0
            )
            self._packed = torch.ops.quantized.linear_prepack(qweight, None)

    def int8_weight(self) -> torch.Tensor:
        """The stored int8 codes (N, K)."""
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.int_repr()

    def dequantized(self) -> torch.Tensor:
        """scale[n] * q[n, :] in fp32: the weight this layer multiplies by."""
        return self.int8_weight().float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._packed, True)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def check_int8_device(device: torch.device, source: str) -> None:
    """One-line error where the int8 kernels cannot run: off the CPU, or on a non-x86 CPU."""
    if device.type != "cpu":
        raise Gemma3Error(
            f"{source}: int8 runs on the CPU only (torch's x86 kernels), not on {device.type}; "
            "use fp32 or bf16 there, or --device cpu"
        )
    engines = torch.backends.quantized.supported_engines
    if not {"x86", "fbgemm"} & set(engines):
        raise Gemma3Error(f"{source}: int8 needs an x86 CPU (torch's fbgemm/x86 kernels)")


def is_int8(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def quantize_int8(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """`model` (or a copy) in fp32 with every `nn.Linear` replaced by an `Int8Linear`.

    A tied lm head gets its own int8 copy of the embedding matrix; the embedding stays fp32.
    """
    if is_int8(model):
        return model
    if not inplace:
        model = copy.deepcopy(model)
    model.float()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                if child.bias is not None:
                    raise ValueError(f"{name}: Int8Linear has no bias")
                setattr(parent, name, Int8Linear(child.weight))
    return model.eval()
