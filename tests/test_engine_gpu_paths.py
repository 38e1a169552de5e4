"""The GPU-minded training paths, checked on CPU (issue #19): the micro-batch split gives the same
optimizer step, fast validation gives the plain per-batch loss, and the hot loop reads nothing
back from the device between report steps."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from gemma3.data.tokens import fixed_batches, load_tokens
from gemma3.params import load_params
from gemma3.train import resolve_batches, resolve_runtime, setup, train, validate
from tests.project import REPO
from tests.test_train import make_project, paths

# ---- train.micro_batch: the same rows, the same step, for any split --------------------------


def _state(root: Path) -> dict[str, torch.Tensor]:
    sd = load_file(str(root / "checkpoints/state/state.safetensors"))
    return {k: v for k, v in sd.items() if k.startswith(("model.", "optim."))}


def _history(root: Path) -> list[float]:
    rows = (root / "plots/train.csv").read_text().split()[1:]
    return [float(v) for r in rows for v in r.split(",")[1:5] if v]  # loss, (val), lr, grad


@pytest.mark.parametrize("micro_batch", [32, 16])
def test_micro_batch_split_gives_the_same_optimizer_step(tmp_path: Path, micro_batch: int) -> None:
    # The reference is the recipe's own split: 8 sequences x 4 accumulation = 32 rows per step.
    # Two steps: AdamW's first update is about lr x sign(g) whatever the gradient's scale, so
    # the moments, the logged loss and the gradient norm are compared as well as the weights.
    # fp32: on a CPU with native bf16, auto would pick bf16 autocast, whose noise is larger.
    base = {"batch_size": 8, "grad_accum": 4, "max_steps": 2, "warmup_steps": 1}
    base |= {"precision": "fp32"}
    base |= {"log_interval": 1, "eval_interval": 2, "checkpoint_interval": 2}
    out = {}
    for mb in (8, micro_batch):
        root = make_project(tmp_path / str(mb), train={**base, "micro_batch": mb})
        metrics = train(load_params(root / "params.yaml"), paths(root), progress=False)
        assert metrics["micro_batch"] == mb
        out[mb] = (_state(root), _history(root))
    ref, split = out[8], out[micro_batch]
    assert ref[0].keys() == split[0].keys() and len(ref[0]) > 10
    # The moments element by element. The weights by their RMS difference: AdamW's first steps
    # move each weight by about lr x g / (|g| + eps), so a weight whose gradient is of the order
    # of eps (or cancels out) moves by a different fraction of a step under another summation
    # order (the split, the thread count); 3.6e-6 at lr 3e-3 was seen on one element with one
    # thread. A split that changed the gradient would move most weights by a fraction of lr.
    lr = load_params(root / "params.yaml").train.lr
    for k, v in ref[0].items():
        if k.startswith("model."):
            rms = (split[0][k] - v).double().square().mean().sqrt().item()
            assert rms <= 1e-3 * lr, f"{k}: RMS difference {rms:.3g} > 1e-3 x lr"
        else:
            torch.testing.assert_close(
                split[0][k], v, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
            )
    assert split[1] == pytest.approx(ref[1], rel=1e-5)


def test_auto_split_keeps_the_recipe_on_cpu_and_fills_a_gpu() -> None:
    seed = dataclasses.replace(
        load_params(REPO / "params.yaml").train,
        batch_size=32,
        grad_accum=32,
        block_size=128,
        eval_batches=500,
    )
    # Hand-computed: 1,024 rows per step; 32,768 tokens / 128 = 256 rows per pass on CUDA, and
    # validation's 16,000 rows in passes of the largest divisor <= 512.
    assert resolve_batches(seed, cuda=False) == (32, 32)
    assert resolve_batches(seed, cuda=True) == (256, 500)
    long = dataclasses.replace(seed, block_size=512)
    assert resolve_batches(long, cuda=True) == (64, 128)
    big = dataclasses.replace(seed, batch_size=512, grad_accum=2)  # over the budget: kept
    assert resolve_batches(big, cuda=True) == (512, 1024)  # 256,000 rows: 1,024 divides them
    odd = dataclasses.replace(seed, batch_size=3, grad_accum=7, eval_batches=5)  # 21 rows: 1,3,7,21
    assert resolve_batches(odd, cuda=True) == (21, 15)
    given = dataclasses.replace(seed, micro_batch=64, eval_batch_size=1000)
    assert resolve_batches(given, cuda=True) == (64, 1000)


# ---- validation: large passes, summed on the device, equal to the plain per-batch loss --------


@pytest.mark.parametrize("eval_batch_size", ["auto", 5, 24])  # 24 rows: 5 leaves a pass of 4
def test_fast_validation_matches_the_per_batch_reference(
    tmp_path: Path, eval_batch_size: Any
) -> None:
    train_ = {"batch_size": 4, "eval_batches": 6, "eval_batch_size": eval_batch_size}
    train_ |= {"precision": "fp32"}  # the reference runs without autocast
    root = make_project(tmp_path, train=train_)
    p = load_params(root / "params.yaml")
    run = setup(p, paths(root), resolve_runtime(p))
    # Reference: the validation batches as sampled, one plain eager forward each, mean of means
    # (every batch has batch_size x block_size targets, so that is the mean over all tokens).
    val = load_tokens(paths(root).data_dir / "validation.bin", vocab_size=512, min_tokens=33)
    batches = fixed_batches(val, 6, 4, p.train.block_size, p.seed)
    with torch.no_grad():
        ref = sum(run.model(x, y)[1].item() for x, y in batches) / len(batches)
    assert validate(run) == pytest.approx(ref, rel=1e-5)
    assert run.model.training  # validation hands the model back in training mode


# ---- host reads in the hot loop -------------------------------------------------------------


READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__}
READS |= {torch.Tensor.__bool__, torch.Tensor.__index__}


def _called_from_gemma3() -> bool:
    """Whether the nearest caller outside torch (and this file) is the project's code: torch's
    own one-time lazy set-up, wherever it falls, is not the loop's doing."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if f"{os.sep}torch{os.sep}" not in name and name != __file__:
            return f"{os.sep}gemma3{os.sep}" in name
        frame = frame.f_back
    return False


