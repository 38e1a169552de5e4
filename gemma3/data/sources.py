"""Local story files (.txt / .jsonl / .parquet) read through `datasets`, written as the raw format.

Every source (a local file, a directory, the Hub's parquet files) becomes a `datasets.Dataset`
with one `text` column and goes through the same normalisation into `gemma3.data.raw`: stories are
stripped, empty ones dropped, and null rows counted and reported (never dropped silently).

Choices a user should know about:

- `.txt`: stories are separated by lines that hold only `<|endoftext|>` (the format of the
  TinyStories text files). Bytes that are not UTF-8 are an error naming file:line, not silently
  replaced: a wrongly encoded file would otherwise train on mojibake. A UTF-8 byte-order mark at
  the start of a .txt or .jsonl file is removed.
- `.jsonl`: one JSON object per line with a string (or null) field `text`; `.parquet`: a `text`
  column. Text that cannot be UTF-8 (a lone surrogate escape like `"\\ud800"`) names file:line.
- A directory holds one train file and one validation file (names containing `train` and
  `valid`), or a complete set of shards `train-00000-of-00004...`; anything else (two train
  files, `train_and_valid.txt`) is an error naming the files rather than a guess. A single file
  is split by a seeded random draw of `val_fraction` of its stories.
- `datasets` keeps an Arrow cache while it reads; it lives inside the stage's temporary output
  folder and is deleted with it, never in `~/.cache`: a cache keyed by file name would also
  serve a stale copy after the file is edited.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gemma3.data.raw import quiet_datasets, write_source_info, write_split
from gemma3.errors import Gemma3Error
from gemma3.fileio import is_regular_file

EOT_TEXT = "<|endoftext|>"
SUFFIXES = (".txt", ".jsonl", ".parquet")
BOM = "\ufeff"
_SHARD = re.compile(r"(?P<stem>.*?)-(?P<i>\d{5})-of-(?P<n>\d{5})(?P<rest>.*)")
_ROWS_PER_BATCH = 8192


# ---------------------------------------------------------------------------------------------
# Reading one file


def _read_txt(path: str) -> Iterator[dict[str, str | None]]:
    story: list[str] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise Gemma3Error(
                    f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                    f"{e.start + 1}); re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
                ) from None
            if lineno == 1:
                line = line.removeprefix(BOM)
            if line.strip() == EOT_TEXT:
                yield {"text": "".join(story)}
                story = []
            else:
                story.append(line)
    yield {"text": "".join(story)}


def _read_jsonl(path: str) -> Iterator[dict[str, str | None]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(BOM.encode("utf-8"))
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, too deep
                raise Gemma3Error(f"{path}:{lineno}: not a JSON line ({e})") from None
            text = obj.get("text", ...) if isinstance(obj, dict) else ...
            if text is not None and not isinstance(text, str):
                raise Gemma3Error(f'{path}:{lineno}: expected an object with a string "text" field')
            if text is not None:
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise Gemma3Error(
                        f"{path}:{lineno}: the text holds {e.object[e.start : e.end]!a}, a lone "
                        "surrogate that is not a character (a broken \\u escape); fix that line"
                    ) from None
            yield {"text": text}


def _features() -> Any:
    from datasets import Features, Value

    return Features({"text": Value("string")})


def _check_parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise Gemma3Error(f"{path}: not a readable parquet file ({e})") from None
    names = schema.names
    if "text" not in names:
        raise Gemma3Error(f"{path}: no 'text' column (columns: {', '.join(names) or 'none'})")
    # Only string columns are stories: datasets would cast an int64 column to "0", "1", ...
    tp = schema.field("text").type
    if pa.types.is_dictionary(tp):
        tp = tp.value_type
    if not (pa.types.is_string(tp) or pa.types.is_large_string(tp)):
        what = "has only nulls" if pa.types.is_null(tp) else f"is {tp}"
        raise Gemma3Error(
            f"{path}: column 'text' {what}, not strings; the stories must be a string column"
        )


def load_dataset_files(paths: list[Path], cache_dir: str | os.PathLike[str]) -> Any:
    """One `datasets.Dataset` with a `text` column from files of one type, in the given order."""
    import datasets

    quiet_datasets()
    suffix = {p.suffix.lower() for p in paths}
    if len(suffix) != 1:
        raise Gemma3Error(f"mixed file types in one split: {', '.join(p.name for p in paths)}")
    kind = suffix.pop()
    for p in paths:
        if not is_regular_file(p):  # a FIFO or /dev/zero is refused, never read (it would block)
            raise Gemma3Error(f"{p}: file not found")
    if kind not in SUFFIXES:
        raise Gemma3Error(f"{paths[0]}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    if kind == ".parquet":
        for p in paths:
            _check_parquet(p)
        build = datasets.Dataset.from_parquet
        args: dict[str, Any] = {"path_or_paths": [str(p) for p in paths], "columns": ["text"]}
    else:
        reader = _read_txt if kind == ".txt" else _read_jsonl

        def rows(files: list[str]) -> Iterator[dict[str, str | None]]:
            for f in files:
                yield from reader(f)

        build = datasets.Dataset.from_generator
        args = {"generator": rows, "gen_kwargs": {"files": [str(p) for p in paths]}}
    try:
        return build(**args, features=_features(), cache_dir=str(cache_dir))
    except datasets.exceptions.DatasetGenerationError as e:
        # datasets wraps what the reader raised; our one-line error is the cause.
        cause = e.__cause__ or e.__context__
        if isinstance(cause, Gemma3Error):
            raise cause from None
        raise Gemma3Error(f"{paths[0]}: cannot read the text ({cause or e})") from None
    except ValueError as e:
        if "corresponds to no data" in str(e):  # a file without a single row
            return datasets.Dataset.from_dict({"text": []}, features=_features())
        raise Gemma3Error(f"{paths[0]}: cannot read the text ({e})") from None


def iter_stories(ds: Any, counts: dict[str, int]) -> Iterator[str]:
    """Stripped, non-empty stories of a text Dataset; `counts` gains null and empty rows."""
    for batch in ds.with_format("arrow").iter(batch_size=_ROWS_PER_BATCH):
        for text in batch.column("text").to_pylist():
            if text is None:
                counts["null_rows"] += 1
                continue
            text = text.strip()
            if text:
                yield text
            else:
                counts["empty_rows"] += 1


def _new_counts() -> dict[str, int]:
    return {"null_rows": 0, "empty_rows": 0}


@contextlib.contextmanager
def datasets_cache(raw_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """A datasets cache inside the stage's temporary output folder, removed when done."""
    path = Path(raw_dir) / ".datasets-cache"
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_dataset_split(
    raw_dir: str | os.PathLike[str], split: str, ds: Any, where: str
) -> dict[str, int]:
    """Write one split of the raw format from a text Dataset; counts include skipped rows."""
    skipped = _new_counts()
    counts = write_split(raw_dir, split, iter_stories(ds, skipped))
    if counts["stories"] == 0:
        raise Gemma3Error(f"{where}: no stories for the {split} split")
    return {**counts, **skipped}


