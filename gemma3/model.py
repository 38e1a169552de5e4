"""Gemma 3 text model, written out in plain PyTorch.

Module names follow Hugging Face's `Gemma3ForCausalLM` (`model.layers.N.self_attn.q_proj`, ...)
so a state dict converts 1:1. The math, in order, for one block:

    h   = x + post_attention_layernorm(attn(input_layernorm(x)))
    out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))

attn: GQA with RMSNorm on q and k (per head, before RoPE), half-split RoPE with base 1e4 on
sliding-window layers and 1e6 on full layers, scores scaled by query_pre_attn_scalar**-0.5.
Sliding window W: query i sees keys j with i - W < j <= i. mlp: GeGLU with tanh-GELU.

A forward pass works out, once per layer type, what every layer of that type needs (RoPE tables,
the attention mask, where the keys come from) in a `LayerPlan`; layers only apply it. Decoding
keeps keys and values in a preallocated `KVCache` that counts its own tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gemma3.config import SLIDING, Config

# Rows of hidden states turned into logits at a time by the training loss (see chunked_loss).
LOSS_CHUNK_ROWS = 512


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in fp32, scaled by (1 + w) with w initialised to zero."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        # 1 + w, computed once while `keep_scale` is on: `generate` turns it on for one call
        # (decoding calls each norm once per token, and the add was a third of the norm's time
        # at batch 1) and off at its end. Off (training, evaluation) every call computes it, so
        # weights updated in place are always seen.
        self.keep_scale = False
        self._scale: torch.Tensor | None = None

    def scale(self) -> torch.Tensor:
        """1 + w in fp32."""
        if not self.keep_scale or torch.compiler.is_compiling():
            return 1.0 + self.weight.float()
        if self._scale is None:
            self._scale = 1.0 + self.weight.detach().float()
        return self._scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * (1 + w) in fp32, in one op (bit-identical to the
        # five-op form).
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.scale(), self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.scale(), self.eps).to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (B, 1, T, head_dim) for integer positions of shape (B, T).

    Angles are computed in fp32 and cast at the end, as transformers does.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (base ** (exponent / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((angles, angles), dim=-1)  # (B, T, head_dim)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split ("rotate_half") rotary embedding, not the interleaved variant."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def attention_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor | None,
    window: int | None,
) -> torch.Tensor:
    """Boolean mask (B, 1, Tq, Tk), True where query may attend: causal, windowed, not padding.

    `q_pos` (B, Tq) and `k_pos` (B, Tk) only need to differ by the right amounts (positions or
    batch columns both work); a key position < 0 marks an empty cache slot.
    """
    diff = q_pos[:, :, None] - k_pos[:, None, :]  # (B, Tq, Tk): how far back the key is
    allowed = (diff >= 0) & (k_pos >= 0)[:, None, :]
    if window is not None:
        allowed &= diff < window
    if k_valid is not None:
        allowed &= k_valid[:, None, :]
    # A padding query may have no allowed key at all; let it see everything so softmax stays
    # finite. Its output is never used.
    allowed |= ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None]


def apply_rope_signed(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """`apply_rope` with the rotation's sign folded into the table (sin_signed = [-sin1, sin2]):
    four ops instead of six, bit-identical ((-a) * b == a * (-b) in floating point)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


@dataclass
class LayerPlan:
    """What every layer of one type needs for this forward pass, built once per type.

    Exactly one of three attention modes applies:
    - `is_causal`: plain causal attention from position 0 (training; keeps SDPA's fast kernels);
    - `mask` (B, 1, Tq, Tk): an explicit boolean mask over the keys the layer attends to;
    - `decode`: one new token attends to the cached slots (and, in sliding layers, to itself);
      `decode_bias` (B, 1, 1, S) is 0 where a slot may be seen and -inf where not, or None.
    """

    cos: torch.Tensor  # (B or 1, 1, T, head_dim)
    sin: torch.Tensor
    is_causal: bool = False
    mask: torch.Tensor | None = None
    decode: bool = False
    decode_bias: torch.Tensor | None = None
    static_cols: torch.Tensor | None = None  # (T,) columns written this step (StaticKVCache)
    static_bias: torch.Tensor | None = None  # (B, 1, 1, T, S) additive mask over every slot


