"""KV-cache generation against full recompute and against transformers; the streaming CLI."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gemma3.config import FULL, SLIDING, Config
from gemma3.errors import Gemma3Error
from gemma3.generation import generate, in_dtype, sample_next
from gemma3.hf import save_checkpoint, to_transformers
from gemma3.tokenizer import EOT_ID, decode, encode
from tests.project import REPO, env
from tests.test_hf_parity import random_model

# Window 4 so the sliding cache wraps many times; GQA (the tiny preset's 2 KV heads for 4 query
# heads); a full layer keeps everything.
GEN = Config.from_name(
    "gemma3-tiny",
    vocab_size=50257,
    context_length=1100,
    emb_dim=32,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    hidden_dim=64,
    n_layers=4,
    layer_types=(SLIDING, SLIDING, FULL, SLIDING),
    sliding_window=4,
    query_pre_attn_scalar=12.0,
    tie_embeddings=True,
)


@pytest.fixture(scope="module")
def model():
    return random_model(GEN, seed=3)


def test_cache_equals_full_recompute_past_the_window(model) -> None:
    prompt = encode("Once upon a time there was a pumpkin.")
    n_new = 3 * GEN.sliding_window * 4  # well past 3*W
    a = generate(model, [prompt], n_new, temperature=0, stop_token=None, use_cache=True)
    b = generate(model, [prompt], n_new, temperature=0, stop_token=None, use_cache=False)
    assert len(a[0]) == n_new
    assert a == b


def test_batch_of_different_lengths_equals_each_prompt_alone(model) -> None:
    prompts = [encode("Once upon a time"), encode("The dog ran to the big red ball and"), [42]]
    n_new = 3 * GEN.sliding_window + 5
    batched = generate(model, prompts, n_new, temperature=0, stop_token=None)
    recomputed = generate(model, prompts, n_new, temperature=0, stop_token=None, use_cache=False)
    alone = [generate(model, [p], n_new, temperature=0, stop_token=None)[0] for p in prompts]
    assert batched == alone
    assert recomputed == alone
    assert len({tuple(r) for r in alone}) == 3  # the rows really differ


def test_seed_repeats_and_stop_token_ends_a_row(model) -> None:
    p = [encode("Once upon a time")]
    a = generate(model, p, 30, temperature=1.0, top_k=50, top_p=0.9, seed=7, stop_token=None)
    b = generate(model, p, 30, temperature=1.0, top_k=50, top_p=0.9, seed=7, stop_token=None)
    c = generate(model, p, 30, temperature=1.0, top_k=50, top_p=0.9, seed=8, stop_token=None)
    assert a == b and a != c
    stop = a[0][5]  # pretend the 6th sampled token is the stop token
    d = generate(model, p, 30, temperature=1.0, top_k=50, top_p=0.9, seed=7, stop_token=stop)
    assert d[0] == a[0][: a[0].index(stop) + 1]


def test_top_k_and_top_p_filter_as_defined() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {
        sample_next(logits, temperature=1.0, top_k=2, top_p=None, generator=g).item()
        for _ in range(300)
    }
    assert draws == {0, 1}
    # top_p 0.75: 0.5 alone is not enough, 0.5 + 0.3 reaches it, so exactly {0, 1} survive.
    draws = {
        sample_next(logits, temperature=1.0, top_k=None, top_p=0.75, generator=g).item()
        for _ in range(300)
    }
    assert draws == {0, 1}
    draws = {
        sample_next(logits, temperature=1.0, top_k=None, top_p=0.5, generator=g).item()
        for _ in range(50)
    }
    assert draws == {0}


def test_empty_prompt_starts_a_new_story_and_long_prompt_is_rejected(model) -> None:
    a = generate(model, [[]], 5, temperature=0, stop_token=None)
    b = generate(model, [[EOT_ID]], 5, temperature=0, stop_token=None)
    assert a == b
    with pytest.raises(Gemma3Error, match="context_length is 1100"):
        generate(model, [[1] * 1100], 5)
    with pytest.raises(Gemma3Error, match="top_p"):
        generate(model, [[1]], 5, top_p=1.5)
    with pytest.raises(Gemma3Error, match="temperature"):
        generate(model, [[1]], 5, temperature=-1)
    # Generation stops at the context length instead of running past it.
    out = generate(model, [[1] * 1090], 50, temperature=0, stop_token=None)
    assert len(out[0]) == 1100 - 1090


def test_small_vocabulary_pads_and_starts_with_its_own_ids() -> None:
    """A vocabulary without GPT-2's <|endoftext|> (50256): padding and the empty-prompt start
    token must be ids of this vocabulary."""
    cfg = GEN.replace(vocab_size=320)
    small = random_model(cfg, seed=5)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [], [2, 7]]
    batched = generate(small, prompts, 12, temperature=0, stop_token=None)
    alone = [generate(small, [p], 12, temperature=0, stop_token=None)[0] for p in prompts]
    assert batched == alone
    assert batched[1] == generate(small, [[319]], 12, temperature=0, stop_token=None)[0]


def test_sampled_rows_equal_each_prompt_alone_with_seed_plus_row(model) -> None:
    prompts = [encode("Once upon a time"), encode("The dog ran"), encode("The dog ran")]
    kw = dict(temperature=1.0, top_k=50, stop_token=None)
    batched = generate(model, prompts, 20, seed=11, **kw)
    alone = [generate(model, [p], 20, seed=11 + i, **kw)[0] for i, p in enumerate(prompts)]
    assert batched == alone
    assert batched[1] != batched[2]  # same prompt, own streams


def test_bf16_decode_runs_the_weights_in_bf16_and_leaves_the_model_alone(model) -> None:
    prompt = [encode("Once upon a time there was a pumpkin.")]
    kw = dict(temperature=0, stop_token=None)
    bf16 = in_dtype(model, torch.bfloat16)
    assert bf16.lm_head.weight is bf16.model.embed_tokens.weight  # still tied
    for name, t in bf16.state_dict().items():
        assert torch.equal(t, model.state_dict()[name].to(torch.bfloat16)), name
    got = generate(model, prompt, 40, dtype=torch.bfloat16, **kw)
    assert model.lm_head.weight.dtype == torch.float32
    assert got == generate(bf16, prompt, 40, **kw)
    assert got != generate(model, prompt, 40, **kw)  # bf16 really ran (differs from fp32 here)


def test_greedy_matches_transformers_generate(model) -> None:
    pytest.importorskip("transformers")
    hf = to_transformers(model)
    prompt = encode("One day, a little girl named Lily")
    ids = torch.tensor([prompt])
    res = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=64,
        min_new_tokens=64,
        do_sample=False,
        pad_token_id=EOT_ID,
        return_dict_in_generate=True,
        output_logits=True,
    )
    hf_tokens = res.sequences[0, len(prompt) :].tolist()
    ours = generate(model, [prompt], 64, temperature=0, stop_token=None)[0]
    assert ours == hf_tokens
    # Step logits of our cached decoding against HF's, in fp32.
    cache = model.new_cache()
    x = ids
    with torch.no_grad():
        for step, hf_logits in enumerate(res.logits):
            logits, _ = model(x, cache=cache, last_only=True)
            assert (logits[0, -1] - hf_logits[0]).abs().max().item() <= 1e-4, step
            x = torch.tensor([[hf_tokens[step]]])


def test_checkpoint_dir_loads_with_auto_classes_offline(model, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    d = save_checkpoint(model, tmp_path / "ckpt")
    tok = transformers.AutoTokenizer.from_pretrained(d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d)
    text = "Once upon a time there was a pumpkin."
    assert tok(text)["input_ids"] == encode(text)
    enc = tok(text, return_tensors="pt")
    out = hf.generate(**enc, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    assert new == generate(model, [encode(text)], 20, temperature=0, stop_token=None)[0]
    assert tok.decode(out[0]) == text + decode(new)


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gemma3.cli", *args],
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def test_cli_streams_tokens_as_they_come(model, tmp_path: Path) -> None:
    d = save_checkpoint(model, tmp_path / "ckpt")
    prompt = "Once upon a time"
    n = 400
    proc = _cli(
        "generate", "--model", str(d), prompt, "--temperature", "0", "--max-new-tokens", str(n),
        "--no-stop", "--device", "cpu", "--dtype", "fp32",  # the reference below runs in fp32
    )  # fmt: skip
    fd = proc.stdout.fileno()
    seen, chunks = b"", 0
    while True:
        r, _, _ = select.select([fd], [], [], 60)
        assert r, "no output for 60 s"
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        seen += chunk
        chunks += 1
    err = proc.stderr.read().decode()
    assert proc.wait() == 0, err
    # Text arrived in many pieces as it was generated, not in one block at the end.
    assert chunks >= 10, chunks
    want = prompt + decode(generate(model, [encode(prompt)], n, temperature=0, stop_token=None)[0])
    assert seen.decode().rstrip("\n") == want
    assert "tokens/s" in err


def test_cli_reads_prompt_from_stdin_and_errors_are_one_line(model, tmp_path: Path) -> None:
    d = save_checkpoint(model, tmp_path / "ckpt")
    proc = _cli(
        "generate", "--model", str(d), "--temperature", "0", "--max-new-tokens", "8", "--no-stop",
        "--dtype", "fp32", stdin=subprocess.PIPE,
    )  # fmt: skip
    out, err = proc.communicate(b"The dog was sad because\n", timeout=120)
    assert proc.returncode == 0, err
    want = "The dog was sad because" + decode(
        generate(model, [encode("The dog was sad because")], 8, temperature=0, stop_token=None)[0]
    )
    assert out.decode().rstrip("\n") == want

    for args, needle in [
        (["--model", str(tmp_path / "nope"), "hi"], "checkpoint directory not found"),
        (["--model", str(d), "--top-p", "0", "hi"], "top_p must be in (0, 1]"),
        (["--model", str(d), "--max-new-tokens", "x", "hi"], "invalid int value"),
    ]:
        proc = _cli("generate", *args)
        out, err = proc.communicate(timeout=120)
        lines = err.decode().strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and needle in lines[0], err
        assert "Traceback" not in err.decode()


def test_export_hf_in_bf16_loads_in_transformers(model, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    src = save_checkpoint(model, tmp_path / "ckpt")
    dst = tmp_path / "hf-bf16"
    t0 = time.time()
    proc = _cli("export-hf", "--model", str(src), "--out", str(dst), "--dtype", "bf16")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert time.time() - t0 < 120
    hf = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.bfloat16)
    w = hf.model.embed_tokens.weight
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, model.model.embed_tokens.weight.to(torch.bfloat16))
