"""DVC stage: data/raw -> data/tokens (uint16 memmaps train.bin, validation.bin + meta.json)."""

from gemma3.data.tokens import tokenize_raw
from gemma3.errors import run_main
from gemma3.fileio import atomic_dir
from gemma3.params import load_params


def main() -> None:
    p = load_params()
    t = p.tokenize
    # Both splits and meta.json replace the old ones together, or not at all.
    with atomic_dir("data/tokens") as tmp:
        meta = tokenize_raw(
            "data/raw",
            tmp,
            eot=t.eot,
            num_threads=t.num_threads,
            batch_stories=t.batch_stories,
        )
    print(
        f"tokenize: train {meta['train']['tokens']:,} tokens, "
        f"validation {meta['validation']['tokens']:,} tokens -> data/tokens"
    )


if __name__ == "__main__":
    run_main(main, prog="tokenize")