def write_parquet_splits(
    raw_dir: str | os.PathLike[str], files: dict[str, list[Path]], where: str
) -> dict[str, dict[str, int]]:
    """The Hub path: each split's parquet files (in order) -> the raw format."""
    out = {}
    with datasets_cache(raw_dir) as cache:
        for split, paths in files.items():
            ds = load_dataset_files(paths, cache)
            out[split] = write_dataset_split(raw_dir, split, ds, where)
    return out


# ---------------------------------------------------------------------------------------------
# Local sources


def read_stories(path: str | os.PathLike[str]) -> list[str]:
    """The stripped, non-empty stories of one local file (small files and tests)."""
    with tempfile.TemporaryDirectory(prefix="gemma3-datasets-") as cache:
        return list(iter_stories(load_dataset_files([Path(path)], cache), _new_counts()))


def is_shard_name(name: str) -> bool:
    return _SHARD.fullmatch(name) is not None


def shard_set(paths: list[Path]) -> bool:
    """Whether `paths` are exactly the shards 0..n-1 of one `name-0000i-of-0000n` set."""
    found = [_SHARD.fullmatch(p.name) for p in paths]
    if not all(found):
        return False
    keys = {(m["stem"], m["n"]) for m in found if m}
    indices = sorted(int(m["i"]) for m in found if m)
    return len(keys) == 1 and indices == list(range(int(next(iter(keys))[1])))


