"""TinyStories (or a repo laid out like it) from the Hugging Face Hub, through `huggingface_hub`.

Files land in the standard HF cache (`HF_HOME` / `HF_HUB_CACHE`, shared with every other HF tool),
with its progress bars and its resume of interrupted transfers; `HF_ENDPOINT`, `HF_TOKEN` and
`HF_HUB_OFFLINE` work as everywhere else. On top of the client this module adds what a training
pipeline needs and the client does not promise:

- A pinned revision and sha256 pins for all five TinyStories parquet files: `data.hub.revision`
  defaults to the commit whose files match the pins, so next month's `dvc repro` trains on the
  same bytes. Every file is hashed after download and checked against its pin, or else the
  sha256 the Hub lists for it; a file that neither can vouch for is refused unless
  `data.hub.verify: false`.
- A server is not trusted with paths or sizes: listed names must be plain `data/<name>.parquet`
  (no `..`, no absolute or %-encoded paths), the ETag / commit headers that the client turns into
  cache paths must be hashes, and a transfer stops at the size the listing declared (an endless
  body is cut off, and the client deletes its partial file).
- Offline (`HF_HUB_OFFLINE=1` or no network) the files of the revision are taken from the cache
  and hashed again; without them the error names the offline alternatives.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gemma3.errors import Gemma3Error
from gemma3.params import HUB_SOURCE, PINNED_REVISION

PINS = {
    "data/train-00000-of-00004-2d5a1467fff1081b.parquet": (
        "77cf780cebe52b6e83e3a2ac84bc56d8059363113e41d17a023f1d8b2ed0fc0b"
    ),
    "data/train-00001-of-00004-5852b56a2bd28fd9.parquet": (
        "e2f173a6dcc2b5895183e8ad376e115bd5c06764eb0cfc01ce1add156b2d017f"
    ),
    "data/train-00002-of-00004-a26307300439e943.parquet": (
        "cac73cd1a0973a7fccde022a5a5c78f8ba58ea6849541835c58e7c5fc747f2ef"
    ),
    "data/train-00003-of-00004-d243063613e5a057.parquet": (
        "862514ae75723ddd339337f1ef7617b88f82290dcddd57445e1d38d257ca7891"
    ),
    "data/validation-00000-of-00001-869c898b519ad725.parquet": (
        "33406a6206554cfc279c29c11f4df51528af487aa1a602b075566fc83c49dcab"
    ),
}
ALLOW_PATTERNS = ["data/*.parquet"]
# What a listed file may be called: one plain name under data/, nothing a path could escape with.
_SAFE_PATH = re.compile(r"data/[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.parquet")
_HEX40 = re.compile(r"[0-9a-f]{40}")
_ETAG = re.compile(r'(?:W/)?"?([0-9a-f]{40}|[0-9a-f]{64})"?')
_SHA256 = re.compile(r"[0-9a-f]{64}")


def pinned_sha256(repo_id: str, path: str) -> str:
    """The pinned sha256 of a TinyStories parquet file, or "" for any other file."""
    return PINS.get(path, "") if repo_id == HUB_SOURCE else ""


def _offline_error(where: str, reason: object) -> Gemma3Error:
    return Gemma3Error(
        f"cannot download {where} ({reason}); without network use data.source: synthetic, or "
        "download TinyStories elsewhere and set data.source to its local path "
        "(a .txt/.jsonl/.parquet file or a directory with train and validation files under "
        "data/source/)"
    )


class _Refused(Exception):
    """Raised inside the HTTP client when a server's answer would be unsafe to act on."""


def _check_response(response: Any) -> None:
    """Response hook: the headers hf_hub_download turns into cache paths must be plain hashes."""
    if "/resolve/" not in response.request.url.path:
        return
    h = response.headers
    etag = h.get("X-Linked-Etag") or h.get("ETag")
    if etag is not None and not _ETAG.fullmatch(etag):
        raise _Refused(f"{response.request.url}: the server sent ETag {etag[:80]!r}, not a hash")
    commit = h.get("X-Repo-Commit")
    if commit is not None and not _HEX40.fullmatch(commit):
        raise _Refused(
            f"{response.request.url}: the server sent X-Repo-Commit {commit[:80]!r}, not a commit"
        )


