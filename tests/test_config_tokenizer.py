"""Model config (sizes, validation, the `gemma3 info` CLI) and the offline GPT-2 tokenizer.

The truths used here are independent of the code under test: parameter counts worked out by hand
from the architecture, a real model's parameter tensors, GPT-2's own `encoder.json` read with the
reference byte-to-unicode table, and transformers' pure-Python GPT2Tokenizer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from gemma3 import tokenizer as tok
from gemma3.config import FULL, SLIDING, Config, ConfigError, gemma3_layer_pattern
from gemma3.errors import Gemma3Error
from gemma3.model import Gemma3ForCausalLM
from tests.project import REPO, env

# ---------------------------------------------------------------------------------------------
# Parameter counts


def hand_counts_270m() -> dict[str, int]:
    """gemma3-270m with GPT-2's vocabulary, layer by layer (REFERENCE.md section 1)."""
    vocab, d, hidden, n_layers = 50257, 640, 2048, 18
    n_q, n_kv, hd = 4, 1, 256
    q = d * n_q * hd  # 640 x 1024
    k = d * n_kv * hd  # 640 x 256
    v = d * n_kv * hd
    o = n_q * hd * d
    q_norm = k_norm = hd
    gate = up = d * hidden
    down = hidden * d
    block_norms = 4 * d  # input, post-attention, pre-ffn, post-ffn
    per_layer = q + k + v + o + q_norm + k_norm + gate + up + down + block_norms
    assert per_layer == 5_573_632
    embedding = vocab * d
    non_embedding = n_layers * per_layer + d  # + final norm
    return {
        "embedding": embedding,
        "non_embedding": non_embedding,
        "total_tied": embedding + non_embedding,
        "total_untied": 2 * embedding + non_embedding,
    }


def test_270m_param_counts_match_hand_computation() -> None:
    hand = hand_counts_270m()
    assert hand["embedding"] == 32_164_480
    assert hand["total_untied"] == 164_654_976
    assert hand["total_tied"] == 132_490_496
    assert hand["non_embedding"] == 100_326_016

    c = Config.from_name("gemma3-270m").param_counts()
    for key, value in hand.items():
        assert c[key] == value, key
    # The preset is untied: its own total carries a separate lm head.
    assert c["lm_head"] == hand["embedding"]
    assert c["total"] == hand["total_untied"]


def unique_numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("tied", [True, False])
def test_param_counts_equal_real_model_numel(tied: bool) -> None:
    cfg = Config.from_name("gemma3-tiny", tie_embeddings=tied)
    model = Gemma3ForCausalLM(cfg)
    c = cfg.param_counts()
    assert unique_numel(model) == c["total"]
    assert c["total"] == (c["total_tied"] if tied else c["total_untied"])
    emb = model.model.embed_tokens.weight.numel()
    assert c["embedding"] == emb
    assert c["non_embedding"] == unique_numel(model) - emb * (1 if tied else 2)


def test_param_counts_ignore_vocab_padding() -> None:
    """Padding rows are storage, not model: counts stay at vocab_size, the tensors are larger."""
    cfg = Config.from_name("gemma3-tiny", vocab_size=500, vocab_pad_multiple=64)
    assert cfg.padded_vocab_size == 512
    model = Gemma3ForCausalLM(cfg)
    assert unique_numel(model) == cfg.param_counts()["total"] + (512 - 500) * cfg.emb_dim
    assert unique_numel(model) == cfg.param_counts()["stored"]  # what memory checks count
    untied = cfg.replace(tie_embeddings=False)
    assert unique_numel(Gemma3ForCausalLM(untied)) == untied.param_counts()["stored"]
    logits, _ = model(torch.zeros(1, 3, dtype=torch.long))
    assert logits.shape == (1, 3, 500)


def test_info_cli_prints_270m_counts() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gemma3.cli", "info", "--preset", "gemma3-270m"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("  ")
        rows[key.strip()] = value.strip()
    assert rows["total untied"] == "164,654,976"
    assert rows["total tied"] == "132,490,496"
    assert rows["non-embedding"] == "100,326,016"
    assert rows["embedding"] == "32,164,480"
    assert rows["layers"].startswith("18 (15 sliding, 3 full; window 512)")