def split_files(directory: Path) -> dict[str, list[Path]]:
    """The train and validation files of a directory; anything ambiguous is an error."""
    files = sorted(
        p for p in directory.iterdir() if p.suffix.lower() in SUFFIXES and is_regular_file(p)
    )
    found: dict[str, list[Path]] = {"train": [], "validation": []}
    both = [p.name for p in files if "train" in p.name.lower() and "valid" in p.name.lower()]
    if both:
        raise Gemma3Error(
            f"{directory}: {', '.join(both)} names both train and valid; rename it so each file "
            "is clearly one split"
        )
    for p in files:
        name = p.name.lower()
        if "valid" in name:
            found["validation"].append(p)
        elif "train" in name:
            found["train"].append(p)
    missing = [s for s, fs in found.items() if not fs]
    if missing:
        raise Gemma3Error(
            f"{directory}: no {' or '.join(missing)} file; expected names containing 'train' and "
            f"'valid' ending in {', '.join(SUFFIXES)}"
        )
    for split, paths in found.items():
        if len(paths) > 1 and not shard_set(paths):
            raise Gemma3Error(
                f"{directory}: {len(paths)} {split} files ({', '.join(p.name for p in paths)}); "
                "keep one, or a complete set of shards named like train-00000-of-00002.parquet"
            )
    return found


def warn_if_outside_repository(path: Path) -> None:
    """A warning for a path inside the repository (data/source/x.txt) that is a symlink leading
    out of it: it is followed (a DVC cache or a big disk elsewhere is a normal reason), but never
    silently, since a cloned repository could point it at any file of yours."""
    root = Path.cwd().resolve()
    if not Path(os.path.abspath(path)).is_relative_to(root):
        return  # data.source set outside on purpose (the download stage notes that already)
    real = path.resolve()
    if not real.is_relative_to(root):
        print(
            f"warning: {path} is a symlink to {real}, outside the repository; reading it as "
            "stories (replace the link with a copy if that is not what you meant)",
            file=sys.stderr,
            flush=True,
        )


def prepare_local(
    source: str | os.PathLike[str],
    raw_dir: str | os.PathLike[str],
    *,
    val_fraction: float,
    seed: int,
) -> dict[str, Any]:
    """Write `raw_dir` from a local file (split by `val_fraction`) or a train/valid directory."""
    source = Path(source)
    # The path as the user wrote it (relative to the repository), never the absolute one: the
    # output is cached by DVC, and two clones of the same data must hash the same.
    info: dict[str, Any] = {"source": "local", "path": source.as_posix()}
    warn_if_outside_repository(source)
    with datasets_cache(raw_dir) as cache:
        if source.is_dir():
            for split, paths in split_files(source).items():
                for p in paths:
                    warn_if_outside_repository(p)
                ds = load_dataset_files(paths, cache)
                info[split] = write_dataset_split(raw_dir, split, ds, str(source))
                info[split]["files"] = [p.name for p in paths]
        else:
            ds = load_dataset_files([source], cache)
            skipped = _new_counts()
            n = sum(1 for _ in iter_stories(ds, skipped))
            if n < 2:
                raise Gemma3Error(
                    f"{source}: {n} stories; need at least 2 to make train and validation"
                )
            n_val = min(n - 1, max(1, round(n * val_fraction)))
            val_idx = set(random.Random(seed).sample(range(n), n_val))
            for split, keep in (("validation", True), ("train", False)):
                stories = (
                    s
                    for i, s in enumerate(iter_stories(ds, _new_counts()))
                    if (i in val_idx) == keep
                )
                info[split] = write_split(raw_dir, split, stories)
            info["skipped"] = skipped
            info["val_fraction"] = val_fraction
    write_source_info(raw_dir, info)
    return info
