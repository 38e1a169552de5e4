"""The precision policy and the GPU-minded paths, exercised on CPU: bf16 autocast, torch.compile
of the training step, fused AdamW, the padded lm head, the batch transfer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gemma3 import runtime
from gemma3.config import Config
from gemma3.evaluate import evaluate_tokens
from gemma3.model import Gemma3ForCausalLM
from gemma3.params import load_params
from gemma3.train import to_device, train
from tests.project import patterned_tokens, run_stage
from tests.test_train import make_project, paths


@pytest.mark.parametrize(
    ("flags", "native"),
    [("fpu sse avx512f avx512_bf16 amx_tile", True), ("fpu amx_bf16", True), ("fpu avx2", False)],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, flags: str, native: bool) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\n", encoding="utf-8")
    assert runtime.cpu_has_native_bf16(str(info)) is native


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_autocast_where_bf16_is_native(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda *a: native)
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert runtime.resolve_precision("auto", cpu) == ("bf16-autocast" if native else "fp32")
    assert runtime.resolve_precision("auto", cuda) == "bf16-autocast"
    assert runtime.resolve_precision("auto", mps) == "fp32"
    for explicit in ("fp32", "bf16-autocast", "bf16-pure"):
        assert runtime.resolve_precision(explicit, cpu) == explicit


def test_train_writes_the_precision_it_used(tmp_path: Path) -> None:
    root = make_project(tmp_path, train={"max_steps": 2, "warmup_steps": 1})
    run_stage(root, "train")
    metrics = json.loads((root / "metrics/train.json").read_text())["train"]
    assert metrics["precision"] == runtime.resolve_precision("auto", torch.device("cpu"))


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The fp32 reference run both bf16 cases compare with (the same run: trained once)."""
    root = make_project(tmp_path_factory.mktemp("fp32"), train={"precision": "fp32"})
    return train(load_params(root / "params.yaml"), paths(root), progress=False)


@pytest.mark.parametrize("precision", ["bf16-autocast", "bf16-pure"])
def test_bf16_training_learns_like_fp32(tmp_path: Path, precision: str, fp32_run: dict) -> None:
    root = make_project(tmp_path / precision, train={"precision": precision})
    results = {"fp32": fp32_run}
    results[precision] = train(load_params(root / "params.yaml"), paths(root), progress=False)
    assert results[precision]["precision"] == precision
    assert results[precision]["best_val_loss"] < math.log(512) - 1.0
    assert results[precision]["best_val_loss"] == pytest.approx(
        results["fp32"]["best_val_loss"], rel=0.05
    )


def test_compiled_training_step_matches_eager(tmp_path: Path) -> None:
    # One layer of each type keeps inductor's compile short; the step is the same code.
    small = {
        "overrides": {
            "vocab_size": 512,
            "n_layers": 2,
            "layer_types": ["sliding_attention", "full_attention"],
        }
    }
    out, norms, val = {}, {}, {}
    for compiled in (False, True):
        # Two accumulation passes per step, and validation (its own compiled graph, inference
        # mode, 12 rows in passes of 5, 5 and 2) at the last step.
        t = {"max_steps": 2, "warmup_steps": 1, "log_interval": 1, "compile": compiled}
        t |= {"grad_accum": 2, "eval_batches": 3, "eval_batch_size": 5}
        root = make_project(tmp_path / str(compiled), model=small, train=t)
        metrics = train(load_params(root / "params.yaml"), paths(root), progress=False)
        rows = [r.split(",") for r in (root / "plots/train.csv").read_text().split()[1:]]
        out[compiled] = [float(r[1]) for r in rows]  # train loss
        norms[compiled] = [float(r[4]) for r in rows]  # gradient norm before clipping
        val[compiled] = metrics["final_val_loss"]
    assert len(out[True]) == 2 and metrics["steps"] == 2
    assert out[True] == pytest.approx(out[False], abs=2e-3)
    assert norms[True] == pytest.approx(norms[False], rel=5e-3)  # bf16 autocast where native
    assert val[True] == pytest.approx(val[False], abs=2e-3)


def test_fused_adamw_matches_the_foreach_implementation(tmp_path: Path) -> None:
    sd = {}
    for fused in (True, False):
        root = make_project(tmp_path / str(fused), train={"max_steps": 5, "fused_adamw": fused})
        train(load_params(root / "params.yaml"), paths(root), progress=False)
        sd[fused] = load_file(str(root / "checkpoints/state/state.safetensors"))
    assert sd[True].keys() == sd[False].keys()
    assert max((sd[True][k] - sd[False][k]).abs().max().item() for k in sd[True]) <= 1e-5


def test_padded_lm_head_changes_nothing_a_user_sees(tmp_path: Path) -> None:
    cfg = Config.from_name("gemma3-tiny", vocab_size=500)
    plain = Gemma3ForCausalLM(cfg)
    padded = Gemma3ForCausalLM(cfg.replace(vocab_pad_multiple=64))
    assert padded.lm_head.weight.shape[0] == 512
    with torch.no_grad():
        for name, p in padded.named_parameters():
            src = plain.state_dict()[name]
            p.zero_()
            p[: src.shape[0]].copy_(src)
    idx = torch.randint(0, 500, (2, 24))
    a, _ = plain(idx[:, :-1])
    b, _ = padded(idx[:, :-1])
    assert b.shape[-1] == 500 and torch.allclose(a, b, atol=1e-5)
    _, loss_a = plain(idx[:, :-1], idx[:, 1:])
    _, loss_b = padded(idx[:, :-1], idx[:, 1:])
    assert loss_a.item() == pytest.approx(loss_b.item(), abs=1e-6)
    # Through training: the checkpoint holds exactly vocab_size rows.
    root = make_project(
        tmp_path,
        model={"overrides": {"vocab_size": 500}},
        train={"max_steps": 2, "warmup_steps": 1, "vocab_pad_multiple": 64},
    )
    train(load_params(root / "params.yaml"), paths(root), progress=False)
    w = load_file(str(root / "checkpoints/best/model.safetensors"))
    assert w["model.embed_tokens.weight"].shape[0] == 500


def test_batch_transfer_keeps_values() -> None:
    x = torch.arange(12).reshape(3, 4)
    assert torch.equal(to_device(x, torch.device("cpu")), x)
    if torch.cuda.is_available():  # the pinned, non-blocking path
        assert torch.equal(to_device(x, torch.device("cuda")).cpu(), x)


def test_evaluation_follows_the_precision_policy() -> None:
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Config.from_name("gemma3-tiny", vocab_size=512))
    data = np.asarray(patterned_tokens(600), dtype=np.uint16)
    kw = dict(block_size=32, batch_size=4, progress=False)
    fp32 = evaluate_tokens(model, data, precision="fp32", **kw)["loss"]
    bf16 = evaluate_tokens(model, data, precision="bf16-autocast", **kw)["loss"]
    assert bf16 != fp32  # autocast really ran
    assert bf16 == pytest.approx(fp32, rel=0.02)
