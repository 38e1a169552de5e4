"""Raw stories -> GPT-2 token ids in uint16 memmaps, and batches drawn from them.

Batches are a pure function of (seed, step): `sample_batch(..., seed, step)` seeds its own
generator from both, so resuming at step k needs no sampler state, and every process of a DDP job
gets different windows by asking for different global step indices.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gemma3.data.raw import SPLITS, quiet_datasets, split_path, write_error
from gemma3.errors import Gemma3Error
from gemma3.fileio import atomic_path, atomic_write_json, is_regular_file, load_json_object
from gemma3.tokenizer import EOT_ID, VOCAB_SIZE, get_encoding

if TYPE_CHECKING:  # torch only where batches are made: the tokenize stage never imports it
    import torch


def _encode_batch(batch: dict[str, list[str]], eot: bool) -> dict[str, list[Any]]:
    """datasets.map function (module level, so worker processes can import it)."""
    enc = get_encoding()
    ids = [enc.encode_ordinary(t) for t in batch["text"]]
    if eot:
        for story in ids:
            story.append(EOT_ID)
    return {"ids": ids, "n_bytes": [len(t.encode("utf-8")) for t in batch["text"]]}


def _first_bad_raw_line(path: Path) -> Gemma3Error:
    """Name the first line of a raw split that is not a {"text": string} object."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                ok = isinstance(obj, dict) and isinstance(obj.get("text"), str)
            except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, too deep
                return Gemma3Error(f'{path}:{lineno}: not a {{"text": ...}} JSON line ({e})')
            if not ok:
                return Gemma3Error(f'{path}:{lineno}: not a {{"text": ...}} JSON line')
    return Gemma3Error(f"{path}: not a raw split; re-run the download stage (dvc repro download)")


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind an exception that datasets wrapped, if any."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def load_raw_split(raw_dir: str | os.PathLike[str], split: str, cache_dir: Path) -> Any:
    """A raw split as a datasets.Dataset (pyarrow's JSON reader; a bad line is named)."""
    import datasets

    path = split_path(raw_dir, split)
    if not is_regular_file(path):
        raise Gemma3Error(
            f"{path}: raw split not found; run the download stage first (dvc repro download)"
        )
    if path.stat().st_size == 0:
        return datasets.Dataset.from_dict({"text": []})
    features = datasets.Features({"text": datasets.Value("string")})
    try:
        ds = datasets.Dataset.from_json(str(path), features=features, cache_dir=str(cache_dir))
    except Exception as e:
        disk = _os_error(e)
        if disk is not None:  # e.g. the disk filled up under the datasets cache
            raise write_error(disk.filename or cache_dir, disk) from None
        raise _first_bad_raw_line(path) from None  # pyarrow's message has no line number
    if ds.data.column("text").null_count:
        raise _first_bad_raw_line(path)
    return ds


def tokenize_split(
    raw_dir: str | os.PathLike[str],
    split: str,
    out_path: str | os.PathLike[str],
    *,
    eot: bool = True,
    num_proc: int = 2,
    batch_stories: int = 1024,
    progress: bool = True,
) -> dict[str, int]:
    """One split -> `out_path` (uint16), EOT after every story; returns counts.

    `datasets.map(batched=True, num_proc=...)` encodes in worker processes; the ids are then
    written in order, one batch of stories at a time (never the whole split in memory), so the
    file is the same for any `num_proc`.
    """
    import datasets
    import pyarrow.compute as pc

    out_path = Path(out_path)
    cache = out_path.parent / f".datasets-cache-{split}"
    cache.mkdir(parents=True, exist_ok=True)
    try:
        quiet_datasets()  # reading the raw file is quick; the encoding has a progress bar
        ds = load_raw_split(raw_dir, split, cache)
        if len(ds) == 0:
            raise Gemma3Error(
                f"{split_path(raw_dir, split)}: no stories in the {split} split; check data.source"
            )
        if progress:
            datasets.enable_progress_bars()
        # Worker processes cost about a second to start: not worth it for a split that fills
        # fewer than two batches per process. The output is the same either way.
        procs = num_proc if len(ds) >= 2 * num_proc * batch_stories else 1
        get_encoding()  # built here once: forked workers inherit it instead of each building it
        ids = ds.map(
            _encode_batch,
            batched=True,
            batch_size=batch_stories,
            num_proc=procs if procs > 1 else None,
            fn_kwargs={"eot": eot},
            remove_columns=["text"],
            features=datasets.Features(
                {"ids": datasets.List(datasets.Value("uint16")), "n_bytes": datasets.Value("int64")}
            ),
            desc=f"tokenize {split}",
        )
        n_tokens = 0
        try:
            with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
                for batch in ids.with_format("arrow").iter(batch_size=max(batch_stories, 8192)):
                    flat = pc.list_flatten(batch.column("ids")).to_numpy(zero_copy_only=False)
                    f.write(np.ascontiguousarray(flat, dtype=np.uint16).tobytes())
                    n_tokens += len(flat)
        except OSError as e:  # disk full: name the file, keep the previous tokens
            raise write_error(out_path, e) from None
        n_bytes = int(pc.sum(ids.data.column("n_bytes")).as_py() or 0)
        return {"tokens": n_tokens, "stories": len(ds), "bytes": n_bytes}
    except OSError as e:  # the datasets cache could not be written (disk full)
        if e.errno is None:
            raise
        raise write_error(e.filename or cache, e) from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def tokenize_raw(
    raw_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    eot: bool = True,
    num_proc: int = 2,
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
            num_proc=num_proc,
            batch_stories=batch_stories,
            progress=progress,
        )
    source_file = raw_dir / "source.json"
    fix = "re-run the download stage (dvc repro download)"
    source = load_json_object(source_file, fix) if is_regular_file(source_file) else None
    meta.update(
        {
            "vocab_size": VOCAB_SIZE,
            "dtype": "uint16",
            "eot": eot,
            "eot_id": EOT_ID,
            "tokenizer": "gpt2",
            "source": source,
        }
    )
    atomic_write_json(out_dir / "meta.json", meta)
    return meta


def read_tokens_meta(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """`<data_dir>/meta.json` as written by `tokenize_raw`; missing or unreadable is one line."""
    path = Path(data_dir) / "meta.json"
    if not is_regular_file(path):
        raise Gemma3Error(f"{path}: not found; run the tokenize stage first (dvc repro tokenize)")
    return load_json_object(path, "re-run the tokenize stage (dvc repro tokenize)")


def load_tokens(path: str | os.PathLike[str], *, vocab_size: int, min_tokens: int) -> np.ndarray:
    """Open a token file read-only, checking what would otherwise fail deep inside training."""
    path = Path(path)
    fix = "re-run the tokenize stage (dvc repro tokenize)"
    if not is_regular_file(path):
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
    import torch

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