def test_info_cli_unknown_preset_is_one_line_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gemma3.cli", "info", "--preset", "gemma3-nope"],
        cwd=REPO,
        env={**env(), "GEMMA3_DEBUG": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "model.preset" in lines[0] and "gemma3-nope" in lines[0]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# Config validation


def test_presets_follow_gemma3_rules() -> None:
    for name in ("gemma3-270m", "gemma3-small", "gemma3-tiny"):
        cfg = Config.from_name(name)
        # Every sixth layer is global; the rest are sliding-window layers.
        expected = tuple(FULL if i % 6 == 5 else SLIDING for i in range(cfg.n_layers))
        assert cfg.layer_types == expected, name
        assert cfg.n_heads % cfg.n_kv_heads == 0
        assert Config.from_dict(cfg.to_dict()) == cfg


def test_gemma3_layer_pattern_by_hand() -> None:
    s, f = SLIDING, FULL
    assert gemma3_layer_pattern(7) == (s, s, s, s, s, f, s)
    assert gemma3_layer_pattern(12) == (s, s, s, s, s, f) * 2


def test_overriding_n_layers_rebuilds_the_pattern() -> None:
    cfg = Config.from_name("gemma3-tiny", n_layers=12)
    assert cfg.layer_types == (SLIDING,) * 5 + (FULL,) + (SLIDING,) * 5 + (FULL,)
    assert Config.from_name("gemma3-270m", n_layers=3).layer_types == (SLIDING,) * 3
    # An explicit pattern is kept as given, and still has to fit.
    own = (FULL, SLIDING, FULL)
    assert Config.from_name("gemma3-tiny", n_layers=3, layer_types=own).layer_types == own
    with pytest.raises(ConfigError, match=r"^model\.layer_types: has 2 entries"):
        Config.from_name("gemma3-tiny", n_layers=3, layer_types=[FULL, FULL])


TINY = Config.from_name("gemma3-tiny").to_dict()


def _with(**changes):
    return lambda: Config.from_dict({**TINY, **changes})


INVALID = [
    # (case id, construction, field the message must name, text it must contain)
    ("heads-not-divisible", _with(n_heads=4, n_kv_heads=3), "n_heads", "divisible"),
    ("window-zero", _with(sliding_window=0), "sliding_window", "> 0"),
    ("window-negative", _with(sliding_window=-4), "sliding_window", "> 0"),
    ("odd-head-dim", _with(head_dim=15), "head_dim", "even"),
    ("layer-types-short", _with(layer_types=[SLIDING] * 5), "layer_types", "n_layers"),
    ("layer-types-long", _with(layer_types=[FULL] * 7), "layer_types", "n_layers"),
    (
        "unknown-layer-type",
        _with(layer_types=[SLIDING] * 5 + ["global_attention"]),
        "layer_types",
        "global_attention",
    ),
    ("unknown-field", lambda: Config.from_dict({**TINY, "n_embd": 64}), "n_embd", "unknown"),
    ("unknown-preset", lambda: Config.from_name("gemma3-1b"), "preset", "gemma3-1b"),
    ("bool-as-int", _with(n_layers=True), "n_layers", "integer"),
    ("float-as-int", _with(emb_dim=64.0), "emb_dim", "integer"),
    ("non-bool-flag", _with(tie_embeddings="yes"), "tie_embeddings", "true or false"),
    ("nan-eps", _with(rms_norm_eps=float("nan")), "rms_norm_eps", "number"),
    ("zero-kv-groups", _with(n_kv_heads=0), "n_kv_heads", "> 0"),
]


@pytest.mark.parametrize(
    "build, field, text", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_config_raises_one_line_error_naming_field(build, field: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    err = info.value
    assert isinstance(err, Gemma3Error)
    msg = str(err)
    assert "\n" not in msg
    assert msg.startswith(f"model.{field}: "), msg
    assert err.field == field
    assert text in msg, msg


def test_model_vocab_is_not_limited_by_the_token_files() -> None:
    # uint16 token files limit the ids the DATA can carry, not the model: Gemma's own 262,144
    # vocabulary must build (training on uint16 data with it: tests/test_engine_inputs.py).
    for v in (65536, 65537, 262_144):
        assert Config.from_dict({**TINY, "vocab_size": v}).vocab_size == v


# Sizes as the README's preset table states them; each CPU preset's window is smaller than the
# block it trains with (params.yaml's 128; the tests' 32), so the sliding mask really bites.
PRESET_SIZES = {
    "gemma3-small": dict(emb_dim=192, n_heads=4, n_kv_heads=2, head_dim=48, hidden_dim=768,
                         n_layers=6, sliding_window=64, context_length=2048, tie_embeddings=True),
    "gemma3-tiny": dict(emb_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=256,
                        n_layers=6, sliding_window=16, context_length=1024, tie_embeddings=True),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PRESET_SIZES))
def test_cpu_preset_sizes_and_window_below_block(name: str) -> None:
    cfg = Config.from_name(name)
    assert {k: getattr(cfg, k) for k in PRESET_SIZES[name]} == PRESET_SIZES[name]
    assert cfg.query_pre_attn_scalar == cfg.head_dim
    block = {"gemma3-small": 128, "gemma3-tiny": 32}[name]
    assert cfg.sliding_window < block


def test_replace_revalidates() -> None:
    cfg = Config.from_name("gemma3-tiny")
    with pytest.raises(ConfigError, match=r"^model\.head_dim: "):
        cfg.replace(head_dim=17)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (openai/gpt-2 encoder.py)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def test_known_sentence_encodes_to_gpt2_ids() -> None:
    text = "Once upon a time there was a pumpkin."
    ids = tok.encode(text)
    assert ids == [7454, 2402, 257, 640, 612, 373, 257, 30089, 13]
    # Cross-check each id against GPT-2's encoder.json (the tokens are whole words here).
    encoder = json.loads(tok.bundled_files()[1].read_text(encoding="utf-8"))
    b2u = bytes_to_unicode()
    pieces = ["Once", " upon", " a", " time", " there", " was", " a", " pumpkin", "."]
    assert [encoder["".join(b2u[b] for b in p.encode())] for p in pieces] == ids
    assert tok.decode(ids) == text


ROUND_TRIP = [
    "",
    "Once upon a time there was a pumpkin.",
    "Lily said, \"Don't go!\"\n\nTom's dog ran away.\n",
    "  leading, trailing   and   runs    of spaces   ",
    "tabs\tand\r\nwindows newlines\n\n\n\nmany blank lines",
    "naïve café, Zürich, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🎃👩‍👩‍👧 and flags 🇫🇷 and combining e\u0301",
    "numbers 3.14159 1,000,000 and punctuation ?!;:…—–",
    "\u200bzero width\u00a0nbsp",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_decode_encode_round_trip(text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.EOT_ID for i in ids)
    assert tok.decode(ids) == text


def test_multibyte_characters_split_across_tokens_still_round_trip() -> None:
    text = "🎃" * 3
    ids = tok.encode(text)
    assert len(ids) > 3  # each emoji takes several byte-level tokens
    assert tok.decode(ids) == text


def test_endoftext_in_text_is_ordinary_characters() -> None:
    text = "The end.<|endoftext|>Once upon a time"
    ids = tok.encode(text)
    assert tok.EOT_ID not in ids
    assert tok.decode(ids) == text
    # Exactly what the three parts encode to separately; the marker is its own text tokens.
    marker = tok.encode("<|endoftext|>")
    assert tok.EOT_ID not in marker and len(marker) > 1
    assert tok.decode(marker) == "<|endoftext|>"
    # Decoding the special id does give the marker text back.
    assert tok.decode([tok.EOT_ID]) == "<|endoftext|>"
    assert tok.EOT_ID == tok.VOCAB_SIZE - 1 == 50256


def test_encoding_vocab_matches_gpt2() -> None:
    enc = tok.get_encoding()
    assert enc.n_vocab == 50257
    assert enc.eot_token == tok.EOT_ID
    assert tok.vocab_json_size() == 50257


def _copy_bundled(tmp_path):
    vocab_bpe, encoder_json = tok.bundled_files()
    v, e = tmp_path / "vocab.bpe", tmp_path / "encoder.json"
    shutil.copyfile(vocab_bpe, v)
    shutil.copyfile(encoder_json, e)
    return v, e


def test_build_from_verified_copies_matches_bundled(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no copies of tmp files in tiktoken's cache
    v, e = _copy_bundled(tmp_path)
    enc = tok.build_encoding(v, e)
    text = "Once upon a time, Lily found a shiny stone 🪨."
    assert enc.encode_ordinary(text) == tok.encode(text)


@pytest.mark.parametrize("which", ["vocab.bpe", "encoder.json"])
def test_tampered_tokenizer_file_is_refused(tmp_path, which: str) -> None:
    v, e = _copy_bundled(tmp_path)
    target = tmp_path / which
    data = bytearray(target.read_bytes())
    # Swap two characters deep inside: same size, still parses, but not GPT-2's file.
    i = len(data) // 2
    data[i], data[i + 1] = data[i + 1], data[i]
    assert bytes(data) != target.read_bytes()
    target.write_bytes(bytes(data))
    with pytest.raises(Gemma3Error) as info:
        tok.build_encoding(v, e)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(target) in msg
    assert "sha256" in msg


def test_missing_tokenizer_file_is_refused(tmp_path) -> None:
    v, e = _copy_bundled(tmp_path)
    e.unlink()
    with pytest.raises(Gemma3Error, match="encoder.json"):
        tok.build_encoding(v, e)


def test_hf_tokenizer_files_agree_with_tiktoken(tmp_path) -> None:
    """transformers' pure-Python GPT-2 BPE is an independent implementation of the same merges."""
    transformers = pytest.importorskip("transformers")
    tok.write_hf_tokenizer_files(tmp_path / "hf", model_max_length=128)
    hf = transformers.GPT2Tokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf.model_max_length == 128
    assert hf.eos_token_id == tok.EOT_ID
    for text in ROUND_TRIP:
        assert hf.encode(text) == tok.encode(text), text


def test_hf_tokenizer_files_refuse_tampered_source(tmp_path, monkeypatch) -> None:
    v, e = _copy_bundled(tmp_path)
    v.write_bytes(v.read_bytes().replace(b"\n", b"\n ", 1))
    monkeypatch.setattr(tok, "bundled_files", lambda: (v, e))
    with pytest.raises(Gemma3Error, match="vocab.bpe"):
        tok.write_hf_tokenizer_files(tmp_path / "hf", model_max_length=128)
    assert not (tmp_path / "hf" / "merges.txt").exists()
