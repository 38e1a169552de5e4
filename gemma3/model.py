"""Gemma 3 text model, written out in plain PyTorch.

Module names follow Hugging Face's `Gemma3ForCausalLM` (`model.layers.N.self_attn.q_proj`, ...)
so a state dict converts 1:1. The math, in order, for one block:

    h   = x + post_attention_layernorm(attn(input_layernorm(x)))
    out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))

attn: GQA with RMSNorm on q and k (per head, before RoPE), half-split RoPE with base 1e4 on
sliding-window layers and 1e6 on full layers, scores scaled by query_pre_attn_scalar**-0.5.
Sliding window W: query i sees keys j with i - W < j <= i. mlp: GeGLU with tanh-GELU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gemma3.config import SLIDING, Config


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in fp32, scaled by (1 + w) with w initialised to zero."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (B, 1, T, head_dim) for integer positions of shape (B, T)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (base ** (exponent / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2), in fp32
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split ("rotate_half") rotary embedding, not the interleaved variant."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


@dataclass
class LayerCache:
    """Keys (already rotated) and values seen so far by one layer, with their positions.

    Sliding layers keep only the last W-1 entries: the next query at position p needs keys with
    p - W < j <= p, and its own key arrives with it.
    """

    k: torch.Tensor | None = None  # (B, n_kv, S, head_dim)
    v: torch.Tensor | None = None
    pos: torch.Tensor | None = None  # (B, S) positions of the cached keys
    valid: torch.Tensor | None = None  # (B, S) False for left padding


class KVCache:
    """One `LayerCache` per layer; pass the same object to successive forward calls."""

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layers)]

    @property
    def seq_len(self) -> int:
        """Number of tokens fed so far (the full-attention layers keep them all)."""
        lengths = [0 if c.pos is None else c.pos.shape[1] for c in self.layers]
        return max(lengths) if lengths else 0


def attention_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor | None,
    window: int | None,
) -> torch.Tensor:
    """Boolean mask (B, 1, Tq, Tk), True where query may attend: causal, windowed, not padding."""
    diff = q_pos[:, :, None] - k_pos[:, None, :]  # (B, Tq, Tk): how far back the key is
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    if k_valid is not None:
        allowed &= k_valid[:, None, :]
    # A padding query may have no allowed key at all; let it see everything so softmax stays
    # finite. Its output is never used.
    allowed |= ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer_type: str) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_groups, cfg.head_dim
        self.sliding = layer_type == SLIDING
        self.window = cfg.sliding_window if self.sliding else None
        self.rope_base = cfg.rope_local_base if self.sliding else cfg.rope_base
        self.scale = cfg.query_pre_attn_scalar**-0.5
        d = cfg.emb_dim
        self.q_proj = nn.Linear(d, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_groups * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_groups * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, d, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor | None,
        valid: torch.Tensor | None,
        cache: LayerCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if positions is None and cache is None and valid is None:
            # Training fast path: plain causal attention keeps SDPA's flash kernel; an explicit
            # mask is only built when the window actually bites (T > W).
            if self.window is None or T <= self.window:
                return self._attend(q, k, v, mask=None, is_causal=True)
            pos = torch.arange(T, device=x.device)[None]
            mask = attention_mask(pos, pos, None, self.window)
            return self._attend(q, k, v, mask=mask, is_causal=False)

        assert positions is not None
        k_pos = positions
        k_valid = valid if valid is not None else torch.ones_like(positions, dtype=torch.bool)
        if cache is not None:
            if cache.k is not None:
                k = torch.cat((cache.k, k), dim=2)
                v = torch.cat((cache.v, v), dim=2)
                k_pos = torch.cat((cache.pos, k_pos), dim=1)
                k_valid = torch.cat((cache.valid, k_valid), dim=1)
            keep = k.shape[2] if self.window is None else min(k.shape[2], self.window - 1)
            s = k.shape[2] - keep
            cache.k, cache.v = k[:, :, s:], v[:, :, s:]
            cache.pos, cache.valid = k_pos[:, s:], k_valid[:, s:]
        mask = attention_mask(positions, k_pos, k_valid, self.window)
        return self._attend(q, k, v, mask=mask, is_causal=False)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor:
        B, _, T, _ = q.shape
        if self.n_kv != self.n_heads:
            # Expanding K/V keeps every SDPA backend available (enable_gqa is not on all of them).
            rep = self.n_heads // self.n_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.emb_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, layer_type: str) -> None:
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = Attention(cfg, layer_type)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor | None,
        valid: torch.Tensor | None,
        cache: LayerCache | None,
    ) -> torch.Tensor:
        h = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), rope, positions, valid, cache)
        )
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3Model(nn.Module):
    """The decoder stack (HF's `model.` prefix): scaled embedding, layers, final norm."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.padded_vocab_size, cfg.emb_dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, lt) for lt in cfg.layer_types)
        self.norm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.config = cfg
        self.model = Gemma3Model(cfg)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """HF's Gemma 3 init: N(0, 0.02) for every matrix, zeros for the (1+w) norm weights."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.zeros_(m.weight)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layers)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) and, with targets, the mean cross-entropy (ignore_index -100).

        Training passes only `idx` (positions 0..T-1). Generation passes `positions` (B, T),
        `valid` (B, T; False marks left padding) and a `cache` that this call extends.
        `last_only` computes logits for the last position only (decoding).
        """
        cfg = self.config
        B, T = idx.shape
        x = self.model.embed_tokens(idx)
        x = x * torch.tensor(math.sqrt(cfg.emb_dim), dtype=x.dtype, device=x.device)

        if positions is None and cache is not None:
            start = cache.seq_len
            positions = torch.arange(start, start + T, device=idx.device).expand(B, T)
        rope_pos = positions if positions is not None else torch.arange(T, device=idx.device)[None]
        ropes = {
            base: rope_cos_sin(rope_pos, cfg.head_dim, base, x.dtype)
            for base in {cfg.rope_local_base, cfg.rope_base}
        }
        for i, layer in enumerate(self.model.layers):
            rope = ropes[layer.self_attn.rope_base]
            x = layer(x, rope, positions, valid, cache.layers[i] if cache is not None else None)
        x = self.model.norm(x)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        if cfg.padded_vocab_size != cfg.vocab_size:
            logits = logits[..., : cfg.vocab_size]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
            )
        return logits, loss

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