class KVCache:
    """Preallocated keys and values for decoding; pass the same object to successive forwards.

    Full-attention layers keep every token up to `max_len` in one buffer. Sliding layers keep a
    ring of W-1 slots: the next query at column c needs keys c-W+1..c, and its own key arrives
    with it, so a one-token step attends to the ring plus itself without copying either. Batch
    rows are left-padded; the cache tracks, per column, which entries are real, and per row how
    many real tokens it has seen, so positions are right however the tokens are fed.
    """

    def __init__(
        self, cfg: Config, batch_size: int, max_len: int, device: torch.device | None = None
    ) -> None:
        self.layer_types = cfg.layer_types
        self.window = cfg.sliding_window
        self.max_len = max_len
        self.ring = max(cfg.sliding_window - 1, 1)
        self.seen = 0  # batch columns fed so far
        self.start = 0  # first column of the current step
        self.n_real = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.all_valid = True  # no padding seen yet: decode steps need no mask
        # Column held by each ring slot (-1: empty), the same for every sliding layer.
        self.ring_cols = torch.full((self.ring,), -1, dtype=torch.long, device=device)
        # Keys are stored transposed, (B, n_kv, head_dim, S), so a one-token step's scores are
        # one plain matmul (a transposed view would be copied on every step in bf16).
        self.k_t: list[torch.Tensor | None] = [None] * len(cfg.layer_types)
        self.v: list[torch.Tensor | None] = [None] * len(cfg.layer_types)  # (B, n_kv, S, hd)

    def keys(self, layer: int) -> torch.Tensor:
        """The keys a layer holds, (B, n_kv, S, head_dim): slot s of a sliding layer holds the
        column in `ring_cols[s]`, slot s of a full layer column s."""
        return self.k_t[layer].transpose(-1, -2)

    def slots(self, layer_type: str) -> int:
        return self.ring if layer_type == SLIDING else self.max_len

    def begin(self, valid: torch.Tensor) -> torch.Tensor:
        """Record T new columns (valid: (B, T), False for padding); returns their positions."""
        T = valid.shape[1]
        if self.seen + T > self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} columns; {self.seen + T} requested")
        self.start = self.seen
        self.valid[:, self.start : self.start + T] = valid
        self.all_valid = self.all_valid and bool(valid.all())
        positions = self.n_real[:, None] + valid.long().cumsum(dim=1) - 1  # (B, T)
        self.n_real += valid.sum(dim=1)
        self.seen += T
        return positions.clamp(min=0)

    def plan_masks(self, layer_type: str, T: int) -> dict:
        """Mask fields of a `LayerPlan` for this step, computed from the columns alone."""
        device = self.valid.device
        window = self.window if layer_type == SLIDING else None
        q_cols = torch.arange(self.start, self.start + T, device=device)
        if T == 1:
            if layer_type == SLIDING:
                cols = self.ring_cols  # (S,), then the query itself
                held = (cols >= 0) & (self.start - cols < self.window)
                mask = held[None] & self.valid[:, cols.clamp(min=0)]  # (B, S)
                mask = F.pad(mask, (0, 1), value=True)  # (B, S + 1): a token sees itself
                if self.all_valid and bool(held.all()):
                    mask = None
            else:
                mask = None if self.all_valid else self.valid[:, : self.start + 1]  # (B, start + 1)
            bias = None
            if mask is not None:
                bias = torch.zeros(mask.shape, device=device).masked_fill_(~mask, float("-inf"))
                bias = bias[:, None, None, :]  # (B, 1, 1, S)
            return {"decode": True, "decode_bias": bias}
        if layer_type == SLIDING:
            # The first step (the prompt) has an empty ring: its keys are its own only.
            k_cols = q_cols if self.start == 0 else torch.cat((self.ring_cols, q_cols))
        else:
            k_cols = torch.arange(self.start + T, device=device)
        k_valid = self.valid[:, k_cols.clamp(min=0)]
        B = self.valid.shape[0]
        mask = attention_mask(q_cols.expand(B, T), k_cols.expand(B, -1), k_valid, window)
        return {"mask": mask}

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, n_kv, T, head_dim); return the keys to attend to,
        transposed (B, n_kv, head_dim, S), and the values (B, n_kv, S, head_dim).

        Full layers: the buffer up to the current column (the new keys included). Sliding
        layers: the ring slots, followed by the new keys for a multi-token step; for a one-token
        step the ring only (the layer adds its own key), written after it has been read.
        """
        B, n_kv, T, hd = k.shape
        if self.k_t[layer] is None:
            S = self.slots(self.layer_types[layer])
            self.k_t[layer] = k.new_zeros(B, n_kv, hd, S)
            self.v[layer] = v.new_zeros(B, n_kv, S, hd)
        ck, cv = self.k_t[layer], self.v[layer]
        end = self.start + T
        if self.layer_types[layer] != SLIDING:
            ck[..., self.start : end] = k.transpose(-1, -2)
            cv[:, :, self.start : end] = v
            return ck[..., :end], cv[:, :, :end]
        if T == 1:
            return ck, cv  # the caller writes with write_ring once attention has read the slots
        if self.start == 0:  # nothing in the ring yet: attend to the new keys only
            self.write_ring(layer, k, v)
            return k.transpose(-1, -2), v
        keys_t, values = torch.cat((ck, k.transpose(-1, -2)), dim=-1), torch.cat((cv, v), dim=2)
        self.write_ring(layer, k, v)
        return keys_t, values

    def write_ring(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put the last W-1 of this step's keys into their ring slots (slot = column mod W-1)."""
        T = k.shape[2]
        if T == 1:  # the common decode step: one slice copy each
            slot = self.start % self.ring
            self.k_t[layer][..., slot : slot + 1] = k.transpose(-1, -2)
            self.v[layer][:, :, slot : slot + 1] = v
            return
        keep = min(T, self.ring)
        cols = torch.arange(self.start + T - keep, self.start + T, device=k.device)
        slots = cols % self.ring
        self.k_t[layer][..., slots] = k[:, :, T - keep :].transpose(-1, -2)
        self.v[layer][:, :, slots] = v[:, :, T - keep :]

    def end(self) -> None:
        """After every layer has run: record which column each ring slot now holds."""
        T = self.seen - self.start
        keep = min(T, self.ring)
        cols = torch.arange(self.seen - keep, self.seen, device=self.ring_cols.device)
        self.ring_cols[cols % self.ring] = cols

    def held_positions(self, layer: int) -> torch.Tensor:
        """Positions (B, S) of the keys a layer holds between steps (-1: empty or padding)."""
        S = self.slots(self.layer_types[layer])
        if self.seen == 0:
            return torch.full((self.valid.shape[0], S), -1, device=self.valid.device)
        if self.layer_types[layer] == SLIDING:
            cols = self.ring_cols
        else:
            cols = torch.arange(self.seen, device=self.valid.device)
            cols = F.pad(cols, (0, self.max_len - self.seen), value=-1)
        valid = self.valid[:, cols.clamp(min=0)] & (cols >= 0)
        real_before = self.valid[:, : self.seen].long().cumsum(dim=1) - 1
        pos = real_before[:, cols.clamp(min=0)]
        return torch.where(valid, pos, torch.full_like(pos, -1))


