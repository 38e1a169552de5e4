"""Bad input and faults at every entry point, run as subprocesses the way a user runs them.

The contract, checked by one helper (`assert_clean_error`) over one table of cases: given bad
input, a stage (`python -m stages.<name>`) or the CLI (`python -m gemma3.cli ...`)

1. exits non-zero (2 for input the user can fix, 1 for the environment, 130 for Ctrl-C),
2. prints exactly one stderr line, `<prog>: error: <message>`, naming the problem (no traceback
   unless GEMMA3_DEBUG=1),
3. leaves every file under the workspace byte-identical (no half-written output, no temp file).

A warning is different: exit 0 and one `warning: ...` line. Progress bars (tqdm, on stderr) are
not messages and are filtered out before counting lines.

Every case copies one prepared workspace (params.yaml, data/raw, data/tokens, a checkpoint, and
metrics/plots/samples files standing in for earlier outputs), breaks one thing, runs one command.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import gemma3.hf
from gemma3.config import FULL, SLIDING, Config
from gemma3.data.raw import write_source_info, write_split
from gemma3.generation import generate
from gemma3.hf import load_checkpoint, save_checkpoint
from gemma3.model import Gemma3ForCausalLM
from gemma3.params import load_params
from gemma3.state import fingerprint, save_state
from gemma3.tokenizer import EOT_ID, decode
from tests.project import (
    REPO,
    env,
    patterned_tokens,
    run_stage,
    stage_cmd,
    write_params,
    write_tokens,
)

STAGES = ("download", "tokenize", "train", "evaluate", "sample")
CKPT = "checkpoints/best"
STATE = "checkpoints/state"
TIMEOUT = 180

# The checkpoint the evaluate/sample stages and `gemma3 generate` read: the GPT-2 vocabulary (any
# prompt encodes into it) with a short context, so an over-long prompt is cheap to write.
CKPT_CFG = Config(
    name="bad-input-tiny",
    vocab_size=50257,
    context_length=64,
    emb_dim=32,
    n_heads=2,
    n_kv_heads=1,
    head_dim=16,
    hidden_dim=64,
    n_layers=2,
    layer_types=(SLIDING, FULL),
    sliding_window=16,
    query_pre_attn_scalar=16.0,
    tie_embeddings=True,
)

# Stand-ins for outputs of earlier runs: a failing command must leave them as they are.
EARLIER_OUTPUTS = {
    "metrics/train.json": '{"train": {"best_val_loss": 1.0}}\n',
    "metrics/eval.json": '{"eval": {"loss": 1.0}}\n',
    "plots/train.csv": "step,train_loss,val_loss,lr,grad_norm,tokens_per_s,mfu\n",
    "samples/samples.md": "# Samples\n",
    "samples/samples.json": '{"samples": []}\n',
}

# ---------------------------------------------------------------------------------------------
# The workspace, the runner and the one assertion
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("template"))


def build_workspace(root: Path) -> Path:
    """A complete workspace, built in-process once per module (no tokenizer, no training)."""
    write_params(root)
    write_tokens(root)
    raw = root / "data" / "raw"
    stories = [f"Story {i}. Tom had a red ball. He was happy." for i in range(20)]
    write_split(raw, "train", stories[:16])
    write_split(raw, "validation", stories[16:])
    write_source_info(raw, {"source": "test"})
    torch.manual_seed(0)
    save_checkpoint(Gemma3ForCausalLM(CKPT_CFG), root / CKPT, meta={"step": 10, "val_loss": 5.0})
    for rel, text in EARLIER_OUTPUTS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def ws(template: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(template, root)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file's sha256 and every directory under `root` (a leftover temp dir shows up too)."""
    return {
        p.relative_to(root).as_posix(): (
            "dir"
            if p.is_dir()
            else hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file()
            else "special"  # a FIFO or a link to /dev/zero a case planted: never read
        )
        for p in sorted(root.rglob("*"))
    }