class HostReads(TorchDispatchMode):
    """Counts what makes the host wait for a CUDA device: reading a device value back, from
    Python (`reads`: item, tolist, float(t), bool(t), ...) or inside torch (`native_reads`:
    `_local_scalar_dense` at dispatch, which inference mode hides), and
    `torch.tensor(data, device=...)` (a blocking copy from pageable host memory), the model's
    forward included."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = self.native_reads = self.copies = 0
        outer = self

        class Copies(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
                kwargs = kwargs or {}
                if func in READS or func in (torch.tensor, torch.as_tensor) and "device" in kwargs:
                    if _called_from_gemma3():
                        outer.reads += func in READS
                        outer.copies += func not in READS
                return func(*args, **kwargs)

        self.function_mode = Copies()

    def __enter__(self) -> HostReads:
        self.function_mode.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.function_mode.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.native_reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def _count_host_reads(tmp_path: Path, steps: int, monkeypatch: pytest.MonkeyPatch) -> HostReads:
    import gemma3.train as engine

    # One report (log, eval, checkpoint) at the last step only: every other step is hot.
    t = {"max_steps": steps, "warmup_steps": 1, "grad_accum": 2}
    t |= {"log_interval": steps, "eval_interval": steps, "checkpoint_interval": steps}
    root = make_project(tmp_path / str(steps), train=t)
    counted: list[HostReads] = []
    fit = engine.fit

    def counting_fit(run, state, fault_hook, bar):  # noqa: ANN001, ANN202
        counted.append(HostReads())
        with counted[0]:
            fit(run, state, fault_hook, bar)

    with monkeypatch.context() as patched:  # undone after this run: the next wraps the real fit
        patched.setattr(engine, "fit", counting_fit)
        train(load_params(root / "params.yaml"), paths(root), progress=False)
    return counted[0]


def test_hot_steps_read_nothing_back_from_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The invariant: host reads happen at report steps only, so 4 and 12 steps with one report
    # each read back the same number of values. (A first run in the process warms lazy state.)
    _count_host_reads(tmp_path / "warm", 2, monkeypatch)
    short = _count_host_reads(tmp_path, 4, monkeypatch)
    long = _count_host_reads(tmp_path, 12, monkeypatch)
    assert short.reads >= 4  # the report's: train loss, grad norm, the guard, validation
    assert (long.reads, long.copies) == (short.reads, short.copies)


def test_validation_reads_back_once_however_many_passes(tmp_path: Path) -> None:
    root = make_project(tmp_path, train={"batch_size": 4, "eval_batches": 6, "eval_batch_size": 1})
    p = load_params(root / "params.yaml")
    run = setup(p, paths(root), resolve_runtime(p))
    with HostReads() as counter:
        validate(run)  # 24 passes of one row
    assert (counter.reads, counter.copies) == (1, 0)
