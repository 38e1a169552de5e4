"""DVC stage: data.source -> data/raw (train.jsonl, validation.jsonl, source.json)."""

from gemma3.data.prepare import prepare_raw
from gemma3.errors import run_main
from gemma3.fileio import atomic_dir
from gemma3.params import load_params

RAW_DIR = "data/raw"


def main() -> None:
    p = load_params()
    # Both splits and source.json replace the old ones together, or not at all.
    with atomic_dir(RAW_DIR) as tmp:
        info = prepare_raw(p.data, p.seed, tmp)
    counts = ", ".join(
        f"{s}: {info[s]['stories']:,} stories" for s in ("train", "validation") if s in info
    )
    print(f"download: {p.data.source} -> {RAW_DIR} ({counts})")


if __name__ == "__main__":
    run_main(main, prog="download")