def run(
    root: Path,
    entry: str,
    *args: str,
    input: str = "",
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`entry` is a stage name, "gemma3" (the CLI) or "python" (args go to the interpreter)."""
    if entry in STAGES:
        cmd = [*stage_cmd(entry), *args]
    elif entry == "gemma3":
        cmd = [sys.executable, "-m", "gemma3.cli", *args]
    else:
        cmd = [sys.executable, *args]
    e = env()
    e.pop("GEMMA3_DEBUG", None)
    e["PYTHONPATH"] = str(REPO)
    e.update(extra_env or {})
    return subprocess.run(
        cmd, cwd=root, env=e, input=input, capture_output=True, text=True, timeout=TIMEOUT
    )


# A tqdm frame: "train:  25%|██▌  | 1/4 [00:01<00:03, ...]" or "tokenize train: 0.00B [00:00, ...]"
_PROGRESS = re.compile(r"^[\w .-]+:.* \[\d+:\d\d[<,\]]")


def stderr_lines(stderr: str) -> list[str]:
    """The messages on stderr: tqdm frames (separated by \\r) are not messages."""
    return [ln for ln in re.split(r"[\r\n]+", stderr) if ln.strip() and not _PROGRESS.match(ln)]


def prog_of(entry: str) -> str:
    return "gemma3" if entry in ("gemma3", "python") else entry


def assert_clean_error(
    proc: subprocess.CompletedProcess[str],
    prog: str,
    needles: tuple[str, ...],
    *,
    root: Path,
    before: dict[str, str],
    code: int = 2,
    info: tuple[str, ...] = (),
) -> str:
    """Non-zero exit `code`, exactly one `<prog>: error: ...` line holding `needles`, no changes.

    Lines starting with one of `info` (progress notes such as "resuming from ...") are allowed.
    """
    err = proc.stderr
    assert "Traceback" not in err, err
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}; stderr:\n{err}"
    lines = [ln for ln in stderr_lines(err) if not (info and ln.startswith(info))]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    line = lines[0]
    # argparse errors name the subcommand too: "gemma3 generate: error: ..."
    assert re.match(rf"{re.escape(prog)}( [\w-]+)?: error: \S", line), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    after = snapshot(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"files changed by a failed command: {changed}"
    return line


def assert_one_warning(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}; stderr:\n{proc.stderr}"
    lines = stderr_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("warning: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Ways to break a workspace (each returns setup(root))
# ---------------------------------------------------------------------------------------------

Setup = Callable[[Path], Any]


def params(**sections: Any) -> Setup:
    return lambda root: write_params(root, **sections)


def edit_params(fn: Callable[[dict[str, Any]], Any]) -> Setup:
    def setup(root: Path) -> None:
        path = root / "params.yaml"
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
        fn(d)
        path.write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")

    return setup


def write(rel: str, data: str | bytes) -> Setup:
    def setup(root: Path) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")

    return setup


def replaced(rel: str, make: Callable[[Path], Any]) -> Setup:
    """`rel` removed (if there) and made again by `make(path)`."""

    def setup(root: Path) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        make(path)

    return setup


def fifo(rel: str) -> Setup:
    """`rel` replaced by a named pipe nobody writes to: reading it would block forever."""
    return replaced(rel, os.mkfifo)


def symlink(rel: str, target: str) -> Setup:
    return replaced(rel, lambda path: path.symlink_to(target))


def append(rel: str, data: bytes) -> Setup:
    def setup(root: Path) -> None:
        with open(root / rel, "ab") as f:
            f.write(data)

    return setup


def remove(rel: str) -> Setup:
    def setup(root: Path) -> None:
        path = root / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return setup


def truncate(rel: str) -> Setup:
    def setup(root: Path) -> None:
        path = root / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return setup


def edit_json(rel: str, fn: Callable[[dict[str, Any]], Any]) -> Setup:
    def setup(root: Path) -> None:
        path = root / rel
        d = json.loads(path.read_text(encoding="utf-8"))
        fn(d)
        path.write_text(json.dumps(d), encoding="utf-8")

    return setup


QNORM = "model.layers.0.self_attn.q_norm.weight"


def edit_weights(fn: Callable[[dict[str, torch.Tensor]], Any]) -> Setup:
    """Change the checkpoint's tensors in place (values or dtypes), keeping its config."""

    def setup(root: Path) -> None:
        path = root / CKPT / "model.safetensors"
        sd = load_file(str(path))
        fn(sd)
        save_file(sd, str(path))

    return setup


def tokens(rel: str, ids: np.ndarray) -> Setup:
    return write(rel, np.asarray(ids, dtype=np.uint16).tobytes())


def source(rel: str, data: str | bytes) -> Setup:
    """A local data source file inside the workspace, and data.source pointing at it."""

    def setup(root: Path) -> None:
        write(rel, data)(root)
        write_params(root, data={"source": rel})

    return setup


def parquet_without_text(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "src").mkdir()
    pq.write_table(pa.table({"story": ["one story", "another story"]}), root / "src/s.parquet")
    write_params(root, data={"source": "src/s.parquet"})


def parquet_text(values: list[Any], arrow_type: str) -> Setup:
    """A parquet source whose `text` column has `arrow_type` (int64, null, ...)."""

    def setup(root: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        (root / "src").mkdir(exist_ok=True)
        column = pa.array(values, type=getattr(pa, arrow_type)())
        pq.write_table(pa.table({"text": column}), root / "src/s.parquet")
        write_params(root, data={"source": "src/s.parquet"})

    return setup


def directory_with_bad_validation_file(root: Path) -> None:
    write("src/dir/train.txt", "A good story.\n<|endoftext|>\nAnother one.\n")(root)
    write("src/dir/validation.txt", b"A story.\nCaf\xe9 au lait.\n")(root)
    write_params(root, data={"source": "src/dir"})


def del_key(d: dict[str, Any], key: str) -> None:
    del d[key]


class _NoMoments:
    """What `save_state` reads of an optimizer; building a real one costs seconds (dynamo)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.n = len(list(model.parameters()))

    def state_dict(self) -> dict[str, Any]:
        return {"state": {}, "param_groups": [{"lr": 1e-3, "params": list(range(self.n))}]}


def training_state(cfg_for_tensors: Config | None, *, same_fingerprint: bool) -> Setup:
    """checkpoints/state as another run left it: tensors of `cfg_for_tensors` (None: the model
    params.yaml describes), stamped with this workspace's fingerprint or another one."""

    def setup(root: Path) -> None:
        p = load_params(root / "params.yaml")
        meta = json.loads((root / "data/tokens/meta.json").read_text(encoding="utf-8"))
        model = Gemma3ForCausalLM(cfg_for_tensors or p.model_config())
        optimizer = _NoMoments(model)
        fp = fingerprint(p, meta, 1) if same_fingerprint else "made-by-other-params"
        info = {"step": 1, "fingerprint": fp, "best_val_loss": 9.0, "best_step": 1}
        info |= {"history": [], "mlflow_run_id": None}
        save_state(root / STATE, model, optimizer, info)  # type: ignore[arg-type]

    return setup


def chain(*setups: Setup) -> Setup:
    def setup(root: Path) -> None:
        for s in setups:
            s(root)

    return setup


OTHER_PRESET = Config.from_name("gemma3-small", vocab_size=512)
TRUNCATED_STATE = chain(
    training_state(None, same_fingerprint=True), truncate(f"{STATE}/state.safetensors")
)

# ---------------------------------------------------------------------------------------------
# The table: bad input -> exit code, one line naming the problem, nothing changed
# ---------------------------------------------------------------------------------------------


def case(
    id: str, entry: str, setup: Setup | None, *needles: str, args: tuple[str, ...] = (), code=2
) -> Any:
    return pytest.param(entry, setup, needles, args, code, id=id)


GEN = ("generate", "Once upon a time", "--model", CKPT, "--max-new-tokens", "2", "--seed", "0")

MILLION_LAYERS = Config.from_name("gemma3-tiny", vocab_size=512, n_layers=1_000_000)

PARAMS_CASES = [
    # Every stage validates the whole params.yaml up front; download is the cheapest to start.
    case("params-missing-params-file", "download", remove("params.yaml"), "params.yaml: not found"),
    case("params-invalid-yaml", "download", write("params.yaml", "train: [\n"), "not valid YAML"),
    case(
        "params-missing-section",
        "download",
        edit_params(lambda d: del_key(d, "train")),
        "params.yaml: missing section 'train'",
    ),
    case(
        "params-unknown-section-typo",
        "download",
        edit_params(lambda d: d.update(trian={})),
        "trian: unknown section (did you mean 'train'?)",
    ),
    case(
        "params-unknown-key-typo",
        "download",
        edit_params(lambda d: d["train"].update(max_step=10)),
        "params.yaml: train.max_step: unknown key (did you mean 'max_steps'?)",
    ),
    case(
        "params-section-not-a-mapping",
        "download",
        edit_params(lambda d: d.update(train=5)),
        "train must be a mapping",
    ),
    case(
        "params-wrong-type-int-as-string",
        "download",
        params(train={"batch_size": "16"}),
        "train.batch_size: must be an integer, got '16'",
    ),
    case(
        "params-wrong-type-bool",
        "download",
        params(tokenize={"eot": "yes"}),
        "tokenize.eot: must be true/false",
    ),
    case(
        "params-wrong-type-list",
        "download",
        params(sample={"prompts": "Once upon a time"}),
        "sample.prompts: must be a list",
    ),
    case(
        "params-negative-batch-size",
        "download",
        params(train={"batch_size": -4}),
        "train.batch_size: must be > 0, got -4",
    ),
    case(
        "params-zero-block-size",
        "download",
        params(train={"block_size": 0}),
        "train.block_size: must be > 0, got 0",
    ),
    case(
        "params-zero-max-steps",
        "download",
        params(train={"max_steps": 0}),
        "train.max_steps: must be > 0, got 0",
    ),
    case(
        "params-zero-eval-batch-size",
        "download",
        params(eval={"batch_size": 0}),
        "eval.batch_size: must be > 0, got 0",
    ),
    case("params-zero-lr", "download", params(train={"lr": 0}), "train.lr: must be > 0, got 0"),
    case("params-negative-lr", "download", params(train={"lr": -1e-3}), "train.lr: must be > 0"),
    case("params-nan-lr", "download", params(train={"lr": math.nan}), "train.lr: must be finite"),
    case(
        "params-warmup-longer-than-training",
        "download",
        params(train={"warmup_steps": 50}),
        "train.warmup_steps: (50) exceeds train.max_steps (40)",
    ),
    case(
        "params-micro-batch-not-dividing-the-step",
        "train",
        params(train={"batch_size": 4, "grad_accum": 4, "micro_batch": 6}),
        "train.micro_batch: must be auto or an integer dividing train.batch_size x "
        "train.grad_accum (16), got 6",
    ),
    case(
        "params-eval-batch-size-zero",
        "download",
        params(train={"eval_batch_size": 0}),
        "train.eval_batch_size: must be auto or an integer >= 1, got 0",
    ),
    case(
        "params-vocab-pad-multiple-zero",
        "download",
        params(train={"vocab_pad_multiple": 0}),
        "train.vocab_pad_multiple: must be auto or an integer >= 1, got 0",
    ),
    case(
        "params-block-size-over-context-length",
        "train",
        params(train={"block_size": 2048}),
        "train.block_size: (2048) exceeds the model's context_length (1024)",
    ),
    case(
        "params-eval-block-size-over-context-length",
        "download",
        params(eval={"block_size": 4096}),
        "eval.block_size: (4096) exceeds the model's context_length (1024)",
    ),
    case(
        "params-heads-not-divisible-by-kv-groups",
        "download",
        params(model={"overrides": {"n_kv_heads": 3}}),
        "model.overrides.n_heads: (4) must be divisible by n_kv_heads (3)",
    ),
    case(
        "params-unknown-preset",
        "download",
        params(model={"preset": "gemma3-huge"}),
        "model.preset: unknown preset 'gemma3-huge'",
        "gemma3-tiny",
    ),
    case(
        "params-unknown-model-override",
        "download",
        params(model={"overrides": {"emb_size": 64}}),
        "model.overrides.emb_size: unknown field",
    ),
    case(
        "params-zero-sliding-window",
        "download",
        params(model={"overrides": {"sliding_window": 0}}),
        "model.overrides.sliding_window: must be > 0, got 0",
    ),
    case(
        "params-negative-sliding-window",
        "download",
        params(model={"overrides": {"sliding_window": -16}}),
        "model.overrides.sliding_window: must be > 0, got -16",
    ),
    case(
        "params-unknown-device",
        "download",
        params(train={"device": "gpu"}),
        "train.device: must be one of auto, cpu, cuda, mps, got 'gpu'",
    ),
    case(
        "params-sample-dtype-unknown",
        "sample",
        params(sample={"dtype": "int4"}),
        "sample.dtype: must be one of auto, fp32, bf16, int8, got 'int4'",
    ),
    case(
        "params-train-precision-int8",
        "train",
        params(train={"precision": "int8"}),
        "train.precision: must be one of auto, fp32, bf16-autocast, bf16-pure, got 'int8'; "
        "int8 is for generation only (sample.dtype)",
    ),
    case(
        "params-top-p-zero",
        "download",
        params(sample={"top_p": 0}),
        "sample.top_p: must be in (0, 1]",
    ),
    case(
        "params-val-fraction-one",
        "download",
        params(data={"val_fraction": 1.0}),
        "data.val_fraction: must be between 0 and 1",
    ),
    case(
        "params-unknown-data-source",
        "download",
        params(data={"source": "tinystories"}),
        "data.source: 'tinystories' is not 'synthetic'",
    ),
    case(
        "params-seed-negative",
        "download",
        params(seed=-1),
        "params.yaml: seed: must be an integer in [0, 4294967295], got -1",
    ),
    case(
        "params-seed-too-large",
        "download",
        params(seed=2**70),
        "seed: must be an integer in [0, 4294967295], got 1180591620717411303424",
    ),
    case(
        "params-sample-seed-too-large",
        "download",
        params(sample={"seed": 2**70}),
        "sample.seed: must be an integer in [0, 4294967295]",
    ),
    case(
        "params-override-of-the-model-name",
        "download",
        params(model={"overrides": {"name": "mine"}}),
        "model.overrides.name: cannot be overridden",
        "model.preset",
    ),
    case(
        "params-not-utf8",
        "download",
        append("params.yaml", b"# caf\xe9\n"),
        "params.yaml: not valid UTF-8 (byte 0xe9 on line",
    ),
    case(  # exists, so not "not found"; and never opened (a FIFO would block the read)
        "params-file-is-a-fifo",
        "download",
        fifo("params.yaml"),
        "params.yaml: not a regular file (a named pipe)",
    ),
    case(
        "params-deeply-nested-yaml",  # PyYAML recurses once per level: RecursionError
        "train",
        write("params.yaml", "a: " + "[" * 100_000),
        "params.yaml: not valid YAML (nested too deeply to read)",
    ),
    case(
        "params-duplicate-key",
        "download",
        append("params.yaml", b"seed: 7\n"),
        "params.yaml: line",
        "duplicate key 'seed' (first on line 1)",
    ),
    case(
        "params-prompt-longer-than-context",
        "download",
        params(sample={"prompts": ["Once upon a time", "dog" + " dog" * 1099]}),
        "sample.prompts[1]: prompt has 1100 tokens; the model's context_length is 1024",
    ),
    case(
        "params-prompt-with-a-lone-surrogate",  # YAML's "\ud800"; samples.md could not hold it
        "download",
        params(sample={"prompts": ["Once upon a \ud800 time"]}),
        "sample.prompts[0]: '\\ud800' at character 12 is a lone UTF-16 surrogate",
    ),
    case(  # tuple(range(10**30)) for the layer pattern would never finish
        "params-n-layers-beyond-any-model",
        "download",
        params(model={"overrides": {"n_layers": 10**30}}),
        f"model.overrides.n_layers: must be at most 1,048,576, got {10**30}",
    ),
    case(  # used to build and initialise real layers for minutes until the OOM killer came
        "train-model-larger-than-memory",
        "train",
        params(model={"overrides": {"n_layers": 1_000_000}}),
        f"params.yaml: model: {MILLION_LAYERS.param_counts()['stored']:,} parameters need "
        f"{16 * MILLION_LAYERS.param_counts()['stored'] / 2**30:,.1f} GiB to train (16 bytes each",
        "more than the",
    ),
    case(
        "params-batch-larger-than-the-data",
        "train",
        params(train={"batch_size": 1000}),
        "data/tokens/train.bin: 20,000 tokens is fewer than one batch",
        "train.batch_size 1000 x train.block_size 32",
    ),
]

# Every stage validates the whole file up front, whichever section it reads: `seed: -1` used to
# pass download (and every stage after it) and crash train with a traceback.
EVERY_STAGE_CASES = [
    case(
        f"{stage}-validates-every-section",
        stage,
        params(seed=-1),
        "params.yaml: seed: must be an integer in [0, 4294967295], got -1",
    )
    for stage in STAGES
] + [
    # Rejected by the first stage that runs, not by sample after training (README).
    case(
        "train-rejects-a-prompt-longer-than-context",
        "train",
        params(sample={"prompts": ["dog" + " dog" * 1099]}),
        "sample.prompts[0]: prompt has 1100 tokens; the model's context_length is 1024",
    )
]

DATA_CASES = [
    case(
        "tokenize-without-raw-dir",
        "tokenize",
        remove("data/raw"),
        "data/raw/train.jsonl: raw split not found; run the download stage first",
    ),
    case(
        "tokenize-raw-line-not-json",  # train.bin is written before validation is read
        "tokenize",
        append("data/raw/validation.jsonl", b"this is not json\n"),
        'data/raw/validation.jsonl:5: not a {"text": ...} JSON line',
    ),
    case("download-empty-txt", "download", source("src/empty.txt", ""), "src/empty.txt: 0 stories"),
    case(
        "download-empty-jsonl",
        "download",
        source("src/empty.jsonl", "\n"),
        "src/empty.jsonl: 0 stories",
    ),
    case(
        "download-non-utf8-txt",
        "download",
        source("src/s.txt", b"Once upon a time.\n<|endoftext|>\nCaf\xe9 story.\n"),
        "src/s.txt:3: not valid UTF-8 (byte 0xe9",
    ),
    case(
        "download-jsonl-line-not-json",
        "download",
        source("src/s.jsonl", '{"text": "a story"}\n{"text": oops}\n'),
        "src/s.jsonl:2: not a JSON line",
    ),
    case(
        "download-jsonl-without-text-field",
        "download",
        source("src/s.jsonl", '{"story": "a story"}\n'),
        'src/s.jsonl:1: expected an object with a string "text" field',
    ),
    case(
        "download-parquet-without-text-column",
        "download",
        parquet_without_text,
        "src/s.parquet: no 'text' column (columns: story)",
    ),
    case(  # datasets would cast the numbers to the stories "0", "1", ...
        "download-parquet-int-text-column",
        "download",
        parquet_text([0, 1, 2], "int64"),
        "src/s.parquet: column 'text' is int64, not strings",
    ),
    case(
        "download-parquet-null-text-column",
        "download",
        parquet_text([None, None], "null"),
        "src/s.parquet: column 'text' has only nulls, not strings",
    ),
    case(
        "download-jsonl-text-not-a-string",
        "download",
        source("src/s.jsonl", '{"text": "a story"}\n{"text": 5}\n'),
        'src/s.jsonl:2: expected an object with a string "text" field',
    ),
    case(  # json.loads recurses once per level: RecursionError
        "download-jsonl-line-nested-too-deeply",
        "download",
        source("src/s.jsonl", '{"text": "a story"}\n{"text": ' + "[" * 100_000 + "\n"),
        "src/s.jsonl:2: not a JSON line (maximum recursion depth exceeded",
    ),
    case(
        "download-source-is-a-fifo",
        "download",
        chain(fifo("src/s.txt"), params(data={"source": "src/s.txt"})),
        "src/s.txt: not a regular file (a named pipe)",
    ),
    case(
        "download-source-is-dev-zero",
        "download",
        params(data={"source": "/dev/zero"}),
        "/dev/zero: not a regular file (a device)",
    ),
    case(
        "download-unsupported-file-type",
        "download",
        source("src/s.csv", "text\na story\n"),
        "src/s.csv: unsupported file type",
    ),
    case(
        "download-dir-with-bad-validation-file",  # train is written before validation is read
        "download",
        directory_with_bad_validation_file,
        "src/dir/validation.txt:2: not valid UTF-8",
    ),
    case(
        "train-memmap-odd-size",
        "train",
        append("data/tokens/train.bin", b"\x00"),
        "data/tokens/train.bin: 40001 bytes is not a whole number of uint16 tokens",
    ),
    case(
        "train-memmap-shorter-than-block",
        "train",
        tokens("data/tokens/validation.bin", patterned_tokens(20)),
        "data/tokens/validation.bin: 20 tokens, fewer than the 33 one window needs",
    ),
    case(
        "train-token-id-over-vocab",
        "train",
        tokens("data/tokens/train.bin", np.append(patterned_tokens(1000), 600)),
        "token id 600 >= the model's vocab_size 512",
    ),
    case(
        "train-meta-not-json",
        "train",
        write("data/tokens/meta.json", "{bad"),
        "data/tokens/meta.json: not valid JSON",
    ),
    case(
        "evaluate-missing-meta",
        "evaluate",
        remove("data/tokens/meta.json"),
        "data/tokens/meta.json: not found",
    ),
]

RESUME_CASES = [
    # The state's params fingerprint matches but its tensors are another preset's (copied in).
    case(
        "resume-state-of-other-preset",
        "train",
        training_state(OTHER_PRESET, same_fingerprint=True),
        "checkpoints/state: training state does not match the model config",
        "delete it to start fresh",
    ),
    case(  # was read as "no state" and silently replaced by a fresh run's
        "resume-state-json-not-an-object",
        "train",
        chain(training_state(None, same_fingerprint=True), write(f"{STATE}/state.json", "[]")),
        "checkpoints/state/state.json: must be a JSON object {...}, got a list",
        "delete the directory to start fresh",
    ),
    case(
        "resume-truncated-state",
        "train",
        TRUNCATED_STATE,
        "checkpoints/state/state.safetensors: unreadable training state",
        "delete it to start fresh",
    ),
]

BROKEN_CHECKPOINTS = {
    "missing-dir": (remove(CKPT), "checkpoints/best: checkpoint directory not found"),
    "missing-safetensors": (
        remove(f"{CKPT}/model.safetensors"),
        "checkpoints/best/model.safetensors: missing; the checkpoint is incomplete",
    ),
    "truncated-safetensors": (
        truncate(f"{CKPT}/model.safetensors"),
        "checkpoints/best/model.safetensors: unreadable or truncated safetensors file",
    ),
    "config-weights-shape-mismatch": (
        edit_json(f"{CKPT}/config.json", lambda d: d.update(intermediate_size=128)),
        "checkpoints/best/model.safetensors: model.layers.0.mlp.down_proj.weight has shape (32, 64), "
        "config expects (32, 128)",
    ),
}
BROKEN_CHECKPOINTS |= {
    # Would allocate 50,257 x 10M floats (2 TB) before noticing: named from the file's header.
    "config-asks-for-a-huge-model": (
        edit_json(f"{CKPT}/config.json", lambda d: d.update(hidden_size=10_000_000)),
        "checkpoints/best/model.safetensors: model.embed_tokens.weight has shape (50257, 32), "
        "config expects (50257, 10000000)",
    ),
    "nan-weights": (
        edit_weights(lambda sd: sd["model.layers.1.mlp.up_proj.weight"][0, :3].fill_(math.nan)),
        "checkpoints/best/model.safetensors: model.layers.1.mlp.up_proj.weight has 3 NaN/Inf",
    ),
}
BROKEN_CHECKPOINTS |= {
    # Used to overflow inside torch: a 49-line traceback, exit 1.
    "config-int-beyond-int64": (
        edit_json(f"{CKPT}/config.json", lambda d: d.update(hidden_size=10**30)),
        "checkpoints/best/config.json: hidden_size: must be at most 9223372036854775807 (int64), "
        f"got {10**30}",
    ),
    # Valid JSON, not an object: was AttributeError "'list' object has no attribute 'get'".
    "meta-not-an-object": (
        write(f"{CKPT}/gemma3.json", "[]"),
        "checkpoints/best/gemma3.json: must be a JSON object {...}, got a list",
    ),
    # Exist, but are not regular files: not "missing", and never opened (a FIFO blocks).
    "config-is-a-fifo": (
        fifo(f"{CKPT}/config.json"),
        "checkpoints/best/config.json: not a regular file (a named pipe)",
    ),
    "weights-are-dev-zero": (
        symlink(f"{CKPT}/model.safetensors", "/dev/zero"),
        "checkpoints/best/model.safetensors: not a regular file (a device)",
    ),
}
CHECKPOINT_ENTRIES = {"evaluate": (), "sample": (), "gemma3": GEN}
EXPORT = ("export-hf", "--model", CKPT, "--out", "exported")


def config_value(key: str, value: Any) -> Setup:
    return edit_json(f"{CKPT}/config.json", lambda d: d.update({key: value}))


CHECKPOINT_CASES = [
    case(f"{entry}-{kind}", entry, broken[0], *broken[1:], args=args)
    for entry, args in CHECKPOINT_ENTRIES.items()
    for kind, broken in BROKEN_CHECKPOINTS.items()
] + [
    case(
        "generate-config-impossible-value",
        "gemma3",
        edit_json(f"{CKPT}/config.json", lambda d: d.update(head_dim=15)),
        "checkpoints/best/config.json: head_dim: must be even",
        args=GEN,
    ),
    case(
        "generate-inf-weight",
        "gemma3",
        edit_weights(lambda sd: sd["model.norm.weight"][5:6].fill_(-math.inf)),
        "model.norm.weight has 1 NaN/Inf value(s); the checkpoint is corrupt",
        args=GEN,
    ),
    case(
        "generate-int64-weights",
        "gemma3",
        edit_weights(lambda sd: sd.update({QNORM: sd[QNORM].long()})),
        f"checkpoints/best/model.safetensors: {QNORM} is int64; checkpoints hold float32 or "
        "bfloat16 weights",
        args=GEN,
    ),
    case(
        "generate-float16-weights",
        "gemma3",
        edit_weights(lambda sd: sd.update({k: v.half() for k, v in sd.items()})),
        "model.embed_tokens.weight is float16; checkpoints hold float32 or bfloat16 weights",
        args=GEN,
    ),
    *[
        case(f"generate-config-{what}", "gemma3", config_value(key, value), needle, args=GEN)
        for what, key, value, needle in [
            (
                "float-for-int",
                "hidden_size",
                32.5,
                "config.json: hidden_size: must be an integer, got 32.5",
            ),
            (
                "bool-for-int",
                "num_hidden_layers",
                True,
                "num_hidden_layers: must be an integer, got True",
            ),
            ("negative-int", "intermediate_size", -64, "intermediate_size: must be > 0, got -64"),
            (
                "nan-for-int",
                "head_dim",
                math.nan,
                "config.json: head_dim: must be an integer, got nan",
            ),
            (
                "string-for-number",
                "rms_norm_eps",
                "tiny",
                "rms_norm_eps: must be a number, got 'tiny'",
            ),
            ("layer-types-not-a-list", "layer_types", 5, "layer_types: must be a list, got 5"),
        ]
    ],  # fmt: skip
    case(
        "export-hf-config-int-beyond-int64",
        "gemma3",
        config_value("hidden_size", 10**30),
        "checkpoints/best/config.json: hidden_size: must be at most 9223372036854775807 (int64)",
        args=EXPORT,
    ),
    case(
        "export-hf-meta-not-an-object",
        "gemma3",
        write(f"{CKPT}/gemma3.json", '"x"'),
        "checkpoints/best/gemma3.json: must be a JSON object {...}, got a string",
        args=EXPORT,
    ),
    case(
        "generate-config-nested-too-deeply",
        "gemma3",
        write(f"{CKPT}/config.json", "[" * 100_000),
        "checkpoints/best/config.json: not valid JSON (nested too deeply to read)",
        args=GEN,
    ),
    case(
        "generate-config-asks-for-a-million-layers",  # no meta model of 10**6 layers is built
        "gemma3",
        edit_json(
            f"{CKPT}/config.json",
            lambda d: d.update(num_hidden_layers=10**6, layer_types=[SLIDING] * 10**6),
        ),
        "model.safetensors: holds 2 layers, but checkpoints/best/config.json has "
        "num_hidden_layers 1000000",
        args=GEN,
    ),
    case(
        "export-hf-missing-model",
        "gemma3",
        remove(CKPT),
        "checkpoints/best: checkpoint directory not found",
        args=("export-hf", "--model", CKPT, "--out", "exported"),
    ),
]


def gen(*flags: str) -> tuple[str, ...]:
    return (*GEN, *flags)


CLI_CASES = [
    case(
        "generate-prompt-longer-than-context",
        "gemma3",
        None,
        "prompt has 100 tokens; the model's context_length is 64",
        args=("generate", " ".join(["dog"] * 100), "--model", CKPT),
    ),
    case(
        "generate-top-p-over-one",
        "gemma3",
        None,
        "top_p must be in (0, 1] (1 = off), got 1.5",
        args=gen("--top-p", "1.5"),
    ),
    case(
        "generate-temperature-negative",
        "gemma3",
        None,
        "temperature must be >= 0",
        args=gen("--temperature", "-1"),
    ),
    case(
        "generate-temperature-nan",
        "gemma3",
        None,
        "temperature must be >= 0 (0 = greedy), got nan",
        args=gen("--temperature", "nan"),
    ),
    case(
        "generate-max-new-tokens-negative",
        "gemma3",
        None,
        "max_new_tokens must be >= 0, got -1",
        args=gen("--max-new-tokens", "-1"),
    ),
    case(
        "generate-max-new-tokens-not-an-int",
        "gemma3",
        None,
        "argument --max-new-tokens: invalid int value: 'ten'",
        args=gen("--max-new-tokens", "ten"),
    ),
    case(
        "generate-unknown-device",
        "gemma3",
        None,
        "--device: unknown device 'tpu'",
        args=gen("--device", "tpu"),
    ),
    case(
        "cli-unknown-command", "gemma3", None, "invalid choice: 'frobnicate'", args=("frobnicate",)
    ),
    case(
        "cli-info-unknown-preset",
        "gemma3",
        None,
        "model.preset: unknown preset 'gemma3-huge'",
        args=("info", "--preset", "gemma3-huge"),
    ),
]


# ---------------------------------------------------------------------------------------------
# Faults: Ctrl-C during training, a full disk while writing a checkpoint
# ---------------------------------------------------------------------------------------------

# Runs before gemma3 is imported, so every `from safetensors.torch import save_file` sees it.
# safetensors reports a full disk as SafetensorError (not OSError) after leaving a partial temp
# file next to the target; the patch does the same. DISK_FULL=rename instead fails the rename
# that puts a new checkpoint directory in place of the old one.
DISK_FULL = """
import errno, os
from pathlib import Path
import safetensors.torch
from safetensors import SafetensorError
_replace = os.replace
def _full_save(tensors, filename, metadata=None):
    Path(filename).with_name(".tmpPartial").write_bytes(b"\\0" * 4096)
    raise SafetensorError(
        f'Error while serializing: I/O error: No space left on device (os error 28) at path "{filename}"'
    )
def _full_rename(src, dst):
    if Path(src).is_dir() and Path(src).name.endswith(".tmp"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
    return _replace(src, dst)
if os.environ["DISK_FULL"] == "save_file":
    safetensors.torch.save_file = _full_save
elif os.environ["DISK_FULL"] == "rename":
    os.replace = _full_rename
"""

SAVE_AGAIN = """
from gemma3.errors import run_main
from gemma3.hf import load_checkpoint, save_checkpoint
model = load_checkpoint("checkpoints/best")
run_main(lambda: print(save_checkpoint(model, "checkpoints/best", meta={"step": 99})), prog="save")
"""


# The slowest test (three training runs) comes first: xdist overlaps it with the rest.
def test_ctrl_c_during_training_saves_state_and_resumes(ws: Path) -> None:
    write_params(ws, train={"max_steps": 15, "checkpoint_interval": 5, "eval_batches": 1})
    state = ws / STATE / "state.json"
    proc = subprocess.Popen(
        stage_cmd("train"), cwd=ws, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + TIMEOUT
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # the first state is saved at step 5: the loop is running
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    stderr = err.decode()
    step = json.loads(state.read_text())["step"]
    assert 5 <= step < 15, "the run finished before Ctrl-C; make it longer"
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr_lines(stderr) == [
        f"train: interrupted: stopped at step {step}; training state saved to {STATE}, "
        "re-run to resume"
    ], stderr
    before = snapshot(ws)

    # The resumed run hits a full disk at its first checkpoint: one line, nothing changed.
    code = DISK_FULL + "import runpy; runpy.run_module('stages.train', run_name='__main__')"
    full = run(ws, "python", "-c", code, extra_env={"DISK_FULL": "save_file"})
    needles = ("OSError", "checkpoints/.best.", "No space left on device")
    assert_clean_error(
        full, "train", needles, root=ws, before=before, code=1, info=("resuming from ",)
    )

    # With space again the run resumes from the saved step and finishes.
    again = run_stage(ws, "train")
    assert f"resuming from {STATE} at step {step}/15" in again.stderr
    assert json.loads(state.read_text())["step"] == 15
    assert json.loads((ws / "metrics/train.json").read_text())["train"]["steps"] == 15
    assert sorted(p.name for p in (ws / "checkpoints").iterdir()) == ["best", "state"]


@pytest.mark.parametrize("mode", ["save_file", "rename"])
def test_disk_full_while_saving_a_checkpoint_keeps_the_old_one(ws: Path, mode: str) -> None:
    before = snapshot(ws)
    proc = run(ws, "python", "-c", DISK_FULL + SAVE_AGAIN, extra_env={"DISK_FULL": mode})
    assert_clean_error(
        proc, "save", ("OSError", "No space left on device"), root=ws, before=before, code=1
    )
    # With space again, the next save succeeds and leaves nothing but the checkpoint behind.
    save_checkpoint(load_checkpoint(ws / CKPT), ws / CKPT, meta={"step": 99})
    assert json.loads((ws / CKPT / "gemma3.json").read_text())["step"] == 99
    assert sorted(p.name for p in (ws / "checkpoints").iterdir()) == ["best"]


def test_writer_killed_between_renames_then_disk_full_keeps_the_old_checkpoint(
    ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer SIGKILLed between its two renames left the checkpoint only as .best.old; the
    next save (here failing on a full disk) must bring it back under its name, not lose it."""
    model = load_checkpoint(ws / CKPT)
    before = snapshot(ws / CKPT)
    (ws / CKPT).rename(ws / "checkpoints/.best.old")

    def full(*args: Any, **kwargs: Any) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr(gemma3.hf, "save_file", full)
    with pytest.raises(OSError, match="No space left on device"):
        save_checkpoint(model, ws / CKPT, meta={"step": 99})
    assert snapshot(ws / CKPT) == before
    assert sorted(p.name for p in (ws / "checkpoints").iterdir()) == ["best"]


# ---------------------------------------------------------------------------------------------
# Warnings and designed non-errors: exit 0
# ---------------------------------------------------------------------------------------------

SHORT_TRAIN = {
    "max_steps": 2,
    "warmup_steps": 1,
    "eval_interval": 2,
    "eval_batches": 1,
    "log_interval": 1,
    "checkpoint_interval": 2,
}


def test_eval_interval_beyond_max_steps_is_one_warning(ws: Path) -> None:
    write_params(ws, train={**SHORT_TRAIN, "eval_interval": 10})
    proc = run(ws, "train")
    assert_one_warning(
        proc, "train.eval_interval (10) > train.max_steps (2)", "validation runs only at the end"
    )
    assert json.loads((ws / "metrics/train.json").read_text())["train"]["best_step"] == 2


def test_state_from_other_params_starts_a_new_run_never_mixing(ws: Path) -> None:
    write_params(ws, train=SHORT_TRAIN)
    training_state(OTHER_PRESET, same_fingerprint=False)(ws)
    proc = run(ws, "train")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    # The normal start of a new experiment: one notice, not a warning.
    (line,) = stderr_lines(proc.stderr)
    assert line == (
        "new params: training from step 0 (checkpoints/state holds another params' run, "
        "replaced at this run's first save)"
    )
    p = load_params(ws / "params.yaml")
    meta = json.loads((ws / "data/tokens/meta.json").read_text())
    info = json.loads((ws / STATE / "state.json").read_text())
    assert info["step"] == 2 and info["fingerprint"] == fingerprint(p, meta, 1)
    # Nothing of the other preset survived: every tensor has this config's shape.
    own = Gemma3ForCausalLM(p.model_config()).state_dict()
    saved = load_file(str(ws / STATE / "state.safetensors"))
    assert {k.removeprefix("model."): v.shape for k, v in saved.items() if k[:6] == "model."} == {
        k: v.shape for k, v in own.items() if k != "lm_head.weight"
    }
    best = json.loads((ws / CKPT / "config.json").read_text())
    assert best["hidden_size"] == p.model_config().emb_dim


def test_temperature_below_fp32_range_decodes_greedily_in_cli_and_stage(ws: Path) -> None:
    """`--temperature 1e-39` / `sample.temperature: 1e-39` used to end in a traceback
    (logits / 1e-39 overflowed to inf). Such a temperature is the greedy limit: the same text as
    temperature 0, from the CLI and from the sample stage."""
    flags = ("--model", CKPT, "--max-new-tokens", "6", "--no-stop", "--seed", "3")
    outs = [
        run(ws, "gemma3", "generate", "Once upon", *flags, "--temperature", t)
        for t in ("0", "1e-39")
    ]
    for proc in outs:
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert outs[1].stdout == outs[0].stdout

    completions = []
    for t in (0.0, 1e-39):
        write_params(ws, sample={"temperature": t, "max_new_tokens": 6, "stop_at_eot": False})
        proc = run(ws, "sample")
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        done = json.loads((ws / "samples/samples.json").read_text(encoding="utf-8"))["samples"]
        completions.append([s["completion"] for s in done])
    assert completions[1] == completions[0]


def test_symlink_in_data_source_leading_out_of_the_repository_is_one_warning(
    ws: Path, tmp_path: Path
) -> None:
    """The project's decision: followed (a DVC cache or a big disk elsewhere is a normal reason
    for such a link), but never silently: a cloned repository could point it at any file."""
    outside = tmp_path / "elsewhere" / "train.txt"
    outside.parent.mkdir()
    outside.write_text("Tom had a ball.\n<|endoftext|>\nSue had a cat.\n", encoding="utf-8")
    write("data/source/stories/validation.txt", "Max had a dog.\n")(ws)
    symlink("data/source/stories/train.txt", str(outside))(ws)
    write_params(ws, data={"source": "data/source/stories"})
    proc = run(ws, "download")
    line = assert_one_warning(proc, f"data/source/stories/train.txt is a symlink to {outside}")
    assert "outside the repository" in line
    raw = (ws / "data/raw/train.jsonl").read_text(encoding="utf-8")
    assert "Tom had a ball." in raw and "Sue had a cat." in raw


def test_empty_prompt_starts_a_new_story(ws: Path) -> None:
    """The project's decision: "" is not an error, the story starts from <|endoftext|>."""
    flags = ("--model", CKPT, "--max-new-tokens", "5", "--temperature", "0", "--no-stop")
    proc = run(ws, "gemma3", "generate", "", *flags)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = stderr_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("[5 tokens in "), proc.stderr
    new = generate(load_checkpoint(ws / CKPT), [[EOT_ID]], 5, temperature=0, stop_token=None)[0]
    assert proc.stdout == decode([t for t in new if t != EOT_ID]) + "\n"


# ---------------------------------------------------------------------------------------------
# The table's test (after the slow tests above, which xdist then starts first)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry,setup,needles,args,code",
    PARAMS_CASES + EVERY_STAGE_CASES + DATA_CASES + RESUME_CASES + CHECKPOINT_CASES + CLI_CASES,
)
def test_bad_input_fails_in_one_line_and_changes_nothing(
    ws: Path,
    entry: str,
    setup: Setup | None,
    needles: tuple[str, ...],
    args: tuple[str, ...],
    code: int,
) -> None:
    if setup is not None:
        setup(ws)
    before = snapshot(ws)
    proc = run(ws, entry, *args)
    assert_clean_error(proc, prog_of(entry), needles, root=ws, before=before, code=code)


def test_debug_env_brings_the_traceback_back(ws: Path) -> None:
    write_params(ws, train={"lr": 0})
    proc = run(ws, "download", extra_env={"GEMMA3_DEBUG": "1"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "Gemma3Error: params.yaml: train.lr" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_generate_on_cuda_without_a_gpu_names_the_flag(ws: Path) -> None:
    before = snapshot(ws)
    proc = run(ws, "gemma3", *gen("--device", "cuda"))
    needle = "--device: 'cuda' but no CUDA GPU is visible"
    assert_clean_error(proc, "gemma3", (needle,), root=ws, before=before)
