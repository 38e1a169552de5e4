"""Loss over a whole token array: every token (but the first) predicted exactly once."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gemma3.data.tokens import sequential_windows
from gemma3.model import Gemma3ForCausalLM
from gemma3.runtime import autocast


@torch.no_grad()
def evaluate_tokens(
    model: Gemma3ForCausalLM,
    data: np.ndarray,
    *,
    block_size: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: bool = True,
) -> dict[str, Any]:
    """Mean cross-entropy (nats/token) over non-overlapping windows; summed, not mean of means.

    `precision` is a resolved `gemma3.runtime` precision, the same policy training used.
    """
    from tqdm import tqdm

    device = torch.device(device)
    model.eval()
    total_nats, total_tokens = 0.0, 0
    n_windows = math.ceil((len(data) - 1) / block_size)
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def flush() -> None:
        nonlocal total_nats, total_tokens
        # Windows in one batch share a length (only the very last window can be shorter).
        x = torch.from_numpy(np.stack([w[0] for w in pending])).to(device)
        y = torch.from_numpy(np.stack([w[1] for w in pending])).to(device)
        with autocast(precision, device):
            logits, _ = model(x)
        nats = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"
        )
        total_nats += nats.item()
        total_tokens += y.numel()
        pending.clear()

    with tqdm(total=n_windows, desc="evaluate", unit="window", disable=not progress) as bar:
        for x, y in sequential_windows(data, block_size):
            if pending and len(x) != len(pending[0][0]):
                flush()
            pending.append((x, y))
            if len(pending) == batch_size:
                flush()
            bar.update(1)
        if pending:
            flush()
    loss = total_nats / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": total_tokens}


def bits_per_byte(loss: float, tokens: int, n_bytes: int) -> float:
    """Total bits over the text's UTF-8 bytes: tokenizer-independent, comparable across vocabularies.

    The <|endoftext|> predictions are included in `loss`; `n_bytes` counts the story texts only.
    """
    return loss * tokens / (math.log(2) * n_bytes)
