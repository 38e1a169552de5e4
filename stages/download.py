"""DVC stage: data.source -> data/raw (train.jsonl, validation.jsonl, source.json)."""

from typing import Any

from gemma3.data.prepare import SOURCE_DIR, prepare_raw, tracked_by_dvc
from gemma3.errors import run_main
from gemma3.fileio import atomic_dir
from gemma3.params import load_params

RAW_DIR = "data/raw"


def skipped(counts: dict[str, Any]) -> str:
    """', 3 null rows skipped' for rows a source held but that carry no story."""
    labels = (("null_rows", "null rows"), ("empty_rows", "empty stories"))
    parts = [f"{counts[k]:,} {label}" for k, label in labels if counts.get(k)]
    return f", {' and '.join(parts)} skipped" if parts else ""


def main() -> None:
    p = load_params()
    # Both splits and source.json replace the old ones together, or not at all.
    with atomic_dir(RAW_DIR) as tmp:
        info = prepare_raw(p.data, p.seed, tmp)
    counts = "; ".join(
        f"{s}: {info[s]['stories']:,} stories{skipped(info[s])}"
        for s in ("train", "validation")
        if s in info
    )
    label = p.data.source
    if info["source"] == "hub":
        label = f"{info['repo_id']}@{info['commit'][:12]}"
    print(f"download: {label} -> {RAW_DIR} ({counts}){skipped(info.get('skipped', {}))}")
    if info["source"] == "local" and not tracked_by_dvc(p.data.source):
        print(
            f"download: note: {p.data.source} is outside {SOURCE_DIR}/, so DVC does not see when "
            f"it changes; move it into {SOURCE_DIR}/ (or run dvc repro -f download after editing)"
        )


if __name__ == "__main__":
    run_main(main, prog="download")
