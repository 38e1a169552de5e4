"""Where a run's inputs come from: the project a stage runs in (a queued experiment's temporary
copy maps back to its repository), the git commit, who trains, and the training tokens' identity
(the DVC md5 recorded for them in dvc.lock). No MLflow here: gemma3.tracking turns these into
tags and a dataset input, and the registry compares champions by that md5.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any


def project_root() -> Path:
    """DVC_ROOT (or the working directory); for a queued or --temp experiment, which DVC runs in
    a copy under .dvc/tmp/exps/ and deletes afterwards, the repository the copy belongs to."""
    return main_repo(Path(os.environ.get("DVC_ROOT") or os.getcwd()))


def git_commit(root: Path) -> str | None:
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def user() -> str | None:
    """Who trains (MLflow's "Created by"): the login name, as MLflow's fluent API records it."""
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError, ImportError):
        return None


def _json_object(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return d if isinstance(d, dict) else {}


def enclosing_repo(path: Path) -> Path | None:
    """The nearest directory above `path` with a dvc.lock: the working copy DVC ran the stage in
    (the repository itself, or a `dvc exp run --queue/--temp` copy under .dvc/tmp/exps/)."""
    for d in path.resolve().parents:
        if (d / "dvc.lock").is_file():
            return d
    return None


def main_repo(path: Path) -> Path:
    """The repository a queued or --temp experiment's copy belongs to (the copy is deleted after
    the run; the repository stays), else the working copy itself."""
    parts = path.resolve().parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return path.resolve()


def dvc_md5(data_dir: Path) -> str | None:
    """The md5 DVC recorded for `data_dir` in the lock file of the working copy that holds it,
    if the recorded size and file count still match the directory (a stale lock gives None)."""
    import yaml

    repo = enclosing_repo(data_dir)
    if repo is None:
        return None
    try:
        rel = data_dir.resolve().relative_to(repo).as_posix()
        lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
        files = [f for f in data_dir.rglob("*") if f.is_file()]
        size, nfiles = sum(f.stat().st_size for f in files), len(files)
    except (OSError, ValueError, RecursionError, yaml.YAMLError):
        return None
    for stage in (lock or {}).get("stages", {}).values() if isinstance(lock, dict) else ():
        for out in stage.get("outs", []) if isinstance(stage, dict) else ():
            if out.get("path") == rel and (out.get("size"), out.get("nfiles")) == (size, nfiles):
                return out.get("md5")
    return None


def dataset_info(data_dir: Path, root: Path | None = None) -> dict[str, Any] | None:
    """What identifies the training data: source, DVC md5 of the tokens, token counts.

    The source URI names the tokens in the main repository (never a queued experiment's
    temporary copy, which is gone after the run) with their md5, which DVC's cache keeps."""
    meta = _json_object(data_dir / "meta.json")
    if not meta:
        return None
    source = meta.get("source") or {}
    label = source.get("source", "unknown") if isinstance(source, dict) else str(source)
    if isinstance(source, dict) and source.get("revision"):
        label = f"{label}@{source['revision']}"
    md5 = dvc_md5(data_dir)
    profile = {
        "source": label,
        "dvc_md5": md5,
        "train_tokens": (meta.get("train") or {}).get("tokens"),
        "validation_tokens": (meta.get("validation") or {}).get("tokens"),
        "tokenizer": meta.get("tokenizer"),
        "eot": meta.get("eot"),
    }
    name = f"tokens:{label}"[:500]
    copy = enclosing_repo(data_dir) or data_dir.resolve().parent
    try:
        rel = data_dir.resolve().relative_to(copy)
    except ValueError:
        rel = Path(data_dir.name)
    uri = (main_repo(copy) / rel).as_uri() + (f"?dvc_md5={md5}" if md5 else "")
    return {
        "name": name,
        "uri": uri,
        "digest": (md5 or json.dumps(profile, sort_keys=True))[:36],
        "profile": profile,
    }