@contextlib.contextmanager
def _guarded_client() -> Iterator[None]:
    """Install `_check_response` on the client huggingface_hub uses, for the duration."""
    from huggingface_hub.utils import _http

    previous = _http._GLOBAL_CLIENT_FACTORY

    def factory() -> Any:
        client = previous()
        hooks = client.event_hooks
        hooks["response"] = [*hooks.get("response", []), _check_response]
        client.event_hooks = hooks
        return client

    _http.set_client_factory(factory)
    try:
        yield
    finally:
        _http.set_client_factory(previous)


def _capped_progress(limit: int, name: str) -> type:
    """A progress bar class that stops the transfer once it passes `limit` bytes."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Capped(hf_tqdm):  # type: ignore[misc, valid-type]
        received = 0

        def update(self, n: float | None = 1) -> bool | None:
            self.received += int(n or 0)
            if self.received > limit:
                raise _Refused(f"{name}: the server sent more than the {limit:,} bytes it listed")
            return super().update(n)

    return Capped


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _forget(path: Path) -> None:
    """Delete a cached file that failed verification: its snapshot link and the blob behind it."""
    with contextlib.suppress(OSError):
        blob = path.resolve()
        path.unlink()
        if blob != path:
            blob.unlink()


def _split_of(path: str) -> str | None:
    name = path.rsplit("/", 1)[-1].lower()
    if name.startswith("train"):
        return "train"
    if name.startswith("valid"):
        return "validation"
    return None


def _expected_sha256(repo_id: str, path: str, listed: str | None, verify: bool) -> str:
    pin = pinned_sha256(repo_id, path)
    if pin and listed and listed != pin:
        raise Gemma3Error(
            f"{repo_id}/{path}: the server lists sha256 {listed}, but the pinned TinyStories "
            f"file has {pin}; refusing it (a changed file or a wrong mirror)"
        )
    expected = pin or listed or ""
    if expected and not _SHA256.fullmatch(expected):
        raise Gemma3Error(f"{repo_id}/{path}: the server lists {expected[:80]!r}, not a sha256")
    if not expected and verify:
        raise Gemma3Error(
            f"{repo_id}/{path}: no pinned or listed sha256 to verify it against; set "
            "data.hub.verify: false to accept unverified files from this repo"
        )
    return expected


def _verify(path: Path, repo_path: str, expected: str, size: int | None) -> str:
    got_size = path.stat().st_size
    if size is not None and got_size != size:
        _forget(path)
        raise Gemma3Error(
            f"{repo_path}: {got_size:,} bytes where the listing says {size:,}; the file was "
            "deleted from the cache (retry, or check data.hub.revision)"
        )
    got = _sha256(path)
    if expected and got != expected:
        _forget(path)
        raise Gemma3Error(
            f"{repo_path}: sha256 {got} does not match the expected {expected}; the file was "
            "deleted from the cache (a corrupted or changed download; retry, or check "
            "data.hub.revision)"
        )
    return got


def _list_online(
    api: Any, repo_id: str, revision: str
) -> tuple[str, list[tuple[str, int | None, str | None]]]:
    """(commit, [(path, size, listed sha256)]) of the parquet files under data/."""
    from huggingface_hub.utils import filter_repo_objects

    info = api.dataset_info(repo_id, revision=revision)
    commit = info.sha or ""
    if not _HEX40.fullmatch(commit):
        raise Gemma3Error(f"{repo_id}@{revision}: the server sent commit {commit[:80]!r}")
    entries = [
        e
        for e in api.list_repo_tree(
            repo_id, path_in_repo="data", repo_type="dataset", revision=commit
        )
        if getattr(e, "size", None) is not None  # files, not folders
    ]
    for e in entries:
        if e.path.endswith(".parquet") and not _SAFE_PATH.fullmatch(e.path):
            raise Gemma3Error(
                f"{repo_id}@{commit}: the listing names {e.path[:120]!r}; refusing a path that "
                "is not a plain data/<name>.parquet"
            )
    files = []
    for e in filter_repo_objects(entries, allow_patterns=ALLOW_PATTERNS, key=lambda e: e.path):
        lfs = e.lfs
        size = lfs.size if lfs is not None else e.size
        files.append((e.path, size, lfs.sha256 if lfs is not None else None))
    return commit, files


def _list_cached(
    repo_id: str, revision: str, cache_dir: str | None
) -> tuple[str, list[tuple[str, int | None, str | None]], dict[str, Path]]:
    """The revision's parquet files from the HF cache alone; the blob name is its listed sha256."""
    from huggingface_hub import snapshot_download

    folder = Path(
        snapshot_download(
            repo_id,
            repo_type="dataset",
            revision=revision,
            allow_patterns=ALLOW_PATTERNS,
            cache_dir=cache_dir,
            local_files_only=True,
        )
    )
    files, local = [], {}
    for p in sorted((folder / "data").glob("*.parquet")):
        rel = f"data/{p.name}"
        blob = p.resolve().name
        files.append((rel, None, blob if _SHA256.fullmatch(blob) else None))
        local[rel] = p
    return folder.name, files, local


