"""DVC stage: data/raw -> data/tokens (uint16 memmaps train.bin, validation.bin + meta.json)."""

from gemma3.data.tokens import tokenize_raw
from gemma3.errors import run_main
from gemma3.fileio import atomic_dir
from gemma3.params import check_token_counts, load_params

TOKENS = "data/tokens"


def main() -> None:
    p = load_params()
    t = p.tokenize
    # Both splits and meta.json replace the old ones together, or not at all.
    with atomic_dir(TOKENS) as tmp:
        meta = tokenize_raw(
            "data/raw", tmp, eot=t.eot, num_proc=t.num_proc, batch_stories=t.batch_stories
        )
        # Fail here, not in the train stage after these tokens replaced the old ones.
        check_token_counts(p, {s: meta[s]["tokens"] for s in ("train", "validation")}, TOKENS)
    print(
        f"tokenize: train {meta['train']['tokens']:,} tokens, "
        f"validation {meta['validation']['tokens']:,} tokens -> {TOKENS}"
        f"{'' if t.eot else ' (no end-of-text tokens: tokenize.eot is false)'}"
    )


if __name__ == "__main__":
    run_main(main, prog="tokenize")
