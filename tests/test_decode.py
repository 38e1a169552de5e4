"""The fixed-shape decode path (StaticKVCache) against the eager cache, and int8 generation
against references built from the dequantized weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gemma3.generation as gen
from gemma3.errors import Gemma3Error
from gemma3.generation import generate
from gemma3.hf import load_checkpoint, save_checkpoint
from gemma3.quant import Int8Linear, check_int8_device, quantize_int8, quantize_weight
from gemma3.tokenizer import EOT_ID, decode, encode
from tests.project import REPO, env
from tests.test_generate import GEN
from tests.test_hf_parity import random_model

PROMPTS = [
    encode("Once upon a time"),
    encode("The dog ran to the big red ball and then it"),
    [42],
]


@pytest.fixture(scope="module")
def model():
    return random_model(GEN, seed=3)


# ---- static cache ----------------------------------------------------------------------------


def test_static_cache_greedy_equals_eager_past_the_window_with_left_padding(model) -> None:
    n_new = 3 * GEN.sliding_window * 4  # the window (4) is passed many times
    eager = generate(model, PROMPTS, n_new, temperature=0, stop_token=None, static=False)
    static = generate(model, PROMPTS, n_new, temperature=0, stop_token=None, static=True)
    alone = [
        generate(model, [p], n_new, temperature=0, stop_token=None, static=True)[0] for p in PROMPTS
    ]
    assert static == eager
    assert alone == eager
    assert len({tuple(r) for r in eager}) == 3 and all(len(r) == n_new for r in eager)


def test_static_cache_reused_between_calls_gives_the_same_tokens(model) -> None:
    """A second call of the same shape reuses the held buffers; nothing of the first leaks."""
    a = generate(model, PROMPTS, 20, temperature=0, stop_token=None, static=True)
    other = [encode("A cat sat"), [7, 8], [9]]
    generate(model, other, 20, temperature=0, stop_token=None, static=True)
    assert generate(model, PROMPTS, 20, temperature=0, stop_token=None, static=True) == a


def test_static_step_compiles_as_one_graph(model, monkeypatch) -> None:
    """The one-token step traces into one graph (what CUDA graphs need): fullgraph=True would
    raise at a graph break. aot_eager traces and functionalizes without inductor's C++ build."""
    real = torch.compile
    monkeypatch.setattr(gen, "_COMPILED", type(gen._COMPILED)())
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="aot_eager", **kw))
    torch._dynamo.reset()
    n_new = 3 * GEN.sliding_window + 3
    eager = generate(model, PROMPTS, n_new, temperature=0, stop_token=None, static=False)
    with torch._dynamo.config.patch(error_on_recompile=False):
        compiled = generate(model, PROMPTS, n_new, temperature=0, stop_token=None, compile=True)
    assert compiled == eager
    torch._dynamo.reset()


def test_rows_stop_at_their_own_stop_token_with_and_without_streaming(model) -> None:
    """Without streaming the stop is checked every few steps; rows come out the same."""
    free = generate(model, PROMPTS, 30, temperature=0, stop_token=None)
    stop = free[1][4]  # the 5th token of row 1 ends that row
    steps: list[list[int | None]] = []
    streamed = generate(model, PROMPTS, 30, temperature=0, stop_token=stop, on_step=steps.append)
    quiet = generate(model, PROMPTS, 30, temperature=0, stop_token=stop)
    want = [r[: r.index(stop) + 1] if stop in r else r for r in free]
    assert streamed == quiet == want
    assert [s[1] for s in steps][: len(want[1])] == want[1]
    assert all(s[1] is None for s in steps[len(want[1]) :])


# ---- int8 ------------------------------------------------------------------------------------


def test_int8_round_trip_is_within_half_a_step_per_channel() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 48) * torch.logspace(-3, 0, 64)[:, None]  # rows of very different size
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    assert torch.equal(q.abs().amax(dim=1), torch.full((64,), 127, dtype=torch.int8))
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()
    assert torch.equal(Int8Linear(w).int8_weight(), q)


def test_int8_linear_is_within_the_activation_rounding_bound() -> None:
    """The kernel quantizes its input per tensor to 7 bits (128 levels over [min(x,0), max(x,0)]),
    so each input is off by at most s/2 (s = range/127) and output n by at most
    s/2 * sum_k |w_hat[n, k]|, with w_hat the dequantized weight; the int32 sums are exact."""
    torch.manual_seed(1)
    w = torch.randn(96, 80) * 0.05
    layer = Int8Linear(w)
    w_hat = layer.dequantized()
    for x in (torch.randn(3, 5, 80), torch.randn(1, 80).abs() * 4):
        s = (x.max().clamp(min=0) - x.min().clamp(max=0)) / 127
        bound = s / 2 * w_hat.abs().sum(dim=1)  # (96,)
        err = (layer(x) - x @ w_hat.T).abs()
        assert (err <= bound * (1 + 1e-4) + 1e-6).all()
        assert err.max() > 0  # activations really were rounded (the bound is not vacuous)


