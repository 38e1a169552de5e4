"""Model-level behaviour: the KV cache's own bookkeeping and the chunked training loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gemma3.model as model_module
from gemma3.config import FULL, SLIDING, Config
from gemma3.model import apply_rope, rope_cos_sin
from tests.test_hf_parity import random_model


def tiny(**overrides) -> Config:
    """The tiny preset (GQA: 2 KV heads for 4 query heads) shrunk further for fast tests."""
    base = dict(
        context_length=256, emb_dim=32, hidden_dim=64, n_layers=4, sliding_window=4,
        query_pre_attn_scalar=12.0,
    )  # fmt: skip
    return Config.from_name("gemma3-tiny", **{**base, **overrides})


@pytest.mark.parametrize(
    "layer_types",
    [(SLIDING, SLIDING, SLIDING, SLIDING), (SLIDING, FULL, SLIDING, SLIDING)],
    ids=["no-full-layer", "with-full-layer"],
)
def test_cache_counts_its_own_tokens(layer_types) -> None:
    """forward(..., cache=) without positions, fed past the window, equals one full forward."""
    cfg = tiny(vocab_size=300, layer_types=layer_types)
    model = random_model(cfg, seed=1)
    idx = torch.randint(0, cfg.vocab_size, (2, 5 * cfg.sliding_window + 3))
    with torch.no_grad():
        want, _ = model(idx)
        cache = model.new_cache(batch_size=2)
        got = [model(idx[:, :3], cache=cache)[0]]  # a multi-token prefill, then one at a time
        got += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(3, idx.shape[1])]
    assert (torch.cat(got, dim=1) - want).abs().max().item() < 1e-5


def test_sliding_layers_hold_exactly_the_last_w_minus_1_keys() -> None:
    cfg = tiny(vocab_size=300, layer_types=(SLIDING, FULL, SLIDING, SLIDING))
    W = cfg.sliding_window
    model = random_model(cfg, seed=2)
    n = 4 * W + 1
    idx = torch.randint(0, cfg.vocab_size, (1, n))
    # Independent truth: each layer's keys for the whole sequence, from its input in one forward.
    inputs = {}
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda mod, args, i=i: inputs.__setitem__(i, args[0])
        )
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(idx)
        for h in hooks:
            h.remove()
        cache = model.new_cache()
        for t in range(n):
            model(idx[:, t : t + 1], cache=cache)

    for i, lt in enumerate(cfg.layer_types):
        attn = model.model.layers[i].self_attn
        base = cfg.rope_local_base if lt == SLIDING else cfg.rope_base
        with torch.no_grad():
            k = attn.k_proj(inputs[i]).view(1, n, attn.n_kv, cfg.head_dim).transpose(1, 2)
            cos, sin = rope_cos_sin(torch.arange(n)[None], cfg.head_dim, base, k.dtype)
            k = apply_rope(attn.k_norm(k), cos, sin)  # (1, n_kv, n, head_dim)
        held = cache.held_positions(i)[0]  # (slots,), -1 for an empty slot
        expected = list(range(n - W + 1, n)) if lt == SLIDING else list(range(n))
        assert sorted(p for p in held.tolist() if p >= 0) == expected, (i, lt)
        keys = cache.keys(i)  # (1, n_kv, slots, head_dim)
        assert keys.shape[2] == (W - 1 if lt == SLIDING else cache.max_len)
        for slot, pos in enumerate(held.tolist()):
            if pos >= 0:
                assert torch.allclose(keys[0, :, slot], k[0, :, pos], atol=1e-5), (i, slot)


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_plain_cross_entropy_in_value_and_gradients(monkeypatch, tied) -> None:
    # A padded vocabulary (the padded rows must get no gradient), ignored targets, and a chunk
    # size that does not divide the rows, so every chunk boundary case runs.
    cfg = tiny(vocab_size=300, vocab_pad_multiple=64, tie_embeddings=tied)
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ROWS", 7)
    model = random_model(cfg, seed=4).train()
    idx = torch.randint(0, cfg.vocab_size, (3, 10))
    targets = torch.randint(0, cfg.vocab_size, (3, 10))
    targets[0, :4] = -100
    targets[2, -1] = -100

    _, loss = model(idx, targets)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logits, _ = model(idx)
    plain = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), targets.reshape(-1))
    plain.backward()
    assert abs(loss.item() - plain.item()) < 1e-6
    for name, p in model.named_parameters():
        assert torch.allclose(got[name], p.grad, rtol=1e-4, atol=1e-6), name
    assert model.lm_head.weight.grad[cfg.vocab_size :].abs().max() == 0
    with torch.no_grad():  # the no-grad path (evaluation) gives the same value
        assert abs(model(idx, targets)[1].item() - plain.item()) < 1e-6


def test_chunked_loss_under_bf16_autocast_is_close_to_plain() -> None:
    cfg = tiny(vocab_size=300)
    model = random_model(cfg, seed=5).train()
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
        logits, _ = model(idx)
    loss.backward()
    grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    plain = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), idx.reshape(-1))
    plain.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - plain.item()) < 1e-2
    ref = model.model.embed_tokens.weight.grad
    assert (grad - ref).norm() / ref.norm() < 2e-2
