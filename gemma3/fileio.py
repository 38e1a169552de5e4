"""Atomic file writes: write to a temporary file in the same directory, fsync, rename.

A crash or a full disk can then never leave a half-written file under the final name: readers
see either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gemma3.errors import Gemma3Error


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


# ---------------------------------------------------------------------------------------------
# Reading user-facing files: regular files only, JSON objects only
# ---------------------------------------------------------------------------------------------


def is_regular_file(path: str | os.PathLike[str]) -> bool:
    """True for a regular file (symlinks followed), False when nothing is there.

    Anything else under that name (a FIFO, a device such as /dev/zero, a directory, a socket) is
    a one-line error rather than "missing": it exists, and reading a FIFO would block forever.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as e:  # a symlink loop, a name too long: the name is unusable, say so
        raise Gemma3Error(f"{path}: cannot be read ({e.strerror or e})") from None
    if stat.S_ISREG(mode):
        return True
    kind = (
        "a directory"
        if stat.S_ISDIR(mode)
        else "a named pipe"
        if stat.S_ISFIFO(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a file"
    )
    raise Gemma3Error(f"{path}: not a regular file ({kind}); give the path of a regular file")


def load_json_object(path: str | os.PathLike[str], fix: str = "") -> dict[str, Any]:
    """A JSON file that must hold an object, read in one place so every reader refuses the same
    things in one line: bad UTF-8, bad JSON, nesting too deep for Python's parser, and valid
    JSON that is not an object (`[]`, `3`, `"x"`, `null`). `fix` is appended to each message."""
    path = Path(path)
    fix = f"; {fix}" if fix else ""
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise Gemma3Error(f"{path}: not valid UTF-8 (byte {e.start}){fix}") from None
    except json.JSONDecodeError as e:
        raise Gemma3Error(f"{path}: not valid JSON ({e}){fix}") from None
    except RecursionError:
        raise Gemma3Error(f"{path}: not valid JSON (nested too deeply to read){fix}") from None
    if not isinstance(d, dict):
        raise Gemma3Error(f"{path}: must be a JSON object {{...}}, got {_json_kind(d)}{fix}")
    return d


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "true/false", int: "a number", float: "a number", str: "a string"}
    return names.get(type(value), "a list")
