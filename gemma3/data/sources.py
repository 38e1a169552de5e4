"""Real story sources: local files (.txt / .jsonl / .parquet) and TinyStories from the Hub.

Both end in the raw format of `gemma3.data.raw`. Choices a user should know about:

- `.txt`: stories are separated by lines that hold only `<|endoftext|>` (the format of the
  TinyStories text files). Bytes that are not UTF-8 are an error naming the line, not silently
  replaced: a wrongly encoded file would otherwise train on mojibake.
- `.jsonl`: one JSON object per line with a string field `text`; `.parquet`: a `text` column.
- A directory holds train and validation files (names containing `train` and `valid`); a single
  file is split by a seeded random draw of `val_fraction` of its stories.
- The Hub path speaks the Hub's plain HTTP API (file listing + resolve URLs), verifies every file's
  SHA-256 against the listing and, for the TinyStories files, against pins in this module, and
  caches downloads under `$GEMMA3_CACHE` (default `~/.cache/gemma3-tinystories`). `HF_ENDPOINT`
  points it elsewhere (a mirror, or a local stand-in in the tests); `HF_TOKEN` is sent if set.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gemma3.data.raw import write_source_info, write_split
from gemma3.errors import Gemma3Error

EOT_TEXT = "<|endoftext|>"
SUFFIXES = (".txt", ".jsonl", ".parquet")
DEFAULT_ENDPOINT = "https://huggingface.co"

# sha256 of roneneldan/TinyStories files we have checked, by path prefix (REFERENCE.md section 3).
KNOWN_SHA256 = {
    "data/validation-00000-of-00001-869c898b519ad725": (
        "33406a6206554cfc279c29c11f4df51528af487aa1a602b075566fc83c49dcab"
    ),
    "data/train-00000-of-00004-": (
        "77cf780cebe52b6e83e3a2ac84bc56d8059363113e41d17a023f1d8b2ed0fc0b"
    ),
}


def pinned_sha256(repo_id: str, path: str) -> str:
    """The pinned hash of a known TinyStories file, or "" for any other file."""
    if repo_id != "roneneldan/TinyStories":
        return ""
    return next((h for prefix, h in KNOWN_SHA256.items() if path.startswith(prefix)), "")


# ---------------------------------------------------------------------------------------------
# Local files


def _read_txt(path: Path) -> Iterator[str]:
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
            if line.strip() == EOT_TEXT:
                text = "".join(story).strip()
                if text:
                    yield text
                story = []
            else:
                story.append(line)
    text = "".join(story).strip()
    if text:
        yield text


def _read_jsonl(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise Gemma3Error(f"{path}:{lineno}: not a JSON line ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise Gemma3Error(f'{path}:{lineno}: expected an object with a string "text" field')
            text = obj["text"].strip()
            if text:
                yield text


def _read_parquet(path: Path) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise Gemma3Error(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise Gemma3Error(f"{path}: no 'text' column (columns: {', '.join(names) or 'none'})")
    for batch in pf.iter_batches(columns=["text"], batch_size=8192):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text.strip()


def read_stories(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield the non-empty stories of one local file, by its suffix."""
    path = Path(path)
    if not path.is_file():
        raise Gemma3Error(f"{path}: file not found")
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise Gemma3Error(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    return reader(path)


def _split_files(directory: Path) -> dict[str, list[Path]]:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    found: dict[str, list[Path]] = {"train": [], "validation": []}
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
    return found


def _nonempty(counts: dict[str, int], where: Path | str, split: str) -> dict[str, int]:
    if counts["stories"] == 0:
        raise Gemma3Error(f"{where}: no stories for the {split} split")
    return counts


def prepare_local(
    source: str | os.PathLike[str],
    raw_dir: str | os.PathLike[str],
    *,
    val_fraction: float,
    seed: int,
) -> dict[str, Any]:
    """Write `raw_dir` from a local file (split by `val_fraction`) or a train/valid directory."""
    source = Path(source)
    info: dict[str, Any] = {"source": "local", "path": str(source.resolve())}
    if source.is_dir():
        files = _split_files(source)
        for split, paths in files.items():
            stories = (s for p in paths for s in read_stories(p))
            info[split] = _nonempty(write_split(raw_dir, split, stories), source, split)
            info[split]["files"] = [p.name for p in paths]
    else:
        stories = list(read_stories(source))
        if len(stories) < 2:
            raise Gemma3Error(
                f"{source}: {len(stories)} stories; need at least 2 to make train and validation"
            )
        n_val = min(len(stories) - 1, max(1, round(len(stories) * val_fraction)))
        val_idx = set(random.Random(seed).sample(range(len(stories)), n_val))
        info["validation"] = write_split(
            raw_dir, "validation", (s for i, s in enumerate(stories) if i in val_idx)
        )
        info["train"] = write_split(
            raw_dir, "train", (s for i, s in enumerate(stories) if i not in val_idx)
        )
        info["val_fraction"] = val_fraction
    write_source_info(raw_dir, info)
    return info


# ---------------------------------------------------------------------------------------------
# The Hugging Face Hub over plain HTTP


def cache_dir() -> Path:
    return Path(os.environ.get("GEMMA3_CACHE") or Path.home() / ".cache" / "gemma3-tinystories")


def _offline_error(url: str, reason: object) -> Gemma3Error:
    return Gemma3Error(
        f"cannot download {url} ({reason}); without network use data.source: synthetic, or "
        "download TinyStories elsewhere and set data.source to its local path "
        "(a .txt/.jsonl/.parquet file or a directory with train and validation files)"
    )


def _request(url: str) -> urllib.request.Request:
    headers = {"User-Agent": "gemma3-tinystories"}
    token = os.environ.get("HF_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return urllib.request.Request(url, headers=headers)


def _open(url: str, timeout: float = 30.0) -> Any:
    try:
        return urllib.request.urlopen(_request(url), timeout=timeout)
    except urllib.error.HTTPError as e:
        hint = " (wrong repo_id or revision?)" if e.code in (401, 403, 404) else ""
        raise Gemma3Error(f"{url}: HTTP {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise _offline_error(url, getattr(e, "reason", e)) from None


def list_hub_files(endpoint: str, repo_id: str, revision: str) -> list[dict[str, Any]]:
    """The parquet files under `data/` of a dataset repo: [{path, size, sha256}]."""
    rev = urllib.parse.quote(revision, safe="")
    url = f"{endpoint}/api/datasets/{repo_id}/tree/{rev}/data"
    with _open(url) as r:
        try:
            entries = json.loads(r.read())
        except json.JSONDecodeError as e:
            raise Gemma3Error(f"{url}: not a JSON file listing ({e})") from None
    files = []
    for e in entries:
        path = e.get("path", "")
        if e.get("type") == "file" and path.endswith(".parquet"):
            files.append(
                {"path": path, "size": e.get("size"), "sha256": (e.get("lfs") or {}).get("oid")}
            )
    return files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_file(url: str, dest: Path, *, expected: list[str], progress: bool = True) -> Path:
    """Download to `dest` (via a .part file) unless a verified copy is already there."""
    from tqdm import tqdm

    expected = [e for e in expected if e]
    if dest.is_file() and (not expected or {_sha256(dest)} == set(expected)):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with _open(url) as r, open(part, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=dest.name[:40], disable=not progress
        ) as bar:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
                bar.update(len(chunk))
    got = _sha256(part)
    bad = [e for e in expected if e != got]
    if bad:
        part.unlink()
        raise Gemma3Error(
            f"{url}: sha256 {got} does not match the expected {bad[0]}; the file was deleted "
            "(a corrupted or changed download; retry, or check data.hub.revision)"
        )
    os.replace(part, dest)
    return dest


def prepare_hub(
    raw_dir: str | os.PathLike[str],
    *,
    repo_id: str,
    revision: str = "main",
    endpoint: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Download a TinyStories-style dataset repo (parquet under data/) into `raw_dir`."""
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    files = list_hub_files(endpoint, repo_id, revision)
    by_split: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    for f in files:
        name = Path(f["path"]).name
        if name.startswith("train"):
            by_split["train"].append(f)
        elif name.startswith("valid"):
            by_split["validation"].append(f)
    missing = [s for s, fs in by_split.items() if not fs]
    if missing:
        raise Gemma3Error(
            f"{endpoint}/datasets/{repo_id}@{revision}: no {' or '.join(missing)} parquet files "
            "under data/"
        )
    cache = cache_dir() / "hub" / repo_id.replace("/", "--") / revision
    rev = urllib.parse.quote(revision, safe="")
    info: dict[str, Any] = {"source": "hub", "repo_id": repo_id, "revision": revision}
    for split, entries in by_split.items():
        local = []
        for f in sorted(entries, key=lambda f: f["path"]):
            url = f"{endpoint}/datasets/{repo_id}/resolve/{rev}/{f['path']}"
            expected = [f["sha256"], pinned_sha256(repo_id, f["path"])]
            local.append(
                download_file(url, cache / f["path"], expected=expected, progress=progress)
            )
        stories = (s for p in local for s in read_stories(p))
        info[split] = _nonempty(write_split(raw_dir, split, stories), repo_id, split)
        info[split]["files"] = {
            f["path"]: f["sha256"] for f in sorted(entries, key=lambda f: f["path"])
        }
    write_source_info(raw_dir, info)
    return info
