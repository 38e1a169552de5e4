"""The GPU-minded training paths, checked on CPU (issue #19): the micro-batch split gives the same
optimizer step, fast validation gives the plain per-batch loss, and the hot loop reads nothing
back from the device between report steps."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
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


def _history(root: Path) -> list[list[float]]:
    rows = (root / "plots/train.csv").read_text().split()[1:]
    return [[float(v) for v in r.split(",")[1:5] if v] for r in rows]  # loss, (val), lr, grad


@pytest.mark.parametrize("micro_batch", [32, 16])
def test_micro_batch_split_gives_the_same_optimizer_step(tmp_path: Path, micro_batch: int) -> None:
    # The reference is the recipe's own split: 8 sequences x 4 accumulation = 32 rows per step.
    # Two steps: AdamW's first update is about lr x sign(g) whatever the gradient's scale, so
    # the moments, the logged loss and the gradient norm are compared as well as the weights.
    base = {"batch_size": 8, "grad_accum": 4, "max_steps": 2, "warmup_steps": 1}
    base |= {"log_interval": 1, "eval_interval": 2, "checkpoint_interval": 2}
    out = {}
    for mb in (8, micro_batch):
        root = make_project(tmp_path / str(mb), train={**base, "micro_batch": mb})
        metrics = train(load_params(root / "params.yaml"), paths(root), progress=False)
        assert metrics["micro_batch"] == mb
        out[mb] = (_state(root), _history(root))
    ref, split = out[8], out[micro_batch]
    assert ref[0].keys() == split[0].keys() and len(ref[0]) > 10
    for k, v in ref[0].items():
        torch.testing.assert_close(split[0][k], v, rtol=1e-4, atol=1e-6, msg=k)
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
    big = dataclasses.replace(seed, batch_size=512, grad_accum=2)  # already over the budget
    assert resolve_batches(big, cuda=True) == (512, 500)
    odd = dataclasses.replace(seed, batch_size=3, grad_accum=7, eval_batches=5)  # 21 rows: 1,3,7,21
    assert resolve_batches(odd, cuda=True) == (21, 15)
    given = dataclasses.replace(seed, micro_batch=64, eval_batch_size=1000)
    assert resolve_batches(given, cuda=True) == (64, 1000)


# ---- validation: large passes, summed on the device, equal to the plain per-batch loss --------


@pytest.mark.parametrize("eval_batch_size", ["auto", 3, 4, 24])
def test_fast_validation_matches_the_per_batch_reference(
    tmp_path: Path, eval_batch_size: Any
) -> None:
    train_ = {"batch_size": 4, "eval_batches": 6, "eval_batch_size": eval_batch_size}
    root = make_project(tmp_path, train=train_)
    p = load_params(root / "params.yaml")
    run = setup(p, paths(root), resolve_runtime(p))
    # Reference: the validation batches as sampled, one plain eager forward each, mean of means
    # (every batch has batch_size x block_size targets, so that is the mean over all tokens).
    val = load_tokens(paths(root).data_dir / "validation.bin", vocab_size=512)
    batches = fixed_batches(val, 6, 4, p.train.block_size, p.seed)
    with torch.no_grad():
        ref = sum(run.model(x, y)[1].item() for x, y in batches) / len(batches)
    assert validate(run) == pytest.approx(ref, rel=1e-5)
    assert run.model.training  # validation hands the model back in training mode


# ---- host reads in the hot loop -------------------------------------------------------------


class HostReads(TorchDispatchMode):
    """Counts what forces a host sync on CUDA: reading a device value (item, float, bool: all
    `_local_scalar_dense`) and making a tensor from Python data outside the model's forward
    (`torch.tensor(x, device=cuda)` is a blocking host->device copy)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.reads = self.fresh = 0
        self.in_model = False
        model.register_forward_pre_hook(lambda *_: setattr(self, "in_model", True))
        model.register_forward_hook(lambda *_: setattr(self, "in_model", False))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        elif func is torch.ops.aten.lift_fresh.default and not self.in_model:
            self.fresh += 1
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
        counted.append(HostReads(run.model))
        with counted[0]:
            fit(run, state, fault_hook, bar)

    monkeypatch.setattr(engine, "fit", counting_fit)
    train(load_params(root / "params.yaml"), paths(root), progress=False)
    return counted[0]


def test_hot_steps_read_nothing_back_from_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The invariant: host reads happen at report steps only, so 4 and 12 steps with one report
    # each read back the same number of values.
    short = _count_host_reads(tmp_path, 4, monkeypatch)
    long = _count_host_reads(tmp_path, 12, monkeypatch)
    assert short.reads > 0  # the counter sees the report's reads
    assert (long.reads, long.fresh) == (short.reads, short.fresh)