class StaticKVCache(nn.Module):
    """Fixed-shape cache for graph capture: `torch.compile(mode="reduce-overhead")` / CUDA graphs.

    Every layer keeps `max_len` columns (the sliding window is applied by the mask, not by a
    ring), the step's columns and positions arrive as tensors, and the masks and RoPE tables are
    computed from them, so a one-token step runs the same kernels on the same buffers every time.
    The buffers are module buffers (not inputs), so a captured graph may write them in place.
    Batch rows are left-padded: `valid` (B, max_len) marks the real columns.
    """

    def __init__(
        self, cfg: Config, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.window = cfg.sliding_window
        self.max_len = max_len
        B, hd, kw = batch_size, cfg.head_dim, dict(dtype=dtype, device=device)
        for i in range(cfg.n_layers):  # keys transposed, as in KVCache: (B, n_kv, hd, S)
            self.register_buffer(
                f"k_t{i}", torch.zeros(B, cfg.n_kv_heads, hd, max_len, **kw), False
            )
            self.register_buffer(f"v{i}", torch.zeros(B, cfg.n_kv_heads, max_len, hd, **kw), False)
        self.register_buffer(
            "valid", torch.zeros(B, max_len, dtype=torch.bool, device=device), False
        )
        self.register_buffer("key_cols", torch.arange(max_len, device=device), False)
        all_pos = torch.arange(max_len, device=device)[None]
        for lt in sorted(set(cfg.layer_types)):  # RoPE tables for every position this cache holds
            base = cfg.rope_local_base if lt == SLIDING else cfg.rope_base
            cos, sin = rope_cos_sin(all_pos, hd, base, dtype)  # (1, 1, S, hd)
            sign = torch.ones(hd, dtype=dtype, device=device)
            sign[: hd // 2] = -1
            self.register_buffer(f"cos_{lt}", cos[0, 0], False)
            self.register_buffer(f"sin_{lt}", sin[0, 0] * sign, False)  # for apply_rope_signed

    def reset(self) -> None:
        """Forget every column (the buffers are reused by the next generation)."""
        self.valid.zero_()

    def plan(self, layer_type: str, cols: torch.Tensor, positions: torch.Tensor) -> LayerPlan:
        """RoPE rows for `positions` (B, T) and the additive mask for queries at `cols` (T,)."""
        cos = getattr(self, f"cos_{layer_type}")[positions][:, None]  # (B, 1, T, hd)
        sin = getattr(self, f"sin_{layer_type}")[positions][:, None]
        back = cols[:, None] - self.key_cols[None]  # (T, S): how far back each slot is
        ok = back >= 0
        if layer_type == SLIDING:
            ok = ok & (back < self.window)
        ok = ok[None] & self.valid[:, None, :]  # (B, T, S)
        ok = ok | ~ok.any(dim=-1, keepdim=True)  # a padding query sees everything (unused)
        bias = torch.zeros(ok.shape, device=ok.device).masked_fill(~ok, float("-inf"))
        return LayerPlan(cos, sin, static_cols=cols, static_bias=bias[:, None, None])

    def store(
        self, layer: int, cols: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) at `cols`; return every slot's keys (transposed) and values."""
        k_t, cv = getattr(self, f"k_t{layer}"), getattr(self, f"v{layer}")
        k_t.index_copy_(3, cols, k.transpose(-1, -2))
        cv.index_copy_(2, cols, v)
        return k_t, cv


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer_type: str, layer_idx: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.layer_idx = layer_idx
        self.sliding = layer_type == SLIDING
        self.scale = cfg.query_pre_attn_scalar**-0.5
        d = cfg.emb_dim
        self.q_proj = nn.Linear(d, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, d, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, plan: LayerPlan, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape  # batch, sequence length, emb_dim
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rope = apply_rope if plan.static_cols is None else apply_rope_signed
        q, k = rope(q, plan.cos, plan.sin), rope(k, plan.cos, plan.sin)

        if plan.static_cols is not None:
            y = self._static_step(q, k, v, plan, cache)  # (B, nh, T, hd)
        elif plan.decode:
            y = self._decode_step(q, k, v, plan.decode_bias, cache)  # (B, nh, 1, hd)
        else:
            if cache is not None:
                k_t, v = cache.update(self.layer_idx, k, v)  # (B, nkv, hd, S), (B, nkv, S, hd)
                k = k_t.transpose(-1, -2)  # (B, nkv, S, hd)
            gqa = self.n_kv != self.n_heads
            if gqa and plan.mask is not None and q.device.type != "cpu":
                # GPU kernels for explicit masks lack GQA: expand K/V rather than fall to math.
                rep = self.n_heads // self.n_kv
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
                gqa = False
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=plan.mask,
                is_causal=plan.is_causal,
                scale=self.scale,
                enable_gqa=gqa,
            )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh * hd)
        return self.o_proj(y)  # (B, T, emb_dim)

    def _decode_step(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None,
        cache: KVCache,
    ) -> torch.Tensor:
        """One new token: softmax over the cached keys and the token's own key, in fp32.

        Query heads sharing a KV head are stacked as rows of one matmul (no K/V expansion), and
        the sliding ring is read in place: its oldest slot is overwritten only afterwards.
        """
        B = q.shape[0]
        rep = self.n_heads // self.n_kv
        qg = q.view(B, self.n_kv, rep, self.head_dim)  # (B, nkv, rep, hd)
        ck_t, cv = cache.update(self.layer_idx, k, v)  # (B, nkv, hd, S), (B, nkv, S, hd)
        scores = qg @ ck_t  # (B, nkv, rep, S)
        if self.sliding:
            own = qg @ k.transpose(-1, -2)  # (B, nkv, rep, 1)
            scores = torch.cat((scores, own), dim=-1)  # (B, nkv, rep, S + 1)
        if bias is None:
            scores = scores.float() * self.scale
        else:
            scores = torch.add(bias, scores.float(), alpha=self.scale)  # bias + scale * scores
        p = scores.softmax(dim=-1).to(v.dtype)
        if self.sliding:
            y = p[..., :-1] @ cv + p[..., -1:] * v  # (B, nkv, rep, hd)
            cache.write_ring(self.layer_idx, k, v)
        else:
            y = p @ cv
        return y.view(B, self.n_heads, 1, self.head_dim)

    def _static_step(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        plan: LayerPlan,
        cache: StaticKVCache,
    ) -> torch.Tensor:
        """T new tokens against every slot of a `StaticKVCache` (masked), softmax in fp32.

        The same math as `_decode_step`, over fixed shapes: query heads sharing a KV head are
        rows of one matmul, and masked slots get exactly zero weight.
        """
        B, _, T, hd = q.shape
        rep = self.n_heads // self.n_kv
        k_t, cv = cache.store(self.layer_idx, plan.static_cols, k, v)  # (B,nkv,hd,S), (B,nkv,S,hd)
        qg = q.reshape(B, self.n_kv, rep * T, hd)  # (B, nkv, rep*T, hd)
        scores = (qg @ k_t).view(B, self.n_kv, rep, T, -1)  # (B, nkv, rep, T, S)
        scores = torch.add(plan.static_bias, scores.float(), alpha=self.scale)
        p = scores.softmax(dim=-1).to(cv.dtype).view(B, self.n_kv, rep * T, -1)
        return (p @ cv).view(B, self.n_heads, T, hd)


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
    def __init__(self, cfg: Config, layer_type: str, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = Attention(cfg, layer_type, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, plan: LayerPlan, cache: KVCache | None) -> torch.Tensor:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), plan, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3Model(nn.Module):
    """The decoder stack (HF's `model.` prefix): scaled embedding, layers, final norm."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.padded_vocab_size, cfg.emb_dim)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, lt, i) for i, lt in enumerate(cfg.layer_types)
        )
        self.norm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ weight.T` (first `vocab` columns) without the full logits.

    Rows are turned into fp32 logits `chunk` at a time, and the gradients with respect to `h` and
    `weight` are computed in the same pass (softmax - one-hot), so neither the forward nor the
    backward ever holds more than one chunk of logits.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, vocab: int, chunk: int):  # noqa: ANN001, ANN205
        device = h.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else weight.dtype
        # Cast once: under autocast every chunk's three matmuls would cast the head again.
        w = weight[:vocab].to(dtype)  # (V, d)
        hs = h.to(dtype)  # (N, d)
        keep = targets != -100  # (N,)
        n = keep.sum().clamp(min=1)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        rows = torch.arange(min(chunk, h.shape[0]), device=h.device)
        with torch.autocast(device, enabled=False):
            for s in range(0, h.shape[0], chunk):
                hc, tc, kc = hs[s : s + chunk], targets[s : s + chunk], keep[s : s + chunk]
                r, t = rows[: hc.shape[0]], tc.clamp(min=0)
                logits = F.linear(hc, w).float()  # (c, V)
                lse = logits.logsumexp(dim=-1)  # (c,)
                loss += ((lse - logits[r, t]) * kc).sum()
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[r, t] -= 1.0
                g = g.mul_((kc / n)[:, None]).to(dtype)  # d loss / d logits, (c, V)
                grad_h[s : s + chunk] = g @ w
                if dtype == grad_w.dtype:
                    grad_w[:vocab].addmm_(g.t(), hc)  # accumulate without a temporary
                else:
                    grad_w[:vocab] += g.t() @ hc
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss / n

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def chunked_loss(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int, chunk: int
) -> torch.Tensor:
    """Mean cross-entropy (ignore_index -100) of the lm head on rows of `h`, `chunk` rows at a time.

    Equal to `F.cross_entropy(F.linear(h, weight)[:, :vocab].float(), targets)` in value and
    gradients, but never materialises the (rows x vocab) fp32 logits: at micro-batch 32 x 128
    with GPT-2's vocabulary those are 824 MB, plus as much again for their gradient.
    """
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(h, weight, targets, vocab, chunk)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk):
        logits = F.linear(h[s : s + chunk], weight[:vocab]).float()
        total += F.cross_entropy(logits, targets[s : s + chunk], ignore_index=-100, reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.config = cfg
        self.model = Gemma3Model(cfg)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # sqrt(emb_dim) rounded to the activations' dtype (HF multiplies by a bf16 25.25, not
        # 25.298, in a bf16 model), kept as Python numbers: a tensor made in forward would be a
        # blocking host-to-device copy on every call of the eager model on a GPU.
        self.embed_scale = {
            dt: torch.tensor(math.sqrt(cfg.emb_dim), dtype=dt, device="cpu").item()
            for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
        }
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """HF's Gemma 3 init: N(0, 0.02) for every matrix, zeros for the (1+w) norm weights."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.zeros_(m.weight)

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        """An empty cache for `batch_size` rows and up to `max_len` tokens (default: context)."""
        device = self.model.embed_tokens.weight.device
        return KVCache(self.config, batch_size, max_len or self.config.context_length, device)

    def forward_static(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor,
        cols: torch.Tensor,
        cache: StaticKVCache,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, vocab_size) of the last column, for tokens `idx` (B, T) written at cache
        columns `cols` (T,) with RoPE `positions` (B, T); `valid` (B, T) marks padding (default:
        all real). Shapes depend only on (B, T), so the one-token step can be graph-captured."""
        cfg = self.config
        new_valid = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid
        cache.valid.index_copy_(1, cols, new_valid)
        x = self.model.embed_tokens(idx)  # (B, T, emb_dim)
        x = x * self.embed_scale[x.dtype]
        plans = {lt: cache.plan(lt, cols, positions) for lt in set(cfg.layer_types)}
        for layer in self.model.layers:
            x = layer(x, plans[layer.layer_type], cache)
        logits = self.lm_head(self.model.norm(x[:, -1]))  # (B, padded_vocab_size)
        return logits[:, : cfg.vocab_size]

    def _plans(
        self,
        T: int,
        positions: torch.Tensor | None,
        valid: torch.Tensor | None,
        cache: KVCache | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> dict[str, LayerPlan]:
        """RoPE tables and masks, once per layer type present in the model."""
        cfg = self.config
        if cache is not None:
            new_valid = valid if valid is not None else torch.ones(1, T, dtype=torch.bool)
            new_valid = new_valid.to(device).expand(cache.valid.shape[0], T)
            cache_pos = cache.begin(new_valid)
            positions = positions if positions is not None else cache_pos
        elif valid is not None and positions is None:
            positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        # Training mode: no cache, no padding, positions 0..T-1, so plain causal attention.
        contiguous = cache is None and valid is None and positions is None
        rope_pos = torch.arange(T, device=device)[None] if contiguous else positions
        plans = {}
        for lt in sorted(set(cfg.layer_types)):
            base = cfg.rope_local_base if lt == SLIDING else cfg.rope_base
            cos, sin = rope_cos_sin(rope_pos, cfg.head_dim, base, dtype)
            window = cfg.sliding_window if lt == SLIDING else None
            if cache is not None:
                plans[lt] = LayerPlan(cos, sin, **cache.plan_masks(lt, T))
            elif contiguous and (window is None or T <= window):
                plans[lt] = LayerPlan(cos, sin, is_causal=True)
            else:
                q_pos = rope_pos.expand(positions.shape[0] if positions is not None else 1, T)
                plans[lt] = LayerPlan(cos, sin, mask=attention_mask(q_pos, q_pos, valid, window))
        return plans

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits (B, T, vocab_size), None) or, with targets, (None, mean cross-entropy).

        Training passes `idx` (B, T) and `targets` (positions 0..T-1, ignore_index -100); the
        loss is computed in chunks (`chunked_loss`), so no logits are returned with it.
        Generation passes `valid` (B, T; False marks left padding) and a `cache` that this call
        extends; positions then come from the cache (or from `valid` without one) unless given.
        `last_only` computes logits for the last position only (decoding).
        """
        cfg = self.config
        B, T = idx.shape
        x = self.model.embed_tokens(idx)  # (B, T, emb_dim)
        x = x * self.embed_scale[x.dtype]
        plans = self._plans(T, positions, valid, cache, x.dtype, idx.device)
        for layer in self.model.layers:
            x = layer(x, plans[layer.layer_type], cache)
        if cache is not None:
            cache.end()
        x = self.model.norm(x)
        if targets is not None:
            h = x.reshape(B * T, cfg.emb_dim)
            if torch.compiler.is_compiling() or not isinstance(self.lm_head, nn.Linear):
                # Under torch.compile the chunk loop would be unrolled into the graph: on an H100
                # that made compilation and the step slower as the micro-batch grew (RESULTS.md,
                # GPU). Inductor fuses the cast and log-softmax of the plain form instead.
                # An int8 head (gemma3.quant) has no float weight for the chunked loss either.
                logits = self.lm_head(h)[:, : cfg.vocab_size].float()  # (B*T, vocab_size)
                return None, F.cross_entropy(logits, targets.reshape(-1), ignore_index=-100)
            loss = chunked_loss(
                h, self.lm_head.weight, targets.reshape(-1), cfg.vocab_size, LOSS_CHUNK_ROWS
            )
            return None, loss
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)  # (B, T, padded_vocab_size)
        if cfg.padded_vocab_size != cfg.vocab_size:
            logits = logits[..., : cfg.vocab_size]
        return logits, None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
