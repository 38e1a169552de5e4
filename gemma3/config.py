"""Typed, validated model configurations with named presets (litgpt style).

`Config.from_name("gemma3-270m")` gives the seed's exact architecture; the small presets keep the
same shape rules (5:1 sliding/full pattern, QK-norm, two RoPE bases) at a size a CPU can train.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from gemma3.errors import Gemma3Error
from gemma3.tokenizer import VOCAB_SIZE

# Sizes are torch shapes, which are int64; a larger integer (10**30 in a config.json) is refused
# here instead of overflowing inside torch.
MAX_INT = 2**63 - 1
# The most layers `from_dict` builds Gemma's pattern for: beyond it the pattern alone (a tuple of
# n names) would take longer and more memory than any model that fits a machine.
MAX_LAYERS = 2**20

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)


class ConfigError(Gemma3Error):
    """An invalid model config; the message names the field."""

    def __init__(self, field_name: str, message: str) -> None:
        self.field = field_name
        super().__init__(f"model.{field_name}: {message}")


def gemma3_layer_pattern(n_layers: int, sliding_per_full: int = 5) -> tuple[str, ...]:
    """Gemma 3's interleaving: every (sliding_per_full+1)-th layer is global, the rest local."""
    period = sliding_per_full + 1
    return tuple(FULL if (i + 1) % period == 0 else SLIDING for i in range(n_layers))


