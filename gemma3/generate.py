"""Autoregressive generation with a KV cache: prefill the prompts once, then one token per step.

Prompts of different lengths are left-padded into one batch; padding is masked out and every
row's RoPE positions start at 0 at its first real token, so with greedy decoding a row generates
exactly what it would generate alone. With sampling and a seed, row i draws from its own
generator seeded with seed + i (what a loop over prompts with seed + i gives); without a seed all
rows share torch's global RNG. `use_cache=False` recomputes the whole sequence every step (the
seed's way); it is kept as the reference the cache is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from gemma3.config import Config
from gemma3.errors import Gemma3Error
from gemma3.model import Gemma3ForCausalLM
from gemma3.tokenizer import EOT_ID

# Temperatures below float32's smallest normal number (1.2e-38) decode greedily: sampling runs in
# fp32, where such a divisor is 0 or loses its precision.
FP32_TINY = torch.finfo(torch.float32).tiny


def check_sampling(
    *, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    """One-line errors for sampling settings that would crash or silently misbehave."""
    if max_new_tokens < 0:
        raise Gemma3Error(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise Gemma3Error(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise Gemma3Error(f"top_k must be >= 0 (0 = off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise Gemma3Error(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def start_token(cfg: Config) -> int:
    """The token an empty prompt starts from: `<|endoftext|>` (a new story) when the vocabulary
    has it, else the last id (where GPT-2-style vocabularies keep their end-of-text token)."""
    return EOT_ID if EOT_ID < cfg.vocab_size else cfg.vocab_size - 1


def check_prompts(prompts: Sequence[Sequence[int]], cfg: Config) -> list[list[int]]:
    """Prompts as lists, an empty one replaced by `start_token` (a new story); one-line errors
    for a prompt that does not fit the context or holds ids outside the vocabulary."""
    out = [list(p) if len(p) else [start_token(cfg)] for p in prompts]
    longest = max((len(p) for p in out), default=0)
    if longest >= cfg.context_length:
        raise Gemma3Error(
            f"prompt has {longest} tokens; the model's context_length is {cfg.context_length} "
            "(shorten the prompt)"
        )
    bad = [t for p in out for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
        raise Gemma3Error(
            f"prompt token id {bad[0]} is outside the vocabulary (0..{cfg.vocab_size - 1})"
        )
    return out


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> torch.Tensor:
    """Pick one token per row from (B, V) logits: greedy at temperature 0, else filtered sampling.

    `generator` is one generator for all rows or one per row (each row then draws from its own).
    """
    if temperature < FP32_TINY:  # 0, or a temperature fp32 cannot hold: greedy
        return logits.argmax(dim=-1)
    # Shifted so the largest is 0 (the same distribution): a tiny temperature then sends the
    # others to -inf (probability 0, the limit) instead of the largest to +inf (NaN).
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the best always stays).
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    rows = [torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(generator)]
    return torch.cat(rows).squeeze(-1)


def _left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(idx, valid), both (B, T): prompts right-aligned; the padding id 0 is masked out anyway."""
    T = max(len(p) for p in prompts)
    idx = torch.zeros((len(prompts), T), dtype=torch.long)
    valid = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx[i, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        valid[i, T - len(p) :] = True
    return idx.to(device), valid.to(device)


def in_dtype(model: Gemma3ForCausalLM, dtype: torch.dtype | None) -> Gemma3ForCausalLM:
    """The model with its weights in `dtype`: itself when they already are, else a converted copy
    (built on the meta device: the only new memory is the converted weights)."""
    weight = model.lm_head.weight
    if dtype is None or weight.dtype == dtype:
        return model
    with torch.device("meta"):
        copy = Gemma3ForCausalLM(model.config)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    copy.load_state_dict(state, assign=True)
    if model.config.tie_embeddings:
        copy.lm_head.weight = copy.model.embed_tokens.weight
    return copy.to(weight.device).eval()


def generate(
    model: Gemma3ForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_token: int | None = EOT_ID,
    use_cache: bool = True,
    dtype: torch.dtype | None = None,
    compile: bool = False,
    on_step: Callable[[list[int | None]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` for each prompt; returns the new tokens per prompt.

    An empty prompt starts from `start_token` (`<|endoftext|>`: a new story). A row stops after
    `stop_token` (which is included in its output). `on_step` receives each step's new token
    per row (None for finished rows), for streaming. The same `seed` gives the same tokens; with
    a seed, row i samples from a generator seeded with seed + i. Greedy rows (temperature 0)
    generate exactly what they would alone; sampled rows do too, given seed + i alone.
    `dtype` runs the weights in that dtype (bf16 halves the bytes read per token, the limit of
    batch-1 decoding on a CPU); `compile` runs the one-token steps through torch.compile (on a
    CPU it compiles for a minute or more and measured no faster: see benchmarks/RESULTS.md).
    `should_stop()` is asked before every new token; True ends generation there (what was
    generated so far is returned), so a server's deadline or shutdown bounds a request.
    """
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    if not prompts:
        return []
    cfg = model.config
    prompts = check_prompts(prompts, cfg)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _generate(
                in_dtype(model, dtype),
                prompts,
                max_new_tokens,
                sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p),
                seed=seed,
                stop_token=stop_token,
                use_cache=use_cache,
                compile=compile,
                on_step=on_step,
                should_stop=should_stop,
            )
    finally:
        model.train(was_training)


def _generate(
    model: Gemma3ForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    sampling: dict,
    seed: int | None,
    stop_token: int | None,
    use_cache: bool,
    compile: bool,
    on_step: Callable[[list[int | None]], None] | None,
    should_stop: Callable[[], bool] | None = None,
) -> list[list[int]]:
    cfg = model.config
    device = model.lm_head.weight.device
    B = len(prompts)
    generators = None
    if seed is not None:
        generators = [torch.Generator(device=device).manual_seed(seed + i) for i in range(B)]

    idx, valid = _left_pad(prompts, device)
    # Positions run to context_length - 1 at most (what the model was built for).
    longest = max(len(p) for p in prompts)
    steps = min(max_new_tokens, cfg.context_length - longest)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = model.new_cache(B, idx.shape[1] + steps) if use_cache else None
    step_fn: nn.Module = model
    if compile and use_cache:
        step_fn = torch.compile(model, dynamic=True)

    logits, _ = model(idx, valid=valid, cache=cache, last_only=True)
    for step in range(steps):
        if should_stop is not None and should_stop():
            break
        nxt = sample_next(logits[:, -1].float(), **sampling, generator=generators)  # (B,)
        step_tokens: list[int | None] = []
        for i, t in enumerate(nxt.tolist()):
            step_tokens.append(None if done[i] else t)
            if not done[i]:
                out[i].append(t)
        if on_step is not None:
            on_step(step_tokens)
        if stop_token is not None:
            done |= nxt == stop_token
        if bool(done.all()) or step == steps - 1:
            break
        if use_cache:
            logits, _ = step_fn(nxt[:, None], cache=cache, last_only=True)
        else:
            idx = torch.cat((idx, nxt[:, None]), dim=1)
            valid = torch.cat((valid, torch.ones_like(valid[:, :1])), dim=1)
            logits, _ = model(idx, valid=valid, last_only=True)
    return out
