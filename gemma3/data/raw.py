"""The raw-text format every data source produces and the tokenize stage reads.

A raw directory holds `train.jsonl` and `validation.jsonl` (one `{"text": story}` object per
line, UTF-8) and `source.json` (where the stories came from, counts, bytes). Keeping one format
means later stages never care whether stories were synthetic, downloaded or local.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from gemma3.errors import Gemma3EnvironmentError, Gemma3Error
from gemma3.fileio import atomic_path, atomic_write_json

SPLITS = ("train", "validation")


def split_path(raw_dir: str | os.PathLike[str], split: str) -> Path:
    return Path(raw_dir) / f"{split}.jsonl"


def write_split(
    raw_dir: str | os.PathLike[str], split: str, stories: Iterable[str]
) -> dict[str, int]:
    """Write one split atomically; return {"stories": n, "bytes": utf-8 bytes of the texts}."""
    n = n_bytes = 0
    path = split_path(raw_dir, split)
    try:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for text in stories:
                f.write(json.dumps({"text": text}, ensure_ascii=False))
                f.write("\n")
                n += 1
                n_bytes += len(text.encode("utf-8"))
    except OSError as e:  # disk full, quota, read-only: say which file could not be written
        raise write_error(path, e) from None
    return {"stories": n, "bytes": n_bytes}


def write_error(path: str | os.PathLike[str], e: OSError) -> Gemma3EnvironmentError:
    """The one-line message for a failed write (the previous output is left as it was); exit 1
    like any disk/OS error, since the input is fine."""
    return Gemma3EnvironmentError(
        f"{path}: cannot write ({e.strerror or e}); free disk space or fix permissions and "
        "re-run (the previous output is unchanged)"
    )


def quiet_datasets() -> None:
    """No datasets progress bars or log lines: our errors and summaries say what happened."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)


def write_source_info(raw_dir: str | os.PathLike[str], info: dict[str, Any]) -> None:
    atomic_write_json(Path(raw_dir) / "source.json", info)


def read_split(raw_dir: str | os.PathLike[str], split: str) -> Iterator[str]:
    """Yield the stories of one split; a missing or malformed file is a one-line error."""
    path = split_path(raw_dir, split)
    if not path.is_file():
        raise Gemma3Error(
            f"{path}: raw split not found; run the download stage first (dvc repro download)"
        )
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)["text"]
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                raise Gemma3Error(
                    f'{path}:{lineno}: not a {{"text": ...}} JSON line ({e})'
                ) from None
