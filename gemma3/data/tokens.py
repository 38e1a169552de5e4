"""Raw stories -> GPT-2 token ids in uint16 memmaps, and batches drawn from them.

Batches are a pure function of (seed, step): `sample_batch(..., seed, step)` seeds its own
generator from both, so resuming at step k needs no sampler state, and every process of a DDP job
gets different windows by asking for different global step indices.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemma3.data.raw import SPLITS, read_split, split_path
from gemma3.errors import Gemma3Error
from gemma3.fileio import atomic_path, atomic_write_json
from gemma3.tokenizer import EOT_ID, VOCAB_SIZE, get_encoding


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_split(
    raw_dir: str | os.PathLike[str],
    split: str,
    out_path: str | os.PathLike[str],
    *,
    eot: bool = True,
    num_threads: int = 2,
    batch_stories: int = 1024,
    progress: bool = True,
) -> dict[str, int]:
    """Stream one split into `out_path` (uint16), EOT after every story; returns counts."""
    from tqdm import tqdm

    enc = get_encoding()
    source = split_path(raw_dir, split)
    n_tokens = n_stories = n_bytes = 0
    size = source.stat().st_size if source.exists() else 0
    with (
        atomic_path(out_path) as tmp,
        open(tmp, "wb") as f,
        tqdm(
            total=size, unit="B", unit_scale=True, desc=f"tokenize {split}", disable=not progress
        ) as bar,
    ):
        for texts in _batched(read_split(raw_dir, split), batch_stories):
            ids = enc.encode_ordinary_batch(texts, num_threads=num_threads)
            chunk: list[int] = []
            for story in ids:
                chunk.extend(story)
                if eot:
                    chunk.append(EOT_ID)
            np.asarray(chunk, dtype=np.uint16).tofile(f)
            n_tokens += len(chunk)
            n_stories += len(texts)
            b = sum(len(t.encode("utf-8")) for t in texts)
            n_bytes += b
            bar.update(b)
    if n_stories == 0:
        Path(out_path).unlink(missing_ok=True)
        raise Gemma3Error(f"{source}: no stories in the {split} split; check data.source")
    return {"tokens": n_tokens, "stories": n_stories, "bytes": n_bytes}


def tokenize_raw(
    raw_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    eot: bool = True,
    num_threads: int = 2,
    batch_stories: int = 1024,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize both splits into `<out_dir>/<split>.bin` and write `meta.json`."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    meta: dict[str, Any] = {}
    for split in SPLITS:
        meta[split] = tokenize_split(
            raw_dir,
            split,
            out_dir / f"{split}.bin",
            eot=eot,
            num_threads=num_threads,
            batch_stories=batch_stories,
            progress=progress,
        )
    source_file = raw_dir / "source.json"
    meta.update(
        {
            "vocab_size": VOCAB_SIZE,
            "dtype": "uint16",
            "eot": eot,
            "eot_id": EOT_ID,
            "tokenizer": "gpt2",
            "source": json.loads(source_file.read_text(encoding="utf-8"))
            if source_file.is_file()
            else None,
        }
    )
    atomic_write_json(out_dir / "meta.json", meta)
    return meta


def read_tokens_meta(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """`<data_dir>/meta.json` as written by `tokenize_raw`; missing or unreadable is one line."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise Gemma3Error(f"{path}: not found; run the tokenize stage first (dvc repro tokenize)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Gemma3Error(
            f"{path}: not valid JSON ({e}); re-run the tokenize stage (dvc repro tokenize)"
        ) from None
    if not isinstance(meta, dict):
        raise Gemma3Error(f"{path}: not a tokenize meta file; re-run the tokenize stage")
    return meta


def load_tokens(path: str | os.PathLike[str], *, vocab_size: int, min_tokens: int) -> np.ndarray:
    """Open a token file read-only, checking what would otherwise fail deep inside training."""
    path = Path(path)
    fix = "re-run the tokenize stage (dvc repro tokenize)"
    if not path.is_file():
        raise Gemma3Error(f"{path}: token file not found; {fix}")
    size = path.stat().st_size
    if size % 2:
        raise Gemma3Error(
            f"{path}: {size} bytes is not a whole number of uint16 tokens (truncated?); {fix}"
        )
    n = size // 2
    if n < min_tokens:
        raise Gemma3Error(
            f"{path}: {n} tokens, fewer than the {min_tokens} one window needs; "
            "use more data or a smaller block_size"
        )
    data = np.memmap(path, dtype=np.uint16, mode="r")
    chunk = 1 << 24
    for start in range(0, n, chunk):
        top = int(data[start : start + chunk].max())
        if top >= vocab_size:
            raise Gemma3Error(
                f"{path}: token id {top} >= the model's vocab_size {vocab_size}; "
                f"the data was tokenized for another vocabulary: {fix}"
            )
    return data


# Independent random streams drawn from one seed: training batches, and the fixed validation
# batches (the number is the stream's key in the generator's seed sequence; never change it).
STREAMS = {"train": 0, "validation": 1_000_003}


def sample_batch(
    data: np.ndarray,
    batch_size: int,
    block_size: int,
    *,
    seed: int,
    step: int,
    stream: str = "train",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows (x, y = x shifted by one) determined only by (seed, stream, step)."""
    rng = np.random.default_rng([seed, STREAMS[stream], step])
    starts = rng.integers(0, len(data) - block_size, size=batch_size)
    windows = np.stack([np.asarray(data[s : s + block_size + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(windows)
    return t[:, :-1], t[:, 1:]


def fixed_batches(
    data: np.ndarray, n_batches: int, batch_size: int, block_size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same validation batches every call, so periodic val losses are comparable."""
    return [
        sample_batch(data, batch_size, block_size, seed=seed, step=i, stream="validation")
        for i in range(n_batches)
    ]


def sequential_windows(
    data: np.ndarray, block_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping windows covering the array: every token but the first is a target once."""
    n = len(data)
    for start in range(0, n - 1, block_size):
        end = min(start + block_size, n - 1)
        window = np.asarray(data[start : end + 1], dtype=np.int64)
        yield window[:-1], window[1:]
