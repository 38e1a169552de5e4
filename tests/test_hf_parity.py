"""Our model against Hugging Face transformers' Gemma3ForCausalLM: the independent truth."""

from __future__ import annotations

import pytest
import torch

from gemma3.config import FULL, SLIDING, Config
from gemma3.hf import (
    from_transformers,
    load_checkpoint,
    save_checkpoint,
    to_hf_config,
    to_transformers,
)
from gemma3.model import Gemma3ForCausalLM

transformers = pytest.importorskip("transformers")

# Sequence longer than the window, sliding + full layers, GQA (2 KV heads for 4 query heads) and a
# query_pre_attn_scalar that differs from head_dim, so each of those details is exercised.
SMALL = dict(
    name="parity-small",
    vocab_size=320,
    context_length=256,
    emb_dim=48,
    n_heads=4,
    n_kv_heads=2,
    head_dim=24,
    hidden_dim=96,
    n_layers=4,
    layer_types=(SLIDING, SLIDING, FULL, SLIDING),
    sliding_window=7,
    query_pre_attn_scalar=40.0,
    rope_local_base=10_000.0,
    rope_base=1_000_000.0,
)


def random_model(cfg: Config, seed: int = 0) -> Gemma3ForCausalLM:
    """Random weights everywhere, norm weights included (zeros would hide (1+w) mistakes)."""
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(-0.5, 0.5)
            else:
                p.normal_(0.0, 0.05)
    return model.eval()


def max_logit_diff(ours: Gemma3ForCausalLM, hf, idx: torch.Tensor) -> float:
    with torch.no_grad():
        a, _ = ours(idx)
        b = hf(input_ids=idx).logits
    return (a - b).abs().max().item()


@pytest.mark.parametrize("tied", [False, True])
def test_small_config_matches_transformers(tied: bool) -> None:
    cfg = Config(**SMALL, tie_embeddings=tied)
    ours = random_model(cfg)
    hf = to_transformers(ours)
    idx = torch.randint(0, cfg.vocab_size, (2, 40))  # 40 > window 7
    assert max_logit_diff(ours, hf, idx) <= 1e-5


def test_270m_preset_matches_transformers() -> None:
    cfg = Config.from_name("gemma3-270m")
    ours = random_model(cfg)
    hf = to_transformers(ours)
    idx = torch.randint(0, cfg.vocab_size, (1, 12))
    assert max_logit_diff(ours, hf, idx) <= 1e-5


@pytest.mark.parametrize("delta", [-1, 1])
def test_window_off_by_one_is_detected(delta: int) -> None:
    """A window of W-1 or W+1 must give clearly different logits: the parity test can fail."""
    cfg = Config(**SMALL)
    hf = to_transformers(random_model(cfg))
    wrong = random_model(cfg.replace(sliding_window=cfg.sliding_window + delta))
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    assert max_logit_diff(wrong, hf, idx) > 1e-2


def test_loss_matches_transformers() -> None:
    cfg = Config(**SMALL)
    ours = random_model(cfg)
    hf = to_transformers(ours)
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        _, loss = ours(idx[:, :-1], idx[:, 1:])
        hf_loss = hf(input_ids=idx, labels=idx).loss  # HF shifts labels internally
    assert abs(loss.item() - hf_loss.item()) < 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_round_trip_through_from_pretrained(tmp_path, tied: bool) -> None:
    cfg = Config(**SMALL, tie_embeddings=tied, vocab_pad_multiple=64)  # padded rows are cropped
    ours = random_model(cfg)
    save_checkpoint(ours, tmp_path / "ckpt")
    hf = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert hf.config.vocab_size == cfg.vocab_size
    back = from_transformers(hf, vocab_pad_multiple=64)
    loaded = load_checkpoint(tmp_path / "ckpt", vocab_pad_multiple=64)
    for name, t in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
        assert torch.equal(loaded.state_dict()[name], t), name
    idx = torch.randint(0, cfg.vocab_size, (1, 16))
    assert max_logit_diff(ours, hf.eval(), idx) <= 1e-5


# google/gemma-3-270m's config.json on the Hugging Face Hub (Gemma 3 270M, August 2025), written
# down here by hand: the one truth about the preset that does not go through our Config.
GOOGLE_GEMMA3_270M = {
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "num_hidden_layers": 18,
    "sliding_window": 512,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "hidden_activation": "gelu_pytorch_tanh",
}


def test_270m_preset_equals_googles_published_config() -> None:
    ours = to_hf_config(Config.from_name("gemma3-270m"))
    rope = ours.pop("rope_parameters")
    ours["rope_theta"] = rope[FULL]["rope_theta"]
    ours["rope_local_base_freq"] = rope[SLIDING]["rope_theta"]
    assert {k: ours[k] for k in GOOGLE_GEMMA3_270M} == GOOGLE_GEMMA3_270M
    # Layer pattern: 5 sliding then 1 full, three times (Google's sliding_window_pattern 6).
    assert ours["layer_types"] == ([SLIDING] * 5 + [FULL]) * 3
    # Where the seed (and so the preset) differs from Google: GPT-2's vocabulary, untied head.
    assert ours["vocab_size"] == 50257 and ours["tie_word_embeddings"] is False


# Distinct RoPE bases, a window below the sequence and a scalar != head_dim: a loader that swaps
# or drops any of them changes the logits.
DISTINCT = {**SMALL, "rope_local_base": 500.0, "rope_base": 20_000.0, "sliding_window": 5}


@pytest.mark.parametrize("tied", [False, True])
def test_reloaded_checkpoint_gives_the_same_logits(tmp_path, tied: bool) -> None:
    ours = random_model(Config(**DISTINCT, tie_embeddings=tied))
    save_checkpoint(ours, tmp_path / "ckpt")
    back = load_checkpoint(tmp_path / "ckpt")
    idx = torch.randint(0, ours.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], ours(idx)[0])


def test_export_has_no_pad_token_so_every_embedding_row_learns(tmp_path) -> None:
    import json

    cfg = Config(**{**SMALL, "vocab_size": 50257})  # the real vocabulary: EOT is a real row
    ours = random_model(cfg)
    save_checkpoint(ours, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt/config.json").read_text())["pad_token_id"] is None
    hf = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert hf.model.embed_tokens.padding_idx is None
    # <|endoftext|> (the story separator) gets a gradient in HF fine-tuning.
    idx = torch.tensor([[50256, 11, 50256, 12, 13]])
    hf(input_ids=idx, labels=idx).loss.backward()
    assert hf.model.embed_tokens.weight.grad[50256].abs().sum() > 0
    # HF generate still works (it pads with generation_config.json's id) and agrees with ours.
    from gemma3.generation import generate

    prompt = [[50256, 11, 12]]
    with torch.no_grad():
        out = hf.generate(torch.tensor(prompt), max_new_tokens=5, do_sample=False)
    assert out[0, 3:].tolist() == generate(ours, prompt, max_new_tokens=5, temperature=0.0)[0]
