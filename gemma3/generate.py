"""Autoregressive generation with a KV cache: prefill the prompts once, then one token per step.

Prompts of different lengths are left-padded into one batch; padding is masked out and every
row's RoPE positions start at 0 at its first real token, so a row generates exactly what it would
generate alone. `use_cache=False` recomputes the whole sequence every step (the seed's way); it is
kept as the reference the cache is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from gemma3.config import Config
from gemma3.errors import Gemma3Error
from gemma3.model import Gemma3ForCausalLM
from gemma3.tokenizer import EOT_ID


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


def check_prompts(prompts: Sequence[Sequence[int]], cfg: Config) -> list[list[int]]:
    """Prompts as lists, an empty one replaced by `<|endoftext|>` (a new story); one-line errors
    for a prompt that does not fit the context or holds ids outside the vocabulary."""
    out = [list(p) if len(p) else [EOT_ID] for p in prompts]
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
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Pick one token per row from (B, V) logits: greedy at temperature 0, else filtered sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
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
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), EOT_ID, dtype=torch.long)
    valid = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            idx[i, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            valid[i, T - len(p) :] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    return idx.to(device), valid.to(device), positions.to(device)


@torch.no_grad()
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
    on_step: Callable[[list[int | None]], None] | None = None,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` for each prompt; returns the new tokens per prompt.

    An empty prompt starts from `<|endoftext|>`, i.e. the beginning of a new story. A row stops
    after `stop_token` (which is included in its output). `on_step` receives each step's new token
    per row (None for finished rows), for streaming. The same `seed` gives the same tokens.
    """
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    if not prompts:
        return []
    cfg = model.config
    prompts = check_prompts(prompts, cfg)

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    idx, valid, positions = _left_pad(prompts, device)
    B = len(prompts)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # Positions run to context_length - 1 at most (what the model was built for).
    last_pos = positions[:, -1:]
    steps = min(max_new_tokens, cfg.context_length - int(last_pos.max()) - 1)
    cache = model.new_cache() if use_cache else None

    def logits_for(ids: torch.Tensor, pos: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        logits, _ = model(ids, positions=pos, valid=val, cache=cache, last_only=True)
        return logits[:, -1].float()

    try:
        logits = logits_for(idx, positions, valid)
        for _ in range(steps):
            nxt = sample_next(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            step_tokens: list[int | None] = []
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    step_tokens.append(None)
                    continue
                out[i].append(t)
                step_tokens.append(t)
            if on_step is not None:
                on_step(step_tokens)
            if stop_token is not None:
                done |= nxt == stop_token
            if bool(done.all()):
                break
            last_pos = last_pos + 1
            ones = torch.ones((B, 1), dtype=torch.bool, device=device)
            if use_cache:
                logits = logits_for(nxt[:, None], last_pos, ones)
            else:
                idx = torch.cat((idx, nxt[:, None]), dim=1)
                valid = torch.cat((valid, ones), dim=1)
                positions = torch.cat((positions, last_pos), dim=1)
                logits = logits_for(idx, positions, valid)
    finally:
        model.train(was_training)
    return out