def prepare_hub(
    raw_dir: str | os.PathLike[str],
    *,
    repo_id: str,
    revision: str = PINNED_REVISION,
    verify: bool = True,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Download (or find in the HF cache) a TinyStories-style repo and write `raw_dir` from it."""
    from huggingface_hub import constants

    from gemma3.data.raw import write_source_info
    from gemma3.data.sources import write_parquet_splits

    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    cache = str(cache_dir) if cache_dir is not None else None
    where = f"{endpoint}/datasets/{repo_id}@{revision}"
    offline = constants.is_offline_mode()
    try:
        with _guarded_client():
            commit, files, local, offline = _list_files(endpoint, repo_id, revision, cache, where)
            by_split = _group_by_split(files, where, offline)
            info: dict[str, Any] = {
                "source": "hub",
                "repo_id": repo_id,
                "revision": revision,
                "commit": commit,
            }
            paths: dict[str, list[Path]] = {}
            for split, entries in by_split.items():
                info[split] = {"files": {}}
                paths[split] = [
                    _fetch(entry, repo_id, commit, verify, endpoint, cache, local, info[split])
                    for entry in entries
                ]
            if not offline and revision != commit:
                _remember_ref(repo_id, revision, commit, cache)
    except Exception as e:
        raise _hub_error(e, where, offline, cache) from None
    counts = write_parquet_splits(raw_dir, paths, where=f"{repo_id}@{commit}")
    for split in by_split:
        info[split] = {**counts[split], "files": info[split]["files"]}
    write_source_info(raw_dir, info)
    return info


def _list_files(
    endpoint: str, repo_id: str, revision: str, cache: str | None, where: str
) -> tuple[str, list[tuple[str, int | None, str | None]], dict[str, Path], bool]:
    """(commit, [(path, size, sha256)], cached paths, offline?): online, else from the HF cache."""
    import httpx2
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    if constants.is_offline_mode():
        return (*_list_cached(repo_id, revision, cache), True)
    try:
        commit, files = _list_online(HfApi(endpoint=endpoint), repo_id, revision)
        return commit, files, {}, False
    except (OSError, OfflineModeIsEnabled, httpx2.TransportError) as e:
        if isinstance(e, HfHubHTTPError):
            raise
        try:  # no network: the cache may hold the revision already
            return (*_list_cached(repo_id, revision, cache), True)
        except LocalEntryNotFoundError:
            raise _offline_error(where, e) from None


def _group_by_split(
    files: list[tuple[str, int | None, str | None]], where: str, offline: bool
) -> dict[str, list[tuple[str, int | None, str | None]]]:
    """The listed parquet files per split; a missing split or an incomplete shard set is an error."""
    from gemma3.data.sources import is_shard_name, shard_set

    by_split: dict[str, list[tuple[str, int | None, str | None]]] = {"train": [], "validation": []}
    for f in sorted(files):
        split = _split_of(f[0])
        if split:
            by_split[split].append(f)
    missing = [s for s, fs in by_split.items() if not fs]
    if missing:
        raise Gemma3Error(f"{where}: no {' or '.join(missing)} parquet files under data/")
    for split, fs in by_split.items():
        names = [Path(f[0]) for f in fs]
        if any(is_shard_name(n.name) for n in names) and not shard_set(names):
            state = "the HF cache holds" if offline else "the listing has"
            fix = "connect once to finish the download" if offline else "check the revision"
            raise Gemma3Error(
                f"{where}: {state} an incomplete set of {split} shards "
                f"({', '.join(n.name for n in names)}); {fix}"
            )
    return by_split


def _fetch(
    entry: tuple[str, int | None, str | None],
    repo_id: str,
    commit: str,
    verify: bool,
    endpoint: str,
    cache: str | None,
    local: dict[str, Path],
    split_info: dict[str, Any],
) -> Path:
    """One file from the HF cache or the server, verified; its hash and size go to `split_info`."""
    from huggingface_hub import hf_hub_download

    rel, size, listed = entry
    expected = _expected_sha256(repo_id, rel, listed, verify)
    if rel in local:
        path = local[rel]
    else:
        progress = _capped_progress(size, rel) if size is not None else None
        path = Path(
            hf_hub_download(
                repo_id,
                rel,
                repo_type="dataset",
                revision=commit,
                endpoint=endpoint,
                cache_dir=cache,
                tqdm_class=progress,
            )
        )
    split_info["files"][rel] = _verify(path, f"{repo_id}/{rel}", expected, size)
    return path


def _hub_error(e: Exception, where: str, offline: bool, cache: str | None) -> Exception:
    """The one-line error for whatever the client raised (a Gemma3Error passes through)."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, Gemma3Error):
        return e
    if isinstance(e, LocalEntryNotFoundError):
        reason = (
            "offline (HF_HUB_OFFLINE) and not in the HF cache"
            if offline
            else _first_line(e.__cause__ or e)
        )
        return _offline_error(where, reason)
    if isinstance(e, _Refused):
        return Gemma3Error(f"refusing the server's answer: {e}")
    if isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError)):
        return Gemma3Error(f"{where}: HTTP {_status(e)} not found (wrong repo_id or revision?)")
    if isinstance(e, EntryNotFoundError):
        return Gemma3Error(f"{where}: a listed file is missing on the server ({_first_line(e)})")
    if isinstance(e, HfHubHTTPError):
        return Gemma3Error(f"{where}: HTTP {_status(e)} ({_first_line(e)})")
    if isinstance(e, OSError) and e.errno is not None:
        # Disk full, permissions: name the place it could not write.
        target = e.filename or cache or constants.HF_HUB_CACHE
        return Gemma3Error(
            f"{target}: cannot write ({e.strerror}); free disk space in the HF cache "
            "(HF_HOME / HF_HUB_CACHE) or point it elsewhere, then re-run"
        )
    if isinstance(e, (OSError, ValueError, httpx2.HTTPError)):
        return Gemma3Error(f"{where}: download failed ({_first_line(e)})")
    return e


def _remember_ref(repo_id: str, revision: str, commit: str, cache_dir: str | None) -> None:
    """Record branch -> commit in the HF cache (as hf_hub_download does for a branch name), so
    an offline run with the same `data.hub.revision` finds the files."""
    with contextlib.suppress(ImportError, OSError, ValueError):
        from huggingface_hub import constants
        from huggingface_hub.file_download import (
            _cache_commit_hash_for_specific_revision,
            repo_folder_name,
        )

        folder = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(
            repo_id=repo_id, repo_type="dataset"
        )
        _cache_commit_hash_for_specific_revision(str(folder), revision, commit)


def _status(e: Exception) -> str:
    response = getattr(e, "response", None)
    return str(getattr(response, "status_code", "?"))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
