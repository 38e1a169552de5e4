"""Data pipeline: synthetic stories, local readers (through `datasets`), tokenization into uint16
memmaps (datasets.map), batch sampling and whole-array evaluation. The Hub: tests/test_hub.py.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from gemma3.config import Config
from gemma3.data.raw import read_split, write_source_info, write_split
from gemma3.data.sources import prepare_local, read_stories
from gemma3.data.synthetic import synthetic_stories, write_synthetic
from gemma3.data.tokens import (
    fixed_batches,
    load_tokens,
    sample_batch,
    sequential_windows,
    tokenize_raw,
)
from gemma3.errors import Gemma3Error
from gemma3.evaluate import bits_per_byte, evaluate_tokens
from gemma3.model import Gemma3ForCausalLM
from gemma3.tokenizer import EOT_ID, decode, encode

# ---------------------------------------------------------------------------------------------
# Synthetic stories


def test_synthetic_is_deterministic_and_seed_dependent() -> None:
    a = list(synthetic_stories(8, seed=1))
    assert a == list(synthetic_stories(8, seed=1))
    b = list(synthetic_stories(8, seed=2))
    assert all(x != y for x, y in zip(a, b, strict=True))
    # Story i depends only on (seed, i): an offset window is a slice of the full run.
    assert list(synthetic_stories(3, seed=1, offset=5)) == a[5:8]
    assert len(set(a)) == len(a)


def test_write_synthetic_splits(tmp_path: Path) -> None:
    info = write_synthetic(tmp_path / "a", n_train=30, n_val=6, seed=3)
    train = list(read_split(tmp_path / "a", "train"))
    val = list(read_split(tmp_path / "a", "validation"))
    assert len(train) == 30 and len(val) == 6
    assert train == list(synthetic_stories(30, seed=3))
    assert not set(train) & set(val)
    assert info["train"] == {"stories": 30, "bytes": sum(len(s.encode()) for s in train)}
    assert info["validation"]["stories"] == 6
    source = json.loads((tmp_path / "a" / "source.json").read_text(encoding="utf-8"))
    assert source == info and source["source"] == "synthetic" and source["seed"] == 3

    write_synthetic(tmp_path / "b", n_train=30, n_val=6, seed=3)
    write_synthetic(tmp_path / "c", n_train=30, n_val=6, seed=4)
    for split in ("train.jsonl", "validation.jsonl"):
        same = (tmp_path / "b" / split).read_bytes()
        assert (tmp_path / "a" / split).read_bytes() == same
        assert (tmp_path / "c" / split).read_bytes() != same


@pytest.mark.parametrize("n_train, n_val", [(0, 5), (5, 0), (2.5, 5), (True, 5)])
def test_write_synthetic_rejects_bad_counts(tmp_path: Path, n_train, n_val) -> None:
    with pytest.raises(Gemma3Error, match=r"params\.yaml: data\.synthetic\.n_(train|val)"):
        write_synthetic(tmp_path, n_train=n_train, n_val=n_val, seed=0)


# ---------------------------------------------------------------------------------------------
# Local readers

TXT = (
    "<|endoftext|>\n"  # leading separator: no empty story
    "Once upon a time, there was a cat.\n"
    "\n"
    "The cat liked milk.\n"
    "<|endoftext|>\n"
    "Tom said <|endoftext|> is just text here.\n"  # not a separator line
    "  <|endoftext|>  \n"  # separator with surrounding spaces
    "<|endoftext|>\n"  # two separators in a row: no empty story
    "Café 🎃 naïve.\n"
    "<|endoftext|>\r\n"  # CRLF separator
    "The last story has no separator.\n"
    "\n"
)
TXT_STORIES = [
    "Once upon a time, there was a cat.\n\nThe cat liked milk.",
    "Tom said <|endoftext|> is just text here.",
    "Café 🎃 naïve.",
    "The last story has no separator.",
]


def write_parquet(path: Path, columns: dict, row_group_size: int | None = None) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def parquet_bytes(texts: list[str]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), buf)
    return buf.getvalue()


def test_read_txt(tmp_path: Path) -> None:
    p = tmp_path / "stories.txt"
    p.write_bytes(TXT.encode("utf-8"))
    assert list(read_stories(p)) == TXT_STORIES


def test_read_txt_trailing_separator(tmp_path: Path) -> None:
    p = tmp_path / "s.txt"
    p.write_text("One.\n<|endoftext|>\nTwo\nlines.\n<|endoftext|>\n", encoding="utf-8")
    assert list(read_stories(p)) == ["One.", "Two\nlines."]


def test_read_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "s.jsonl"
    lines = [
        json.dumps({"text": "First story.", "id": 1}),
        "",
        json.dumps({"text": "  Second\nstory 日本.  "}, ensure_ascii=False),
        json.dumps({"text": "   "}),  # blank text: skipped
        json.dumps({"text": "Third 🎃"}),
    ]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert list(read_stories(p)) == ["First story.", "Second\nstory 日本.", "Third 🎃"]


def test_read_parquet(tmp_path: Path) -> None:
    texts = ["A story.", None, "  Another\n\nstory.  ", "", "Third é."]
    p = write_parquet(
        tmp_path / "s.parquet",
        {"id": list(range(5)), "text": texts},
        row_group_size=2,
    )
    assert list(read_stories(p)) == ["A story.", "Another\n\nstory.", "Third é."]


def test_non_utf8_txt_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"Fine line.\n<|endoftext|>\nCaf\xe9 au lait.\n")
    with pytest.raises(Gemma3Error) as info:
        list(read_stories(p))
    msg = str(info.value)
    assert f"{p}:3:" in msg and "UTF-8" in msg and "0xe9" in msg
    assert "\n" not in msg


def test_bad_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(Gemma3Error) as info:
        list(read_stories(p))
    msg = str(info.value)
    assert f"{p}:3:" in msg and "JSON" in msg and "\n" not in msg


@pytest.mark.parametrize("line", ['{"story": "x"}', '{"text": 5}', '["text"]'])
def test_jsonl_without_text_string_names_file_and_line(tmp_path: Path, line: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(Gemma3Error, match=r":2: expected an object with a string \"text\""):
        list(read_stories(p))


def test_parquet_without_text_column(tmp_path: Path) -> None:
    p = write_parquet(tmp_path / "s.parquet", {"story": ["a", "b"], "id": [1, 2]})
    with pytest.raises(Gemma3Error) as info:
        list(read_stories(p))
    msg = str(info.value)
    assert str(p) in msg and "'text'" in msg and "story" in msg and "\n" not in msg


def test_unreadable_parquet_and_unknown_suffix(tmp_path: Path) -> None:
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"not parquet at all")
    with pytest.raises(Gemma3Error, match="broken.parquet: not a readable parquet"):
        list(read_stories(p))
    q = tmp_path / "s.csv"
    q.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(Gemma3Error, match=r"s\.csv: unsupported file type"):
        read_stories(q)
    with pytest.raises(Gemma3Error, match="missing.txt: file not found"):
        read_stories(tmp_path / "missing.txt")


def test_prepare_local_directory(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "TinyStories-train.txt").write_text(TXT, encoding="utf-8")
    (src / "TinyStories-valid.jsonl").write_text(
        json.dumps({"text": "Valid story."}) + "\n", encoding="utf-8"
    )
    (src / "notes.md").write_text("ignored", encoding="utf-8")
    raw = tmp_path / "raw"
    info = prepare_local(src, raw, val_fraction=0.5, seed=0)
    train = list(read_split(raw, "train"))
    assert train == TXT_STORIES
    assert list(read_split(raw, "validation")) == ["Valid story."]
    assert info["train"]["stories"] == 4
    assert info["train"]["bytes"] == sum(len(s.encode()) for s in train)
    assert info["train"]["files"] == ["TinyStories-train.txt"]
    assert info["validation"]["files"] == ["TinyStories-valid.jsonl"]
    assert json.loads((raw / "source.json").read_text(encoding="utf-8")) == info
    assert info["path"] == str(src) and (raw / ".datasets-cache").exists() is False


def test_prepare_local_directory_of_shards_in_order(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        write_parquet(src / f"train-0000{i}-of-00003.parquet", {"text": [f"T{i}a", f"T{i}b"]})
    write_parquet(src / "validation-00000-of-00001.parquet", {"text": ["V", None, "W"]})
    info = prepare_local(src, tmp_path / "raw", val_fraction=0.5, seed=0)
    assert list(read_split(tmp_path / "raw", "train")) == [
        "T0a", "T0b", "T1a", "T1b", "T2a", "T2b"
    ]  # fmt: skip
    assert list(read_split(tmp_path / "raw", "validation")) == ["V", "W"]
    assert info["validation"]["null_rows"] == 1 and info["train"]["null_rows"] == 0


@pytest.mark.parametrize(
    "names, named",
    [
        (["a_train.txt", "b_train.txt", "valid.txt"], ["a_train.txt", "b_train.txt"]),
        (["train_and_valid.txt", "train.txt"], ["train_and_valid.txt"]),
        (["train-00000-of-00003.txt", "train-00002-of-00003.txt", "valid.txt"],
         ["train-00000-of-00003.txt", "train-00002-of-00003.txt"]),  # a shard is missing
        (["train.txt", "valid.jsonl", "valid2.txt"], ["valid.jsonl", "valid2.txt"]),
    ],
)  # fmt: skip
def test_ambiguous_directory_is_an_error_naming_the_files(
    tmp_path: Path, names: list[str], named: list[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for n in names:
        (src / n).write_text("A story.\n", encoding="utf-8")
    with pytest.raises(Gemma3Error) as e:
        prepare_local(src, tmp_path / "raw", val_fraction=0.1, seed=0)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in named), msg
    assert not (tmp_path / "raw" / "train.jsonl").exists()


def test_bom_is_stripped(tmp_path: Path) -> None:
    txt = tmp_path / "bom.txt"
    txt.write_bytes(b"\xef\xbb\xbf<|endoftext|>\nFirst.\n<|endoftext|>\nSecond.\n")
    # With the BOM kept, the first separator line would be part of the first story.
    assert read_stories(txt) == ["First.", "Second."]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "\\ufeffinside stays"}\n{"text": "b"}\n')
    assert read_stories(jsonl) == ["\ufeffinside stays", "b"]


def test_lone_surrogate_in_jsonl_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "s.jsonl"
    p.write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n', encoding="utf-8")
    with pytest.raises(Gemma3Error) as e:
        read_stories(p)
    msg = str(e.value)
    assert f"{p}:2:" in msg and "surrogate" in msg and "\n" not in msg


def test_null_rows_are_counted(tmp_path: Path) -> None:
    p = tmp_path / "s.jsonl"
    p.write_text(
        '{"text": "a"}\n{"text": null}\n{"text": "  "}\n{"text": "b"}\n{"text": null}\n'
        '{"text": "c"}\n',
        encoding="utf-8",
    )
    info = prepare_local(p, tmp_path / "raw", val_fraction=0.3, seed=0)
    assert info["skipped"] == {"null_rows": 2, "empty_rows": 1}
    assert info["train"]["stories"] + info["validation"]["stories"] == 3


def test_prepare_local_directory_without_valid_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.txt").write_text("A.\n", encoding="utf-8")
    with pytest.raises(Gemma3Error, match="no validation file"):
        prepare_local(src, tmp_path / "raw", val_fraction=0.1, seed=0)


def test_prepare_local_single_file_split(tmp_path: Path) -> None:
    stories = [f"Story number {i} about a {'red' if i % 2 else 'blue'} ball." for i in range(50)]
    src = tmp_path / "all.jsonl"
    src.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories), encoding="utf-8")

    def split(seed: int, name: str) -> tuple[list[str], list[str], dict]:
        info = prepare_local(src, tmp_path / name, val_fraction=0.1, seed=seed)
        return (
            list(read_split(tmp_path / name, "train")),
            list(read_split(tmp_path / name, "validation")),
            info,
        )

    train, val, info = split(7, "a")
    assert len(val) == 5 and len(train) == 45  # round(50 * 0.1)
    assert info["train"]["stories"] == 45 and info["validation"]["stories"] == 5
    assert info["val_fraction"] == 0.1
    # A partition of the input, each split keeping the input order.
    assert Counter(train) + Counter(val) == Counter(stories)
    assert not set(train) & set(val)
    assert train == [s for s in stories if s in set(train)]
    assert val == [s for s in stories if s in set(val)]

    train2, val2, _ = split(7, "b")
    assert (train2, val2) == (train, val)
    _, val3, _ = split(8, "c")
    assert val3 != val


@pytest.mark.parametrize("n, fraction, n_val", [(2, 0.1, 1), (3, 0.99, 2), (10, 0.25, 2)])
def test_prepare_local_split_sizes(tmp_path: Path, n: int, fraction: float, n_val: int) -> None:
    src = tmp_path / "s.txt"
    src.write_text("\n<|endoftext|>\n".join(f"S{i}." for i in range(n)), encoding="utf-8")
    info = prepare_local(src, tmp_path / "raw", val_fraction=fraction, seed=0)
    assert (info["train"]["stories"], info["validation"]["stories"]) == (n - n_val, n_val)


def test_prepare_local_single_story_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "one.txt"
    src.write_text("Only one story.\n", encoding="utf-8")
    with pytest.raises(Gemma3Error, match="1 stories; need at least 2"):
        prepare_local(src, tmp_path / "raw", val_fraction=0.1, seed=0)


def test_read_split_malformed_raw_line(tmp_path: Path) -> None:
    write_split(tmp_path, "train", ["ok"])
    with open(tmp_path / "train.jsonl", "a", encoding="utf-8") as f:
        f.write('{"txt": "x"}\n')
    with pytest.raises(Gemma3Error, match=r"train\.jsonl:2: not a"):
        list(read_split(tmp_path, "train"))
    with pytest.raises(Gemma3Error, match="raw split not found"):
        list(read_split(tmp_path, "validation"))


# ---------------------------------------------------------------------------------------------
# Tokenization

STORIES_TRAIN = [
    "Once upon a time there was a pumpkin.",
    'Tom saw a dog.\n\nThe dog said "woof" and ran away.',
    "Café naïve 日本 🎃🐸 — “quotes”.",
    "He typed <|endoftext|> but it was only text.",
    "  ",  # write_split keeps it; the tokenizer sees an empty-ish story
    "Lily   had   spaces\tand tabs.",
    "The end.",
]
STORIES_VAL = ["A bird sang.", "Ben and Mia played.\nThey laughed.", "Zoë 🎈."]


def write_raw(raw: Path) -> None:
    write_split(raw, "train", STORIES_TRAIN)
    write_split(raw, "validation", STORIES_VAL)
    write_source_info(raw, {"source": "test", "note": "hand-written"})


def expected_ids(stories: list[str], eot: bool) -> list[int]:
    out: list[int] = []
    for s in stories:
        out += encode(s) + ([EOT_ID] if eot else [])
    return out


def test_tokenize_raw_matches_independent_encoding(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "tokens"
    write_raw(raw)
    meta = tokenize_raw(raw, out, num_proc=1, batch_stories=3, progress=False)
    assert json.loads((out / "meta.json").read_text(encoding="utf-8")) == meta
    assert meta["source"] == {"source": "test", "note": "hand-written"}
    assert meta["eot"] is True and meta["eot_id"] == EOT_ID and meta["dtype"] == "uint16"
    for split, stories in (("train", STORIES_TRAIN), ("validation", STORIES_VAL)):
        counted = sum(len(encode(s)) + 1 for s in stories)
        assert meta[split]["tokens"] == counted
        assert meta[split]["stories"] == len(stories)
        assert meta[split]["bytes"] == sum(len(s.encode("utf-8")) for s in stories)
        path = out / f"{split}.bin"
        assert path.stat().st_size == 2 * counted
        arr = np.memmap(path, dtype=np.uint16, mode="r")
        assert arr.tolist() == expected_ids(stories, eot=True)
        # EOT follows every story and only stories: it appears exactly once per story, last.
        eot_at = np.flatnonzero(arr == EOT_ID)
        assert len(eot_at) == len(stories) and eot_at[-1] == len(arr) - 1
        pieces = np.split(np.asarray(arr), eot_at + 1)[:-1]
        assert [decode(p[:-1].tolist()) for p in pieces] == stories


def test_tokenize_raw_without_eot(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "tokens"
    write_raw(raw)
    meta = tokenize_raw(raw, out, eot=False, num_proc=2, batch_stories=2, progress=False)
    assert meta["eot"] is False
    arr = np.fromfile(out / "train.bin", dtype=np.uint16)
    assert EOT_ID not in arr
    assert arr.tolist() == expected_ids(STORIES_TRAIN, eot=False)
    assert meta["train"]["tokens"] == sum(len(encode(s)) for s in STORIES_TRAIN)
    assert decode(arr.tolist()) == "".join(STORIES_TRAIN)


def test_tokenize_batch_size_does_not_change_output(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_raw(raw)
    tokenize_raw(raw, tmp_path / "a", num_proc=1, batch_stories=1, progress=False)
    tokenize_raw(raw, tmp_path / "b", num_proc=2, batch_stories=1000, progress=False)
    for split in ("train.bin", "validation.bin"):
        assert (tmp_path / "a" / split).read_bytes() == (tmp_path / "b" / split).read_bytes()


def test_tokenize_empty_split_is_an_error(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_split(raw, "train", ["Only train."])
    write_split(raw, "validation", [])
    with pytest.raises(Gemma3Error, match="no stories in the validation split"):
        tokenize_raw(raw, tmp_path / "tokens", progress=False)
    assert not (tmp_path / "tokens" / "validation.bin").exists()


def test_load_tokens_checks(tmp_path: Path) -> None:
    p = tmp_path / "t.bin"
    np.arange(100, dtype=np.uint16).tofile(p)
    data = load_tokens(p, vocab_size=100, min_tokens=10)
    assert data.dtype == np.uint16 and data.tolist() == list(range(100))
    with pytest.raises(Gemma3Error, match="token id 99 >= the model's vocab_size 99"):
        load_tokens(p, vocab_size=99, min_tokens=10)
    with pytest.raises(Gemma3Error, match="100 tokens, fewer than the 101"):
        load_tokens(p, vocab_size=100, min_tokens=101)
    p.write_bytes(p.read_bytes() + b"\x00")
    with pytest.raises(Gemma3Error, match="201 bytes is not a whole number"):
        load_tokens(p, vocab_size=100, min_tokens=10)
    with pytest.raises(Gemma3Error, match="token file not found"):
        load_tokens(tmp_path / "none.bin", vocab_size=100, min_tokens=1)


def test_sample_batch_windows() -> None:
    data = np.arange(1000, dtype=np.uint16)
    x, y = sample_batch(data, 6, 16, seed=1, step=3)
    assert x.shape == y.shape == (6, 16) and x.dtype == torch.int64
    for row_x, row_y in zip(x, y, strict=True):
        start = int(row_x[0])
        assert row_x.tolist() == list(range(start, start + 16))
        assert row_y.tolist() == list(range(start + 1, start + 17))
        assert start + 16 < 1000
    x2, _ = sample_batch(data, 6, 16, seed=1, step=3)
    assert torch.equal(x, x2)
    assert not torch.equal(x, sample_batch(data, 6, 16, seed=1, step=4)[0])
    assert not torch.equal(x, sample_batch(data, 6, 16, seed=2, step=3)[0])
    assert not torch.equal(x, sample_batch(data, 6, 16, seed=1, step=3, stream="validation")[0])
    a = fixed_batches(data, 3, 4, 8, seed=0)
    b = fixed_batches(data, 3, 4, 8, seed=0)
    assert len(a) == 3 and all(torch.equal(p[0], q[0]) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("n, block", [(23, 5), (21, 5), (6, 5), (2, 5), (50, 1)])
def test_sequential_windows_cover_every_target_once(n: int, block: int) -> None:
    data = np.arange(n, dtype=np.uint16)
    windows = list(sequential_windows(data, block))
    assert len(windows) == math.ceil((n - 1) / block)
    targets = np.concatenate([y for _, y in windows])
    assert targets.tolist() == list(range(1, n))
    for x, y in windows:
        assert 1 <= len(x) <= block and len(x) == len(y)
        assert (y == x + 1).all()


# ---------------------------------------------------------------------------------------------
# Evaluation


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny matmuls on a shared 2-core machine: one thread avoids seconds of spin-waiting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**kw) -> Config:
    return Config.from_name("gemma3-tiny", **kw)


@pytest.mark.parametrize("how", ["final_norm", "lm_head"])
def test_uniform_logits_give_ln_vocab(how: str) -> None:
    # A padded vocabulary checks that padding rows are not part of the softmax: ln(500), not ln(512).
    cfg = tiny_config(vocab_size=500, vocab_pad_multiple=64, tie_embeddings=False)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        if how == "final_norm":
            model.model.norm.weight.fill_(-1.0)  # RMSNorm scales by (1 + w) = 0
        else:
            model.lm_head.weight.zero_()
    data = np.random.default_rng(0).integers(0, 500, size=101).astype(np.uint16)
    logits, _ = model(torch.from_numpy(data[:20].astype(np.int64))[None])
    assert torch.count_nonzero(logits) == 0
    res = evaluate_tokens(model, data, block_size=16, batch_size=3, progress=False)
    assert res["tokens"] == 100
    assert res["loss"] == pytest.approx(math.log(500), rel=1e-6)
    assert res["perplexity"] == pytest.approx(500.0, rel=1e-5)


def randomized_model(cfg: Config, seed: int = 0) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
            else:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("n, block, batch", [(150, 32, 2), (97, 16, 4), (33, 32, 8)])
def test_evaluate_matches_direct_loop(n: int, block: int, batch: int) -> None:
    vocab = 300
    model = randomized_model(tiny_config(vocab_size=vocab))
    data = np.random.default_rng(n).integers(0, vocab, size=n).astype(np.uint16)

    # Independent: one window at a time, positions start, start+block, ...; sum of nats / count.
    nats, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, n - 1, block):
            stop = min(start + block, n - 1)
            x = torch.tensor(data[start:stop].astype(np.int64))[None]
            y = torch.tensor(data[start + 1 : stop + 1].astype(np.int64))
            logits, _ = model(x)
            nats += F.cross_entropy(logits[0].double(), y, reduction="sum").item()
            count += len(y)
    assert count == n - 1

    model.train()
    res = evaluate_tokens(model, data, block_size=block, batch_size=batch, progress=False)
    assert not model.training
    assert res["tokens"] == n - 1
    assert res["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(nats / count), rel=1e-5)
    # The random model is far from uniform, so the comparison above is not trivially ln(V).
    assert abs(res["loss"] - math.log(vocab)) > 0.1


def test_bits_per_byte() -> None:
    assert bits_per_byte(math.log(2), 100, 100) == pytest.approx(1.0)
    assert bits_per_byte(2.0, 3, 5) == pytest.approx(6.0 / (5 * math.log(2)))
    # 4.07 bytes per token at 1.0 nat/token: 1 / (4.07 ln 2) bits per byte.
    assert bits_per_byte(1.0, 1000, 4070) == pytest.approx(1.0 / (4.07 * math.log(2)))


def test_tokenize_with_one_and_two_processes_gives_identical_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    used: list[int | None] = []
    real_map = datasets.Dataset.map

    def spy(self, *args, **kwargs):
        used.append(kwargs.get("num_proc"))
        return real_map(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", spy)
    raw = tmp_path / "raw"
    write_split(raw, "train", [f"{s} ({i})" for i in range(40) for s in STORIES_TRAIN[:3]])
    write_split(raw, "validation", STORIES_VAL * 4)
    one = tokenize_raw(raw, tmp_path / "one", num_proc=1, batch_stories=2, progress=False)
    two = tokenize_raw(raw, tmp_path / "two", num_proc=2, batch_stories=2, progress=False)
    assert used == [None, None, 2, 2]  # the second run really used two worker processes
    assert one == two
    for split in ("train.bin", "validation.bin"):
        assert (tmp_path / "one" / split).read_bytes() == (tmp_path / "two" / split).read_bytes()
    stories = [json.loads(x)["text"] for x in (raw / "train.jsonl").read_text().splitlines()]
    assert np.fromfile(tmp_path / "two" / "train.bin", np.uint16).tolist() == expected_ids(
        stories, eot=True
    )
    # The datasets cache lived in the output folder and is gone.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "meta.json", "train.bin", "validation.bin"
    ]  # fmt: skip


def test_full_disk_names_the_file(tmp_path: Path) -> None:
    """A file-size limit makes every write past 64 KB fail (EFBIG), as a full disk would."""
    code = f"""
