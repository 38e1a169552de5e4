"""Atomic file writes: write to a temporary file in the same directory, fsync, rename.

A crash or a full disk can then never leave a half-written file under the final name: readers
see either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it over `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; final files get the usual permissions
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        _raise_naming(e, path)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def recover_dir(path: str | os.PathLike[str]) -> None:
    """Put back a directory that a writer killed between `atomic_dir`'s two renames left only
    under `.<name>.old`; readers call this before looking for `path`."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not path.exists():
        os.replace(old, path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `path` (old one removed after)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.with_name(f".{path.name}.old")
    recover_dir(path)
    # Leftovers of a writer that was killed mid-write (never visible under the final name).
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_UMASK)
    moved = False
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            moved = True
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if moved:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved and not path.exists():
            os.replace(old, path)  # the new version never arrived: put the previous one back
        _raise_naming(e, path)
        raise


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _raise_naming(e: BaseException, path: Path) -> None:
    """A write that fails with an errno but no file name (a full disk: `write()` names none)
    is re-raised naming the file being written, so the one-line error says where."""
    if isinstance(e, OSError) and e.errno is not None and e.filename is None:
        raise OSError(e.errno, e.strerror, str(path)) from e


@contextlib.contextmanager
def exclusive_lock(directory: str | os.PathLike[str], busy: str) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (flock on its descriptor) or fail with `busy`.

    The kernel drops the lock when the holder exits, however it exits (kill -9 included), so a
    stale lock can never block a later run.
    """
    import fcntl

    from gemma3.errors import Gemma3Error

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Gemma3Error(f"{directory}: {busy}") from None
        yield
    finally:
        os.close(fd)
