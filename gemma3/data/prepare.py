"""Dispatch `data.source` to the right producer of the raw format (see gemma3.data.raw)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gemma3.errors import Gemma3Error
from gemma3.params import HUB_SOURCE, DataParams

# Local sources live here: the download stage lists this folder as a DVC dependency, so editing a
# file in it makes `dvc status` report the stage changed and `dvc repro` re-run it.
SOURCE_DIR = Path("data/source")


def tracked_by_dvc(source: str | os.PathLike[str]) -> bool:
    """Whether a local source lies under data/source/ (relative to the working directory)."""
    try:
        Path(source).resolve().relative_to(SOURCE_DIR.resolve())
    except ValueError:
        return False
    return True


def prepare_raw(data: DataParams, seed: int, raw_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Write `raw_dir` from synthetic stories, the Hugging Face Hub, or a local file/directory."""
    source = data.source
    if source == "synthetic":
        from gemma3.data.synthetic import write_synthetic

        return write_synthetic(raw_dir, data.synthetic.n_train, data.synthetic.n_val, seed)
    if source in (HUB_SOURCE, data.hub.repo_id):
        from gemma3.data.hub import prepare_hub

        return prepare_hub(
            raw_dir, repo_id=data.hub.repo_id, revision=data.hub.revision, verify=data.hub.verify
        )
    if Path(source).exists():
        from gemma3.data.sources import prepare_local

        return prepare_local(source, raw_dir, val_fraction=data.val_fraction, seed=seed)
    raise Gemma3Error(
        f"params.yaml: data.source: {source!r} is not 'synthetic', {HUB_SOURCE!r}, "
        "or an existing local file/directory"
    )