import resource, signal, sys
from gemma3.data.raw import write_split
from gemma3.data.tokens import tokenize_raw
from gemma3.errors import Gemma3Error
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
write_split({str(tmp_path / "raw")!r}, "validation", ["A story."] * 10)
write_split({str(tmp_path / "raw")!r}, "train", ["A story about a big red ball."] * 20000)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
for step in ("write", "tokenize"):
    try:
        if step == "write":
            write_split({str(tmp_path / "raw")!r}, "train", ["Another story."] * 20000)
        else:
            tokenize_raw({str(tmp_path / "raw")!r}, {str(tmp_path / "tok")!r}, num_proc=1,
                         progress=False)
    except Gemma3Error as e:
        print(e)
"""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    ).stdout.splitlines()
    assert len(out) == 2, out
    assert out[0].startswith(f"{tmp_path / 'raw' / 'train.jsonl'}: cannot write (File too large)")
    # Tokenizing: the datasets cache in the output folder is the first write to fail.
    assert out[1].startswith(f"{tmp_path / 'tok'}/") and ": cannot write (File too large)" in out[1]
    # The previous train split is untouched (20,000 copies of the first story).
    assert (tmp_path / "raw" / "train.jsonl").read_text().count("big red ball") == 20000
    assert not [p for p in (tmp_path / "raw").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "files, source, code, expected",
    [
        ({"s.jsonl": '{"text": "a"}\n{"text": "b \\ud800"}\n'}, "s.jsonl", 2,
         "download: error: data/source/s.jsonl:2: the text holds '\\ud800', a lone surrogate"),
        ({"d/a_train.txt": "A.\n", "d/b_train.txt": "B.\n", "d/valid.txt": "V.\n"}, "d", 2,
         "download: error: data/source/d: 2 train files (a_train.txt, b_train.txt)"),
        ({"s.txt": "\ufeff<|endoftext|>\nOne.\n<|endoftext|>\nTwo.\n<|endoftext|>\n"
                   "Three.\n<|endoftext|>\n   \n"}, "s.txt", 0,
         "download: data/source/s.txt -> data/raw (train: 2 stories; validation: 1 stories), "
         "2 empty stories skipped"),
        ({"d/train.jsonl": '{"text": "a"}\n{"text": null}\n{"text": "b"}\n',
          "d/valid.jsonl": '{"text": null}\n{"text": "v"}\n'}, "d", 0,
         "download: data/source/d -> data/raw (train: 2 stories, 1 null rows skipped; "
         "validation: 1 stories, 1 null rows skipped)"),
    ],
)  # fmt: skip
def test_local_source_through_the_stage(
    tmp_path: Path, files: dict[str, str], source: str, code: int, expected: str
) -> None:
    from tests.project import run_stage, write_params

    for name, text in files.items():
        path = tmp_path / "data" / "source" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    write_params(tmp_path, data={"source": f"data/source/{source}", "val_fraction": 0.34})
    proc = run_stage(tmp_path, "download", check=False)
    assert proc.returncode == code, proc.stderr
    out = proc.stderr if code else proc.stdout
    assert out.strip().startswith(expected), out
    assert len(out.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    if code == 0:
        stories = list(read_split(tmp_path / "data" / "raw", "train"))
        stories += list(read_split(tmp_path / "data" / "raw", "validation"))
        assert not any("\ufeff" in s or "endoftext" in s for s in stories)


def test_the_data_stages_run_where_torch_cannot_be_imported(tmp_path: Path) -> None:
    """download and tokenize never import torch (about 2-3 s of a stage's start on a CPU, paid
    by every `dvc repro` that re-tokenizes): both run, and tokenize writes its tokens, with a
    `torch` first on the path whose import fails."""
    import os
    import subprocess

    from tests.project import env, stage_cmd, write_params

    blocker = tmp_path / "no-torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("a data stage imported torch")\n')
    ws = tmp_path / "ws"
    ws.mkdir()
    write_params(ws, data={"synthetic": {"n_train": 200, "n_val": 20}})
    e = env()
    e["PYTHONPATH"] = os.pathsep.join((str(blocker.parent), e["PYTHONPATH"]))
    for stage in ("download", "tokenize"):
        proc = subprocess.run(stage_cmd(stage), cwd=ws, env=e, capture_output=True, text=True)
        assert proc.returncode == 0, f"{stage}: {proc.stderr[-2000:]}"
    meta = json.loads((ws / "data" / "tokens" / "meta.json").read_text(encoding="utf-8"))
    assert (ws / "data/tokens/train.bin").stat().st_size == 2 * meta["train"]["tokens"] > 0