def _fake_quantized_reference(model):
    """An fp32 float model with the int8 model's dequantized weights in every linear layer and
    each linear input rounded as the kernel does (per tensor, 7-bit, asymmetric)."""
    q8 = quantize_int8(model)
    ref = random_model(model.config)  # float modules, weights overwritten below
    ref.load_state_dict(model.state_dict())
    names = dict(q8.named_modules())
    for name, m in ref.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.weight = torch.nn.Parameter(names[name].dequantized())

            def hook(_mod, args):
                (x,) = args
                lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
                s = (hi - lo) / 127
                zp = torch.round(-lo / s).clamp(0, 127)
                return ((torch.round(x / s) + zp).clamp(0, 127) - zp) * s

            m.register_forward_pre_hook(hook)
    return q8, ref


@pytest.mark.parametrize("tie", [True, False])
def test_int8_logits_match_the_dequantized_reference(tie) -> None:
    """The same integer math in fp32: what is left is float rounding of the scales and sums
    (measured ~1e-6 of the logits' spread), so 1e-4 of it holds with room and catches a change
    of the rounding (the kernel without its 7-bit activation range was off by ~0.6 of it)."""
    model = random_model(GEN.replace(tie_embeddings=tie), seed=4)
    q8, ref = _fake_quantized_reference(model)
    idx = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        got, want, plain = q8(idx)[0], ref(idx)[0], model(idx)[0]
    assert (got - want).abs().max() <= 1e-4 * want.std()
    # and the int8 model is close to, but not, the float model
    cos = torch.nn.functional.cosine_similarity(got.flatten(), plain.flatten(), dim=0)
    assert 0 < (got - plain).abs().max() and cos > 0.95
    assert isinstance(q8.lm_head, Int8Linear)
    assert q8.model.embed_tokens.weight.dtype == torch.float32  # a gather, kept in float


def test_int8_generate_quantizes_a_copy(model) -> None:
    p = [encode("Once upon a time there was a pumpkin.")]
    kw = dict(temperature=0, stop_token=None)
    got = generate(model, p, 30, dtype=torch.int8, **kw)
    assert isinstance(model.lm_head, torch.nn.Linear)  # the caller's model is untouched
    assert got == generate(quantize_int8(model), p, 30, **kw)
    # (How closely int8 text follows fp32 is measured on a trained checkpoint, RESULTS.md: on
    # random weights the logits are nearly flat and any rounding changes the argmax.)


def test_int8_refuses_other_devices_in_one_line() -> None:
    with pytest.raises(Gemma3Error, match="int8 runs on the CPU only"):
        check_int8_device(torch.device("cuda"), "--dtype int8")


@pytest.mark.parametrize(
    "overrides",
    [
        {"tie_embeddings": True},
        {"tie_embeddings": False},
        {"tie_embeddings": True, "vocab_pad_multiple": 64},
    ],
    ids=["tied", "untied", "padded-vocab"],
)
def test_cli_int8_loads_any_checkpoint(overrides, tmp_path: Path) -> None:
    model = random_model(GEN.replace(**overrides), seed=6)
    d = save_checkpoint(model, tmp_path / "ckpt")
    prompt = "The dog was sad because"
    proc = subprocess.run(
        [sys.executable, "-m", "gemma3.cli", "generate", prompt, "--model", str(d),
         "--temperature", "0", "--max-new-tokens", "12", "--no-stop", "--dtype", "int8"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "int8" in proc.stderr.splitlines()[-1]
    loaded = quantize_int8(load_checkpoint(d))
    assert all(not isinstance(m, torch.nn.Linear) for m in loaded.modules() if m is not loaded), (
        "every linear layer, the head included, is int8"
    )
    new = generate(loaded, [encode(prompt)], 12, temperature=0, stop_token=None)[0]
    assert proc.stdout.rstrip("\n") == prompt + decode(new)


def test_gpu_decode_benchmark_runs_on_cpu() -> None:
    """benchmarks/gpu.sh imports decode_rows; its smoke test is this (tiny preset, eager)."""
    pytest.importorskip("transformers")
    from benchmarks.bench_gpu_decode import decode_rows

    rows = decode_rows("cpu", None, new_tokens=3, batches=(1, 2), repeats=1)
    assert [r["setup"].split(",")[0] for r in rows] == [
        "ours",
        "transformers generate (default)",
    ] * 2
    for r in rows:
        assert set(r) == {"setup", "tokens_per_s", "vs_transformers", "peak_mem_gib"}
        assert r["tokens_per_s"] > 0 and r["vs_transformers"] > 0 and r["peak_mem_gib"] > 0


@pytest.mark.parametrize("dtype", ["int8", "fp32"])
def test_sample_stage_generates_in_the_params_dtype(dtype, tmp_path: Path) -> None:
    """`sample.dtype` reaches the stage: its stories are what `generate` gives in-process with
    that dtype (int8 computed from the float checkpoint), all prompts in one batch."""
    import json

    from tests.project import run_stage, write_params

    model = random_model(GEN, seed=8)
    save_checkpoint(model, tmp_path / "checkpoints" / "best")
    prompts = ["Once upon a time", "The dog"]
    write_params(tmp_path, sample={"dtype": dtype, "prompts": prompts, "max_new_tokens": 6})
    run_stage(tmp_path, "sample", timeout=300)
    got = json.loads((tmp_path / "samples" / "samples.json").read_text())["samples"]
    ref = quantize_int8(model) if dtype == "int8" else model
    want = generate(
        ref, [encode(p) for p in prompts], 6, temperature=0.8, top_k=200, top_p=0.95, seed=1337
    )
    assert [s["completion"] for s in got] == [decode([t for t in w if t != EOT_ID]) for w in want]