@dataclass(frozen=True)
class Config:
    name: str = "custom"
    vocab_size: int = VOCAB_SIZE
    context_length: int = 32768
    emb_dim: int = 640
    n_heads: int = 4
    n_layers: int = 18
    hidden_dim: int = 2048
    head_dim: int = 256
    n_kv_heads: int = 1  # HF num_key_value_heads; n_heads / n_kv_heads query heads share one
    qk_norm: bool = True
    rope_local_base: float = 10_000.0
    rope_base: float = 1_000_000.0
    sliding_window: int = 512
    layer_types: tuple[str, ...] = field(default_factory=lambda: gemma3_layer_pattern(18))
    query_pre_attn_scalar: float = 256.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    # Rows of the embedding / lm head are padded to a multiple of this (64 makes the lm head
    # matmul tensor-core friendly); logits seen by users are cropped back to vocab_size.
    vocab_pad_multiple: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        if name not in PRESETS:
            raise ConfigError(
                "preset", f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}"
            )
        base = dict(PRESETS[name])
        if "n_layers" in overrides and "layer_types" not in overrides:
            # The preset's pattern fits its own depth; let from_dict rebuild it for the new one.
            del base["layer_types"]
        return cls.from_dict({**base, "name": name, **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                unknown[0], f"unknown field; valid fields: {', '.join(sorted(known))}"
            )
        d = dict(d)
        # If the layer count is overridden without a pattern, rebuild Gemma's 5:1 pattern.
        if "n_layers" in d and "layer_types" not in d:
            n = d["n_layers"]
            if isinstance(n, int) and not isinstance(n, bool) and n > MAX_LAYERS:
                raise ConfigError("n_layers", f"must be at most {MAX_LAYERS:,}, got {n}")
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                d["layer_types"] = gemma3_layer_pattern(n)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    def replace(self, **changes: Any) -> Config:
        return Config.from_dict({**self.to_dict(), **changes})

    # ---- derived sizes ------------------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return ((self.vocab_size + m - 1) // m) * m

    def param_counts(self) -> dict[str, int]:
        """Parameter breakdown at the unpadded vocabulary (what the model 'is', not its storage)."""
        d, h, hd, kv = self.emb_dim, self.hidden_dim, self.head_dim, self.n_kv_heads
        attn = d * self.n_heads * hd * 2 + d * kv * hd * 2  # q, o + k, v
        qk_norm = 2 * hd if self.qk_norm else 0
        mlp = 3 * d * h
        norms = 4 * d
        per_layer = attn + qk_norm + mlp + norms
        embedding = self.vocab_size * d
        non_embedding = self.n_layers * per_layer + d  # + final norm
        head = 0 if self.tie_embeddings else embedding
        pad_rows = (
            (self.padded_vocab_size - self.vocab_size) * d * (1 if self.tie_embeddings else 2)
        )
        return {
            "embedding": embedding,
            "non_embedding": non_embedding,
            "lm_head": head,
            "total": embedding + non_embedding + head,
            "total_tied": embedding + non_embedding,
            "total_untied": 2 * embedding + non_embedding,
            # What is allocated: `total` plus the vocab padding rows (memory checks use this).
            "stored": embedding + non_embedding + head + pad_rows,
        }

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, PaLM-style: 6 x matmul parameters + 12 x L x H x d_head x keys.

        Sliding layers only attend to min(seq_len, window) keys. The lm head counts at its padded
        size because that is the matmul that runs. For gemma3-270m at seq_len 128: ~0.82 GFLOP.
        """
        matmul_params = self.param_counts()["non_embedding"] + self.padded_vocab_size * self.emb_dim
        attn = 0.0
        for lt in self.layer_types:
            keys = min(seq_len, self.sliding_window) if lt == SLIDING else seq_len
            attn += 12.0 * self.n_heads * self.head_dim * keys
        return 6.0 * matmul_params + attn

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(name, f"must be an integer, got {v!r}")
            if v <= 0:
                raise ConfigError(name, f"must be > 0, got {v}")
            if v > MAX_INT:
                raise ConfigError(name, f"must be at most {MAX_INT} (int64), got {v}")

        def positive_float(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(name, f"must be a number, got {v!r}")
            if v <= 0:
                raise ConfigError(name, f"must be > 0, got {v}")

        for name in (
            "vocab_size",
            "context_length",
            "emb_dim",
            "n_heads",
            "n_layers",
            "hidden_dim",
            "head_dim",
            "n_kv_heads",
            "sliding_window",
            "vocab_pad_multiple",
        ):
            positive_int(name)
        for name in ("rope_local_base", "rope_base", "query_pre_attn_scalar", "rms_norm_eps"):
            positive_float(name)
        for name in ("qk_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.head_dim % 2:
            raise ConfigError("head_dim", f"must be even for RoPE, got {self.head_dim}")
        if not self.qk_norm:
            raise ConfigError(
                "qk_norm",
                "must be true: Gemma 3 always uses QK-norm and transformers' Gemma 3 has no switch "
                "to turn it off, so such a model could not be exported or checked against it",
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                "n_heads",
                f"({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})",
            )
        if len(self.layer_types) != self.n_layers:
            raise ConfigError(
                "layer_types",
                f"has {len(self.layer_types)} entries but n_layers is {self.n_layers}",
            )
        for i, lt in enumerate(self.layer_types):
            if lt not in LAYER_TYPES:
                raise ConfigError(
                    "layer_types", f"entry {i} is {lt!r}; expected one of {', '.join(LAYER_TYPES)}"
                )


PRESETS: dict[str, dict[str, Any]] = {
    # The seed's configuration, exactly (REFERENCE.md section 1). With the GPT-2 vocabulary this
    # is 164.65M parameters untied; the "270M" name comes from Gemma's 262k vocabulary.
    "gemma3-270m": dict(
        vocab_size=VOCAB_SIZE,
        context_length=32768,
        emb_dim=640,
        n_heads=4,
        n_layers=18,
        hidden_dim=2048,
        head_dim=256,
        n_kv_heads=1,
        qk_norm=True,
        rope_local_base=10_000.0,
        rope_base=1_000_000.0,
        sliding_window=512,
        layer_types=gemma3_layer_pattern(18),
        query_pre_attn_scalar=256.0,
        tie_embeddings=False,
    ),
    # CPU presets: same rules, sliding window smaller than the default block size (128) so the
    # sliding mask really bites during training.
    "gemma3-small": dict(
        context_length=2048,
        emb_dim=192,
        n_heads=4,
        n_layers=6,
        hidden_dim=768,
        head_dim=48,
        n_kv_heads=2,
        sliding_window=64,
        layer_types=gemma3_layer_pattern(6),
        query_pre_attn_scalar=48.0,
        tie_embeddings=True,
    ),
    "gemma3-tiny": dict(
        context_length=1024,
        emb_dim=64,
        n_heads=4,
        n_layers=6,
        hidden_dim=256,
        head_dim=16,
        n_kv_heads=2,
        sliding_window=16,
        layer_types=gemma3_layer_pattern(6),
        query_pre_attn_scalar=16.0,
        tie_embeddings=True,
    ),
}
