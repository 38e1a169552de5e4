"""params.yaml as typed dataclasses, validated up front.

Every stage reads params.yaml through `load_params`, so a typo, a wrong type or an impossible
value fails before any work starts, in one line naming the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gemma3.config import Config, ConfigError
from gemma3.errors import Gemma3Error
from gemma3.fileio import is_regular_file

HUB_SOURCE = "roneneldan/TinyStories"
# The TinyStories commit whose parquet files match the pins in gemma3/data/hub.py (REFERENCE.md 3).
PINNED_REVISION = "7dfb18bd830e361f237a94bcdb466bc6e7b09050"
# train.precision: resolved per machine by gemma3.runtime.resolve_precision.
PRECISIONS = ("auto", "fp32", "bf16-autocast", "bf16-pure")
# sample.dtype: auto = train.precision's policy; int8 = int8 linear layers (CPU only, gemma3.quant).
SAMPLE_DTYPES = ("auto", "fp32", "bf16", "int8")


@dataclass(frozen=True)
class SyntheticParams:
    n_train: int = 20_000
    n_val: int = 300


@dataclass(frozen=True)
class HubParams:
    repo_id: str = HUB_SOURCE
    revision: str = PINNED_REVISION  # a commit: "main" would move under you
    verify: bool = True  # refuse files without a pinned or listed sha256


@dataclass(frozen=True)
class DataParams:
    # "synthetic" (made here, offline), "roneneldan/TinyStories" (the Hub), or a local path.
    source: str = "synthetic"
    val_fraction: float = 0.01
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)
    hub: HubParams = field(default_factory=HubParams)


@dataclass(frozen=True)
class TokenizeParams:
    eot: bool = True  # <|endoftext|> after every story; the seed had none (false = seed behaviour)
    num_proc: int = 2  # processes for datasets.map
    batch_stories: int = 1024


@dataclass(frozen=True)
class ModelParams:
    preset: str = "gemma3-small"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainParams:
    device: str = "auto"  # auto = cuda > mps > cpu
    max_steps: int = 150  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch (per process)
    block_size: int = 128
    grad_accum: int = 1  # micro-batches per optimizer step
    # Sequences per forward/backward pass: any divisor of batch_size x grad_accum gives the same
    # optimizer step on the same rows (only rounding differs). auto = batch_size on CPU/MPS; on
    # CUDA the largest divisor with micro_batch x block_size <= 32,768 tokens (the seed's 32 x 32
    # accumulation runs as 256 x 4), never below batch_size.
    micro_batch: int | str = "auto"
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 15  # optimizer steps of linear warmup
    warmup_start_factor: float = 0.0  # first warmup step's lr = lr * (f + (1 - f) / warmup_steps)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    eval_interval: int = 50  # optimizer steps between validation passes
    eval_batches: int = 8
    # Sequences per validation forward pass (the rows validated stay eval_batches x batch_size).
    # auto = batch_size on CPU/MPS; on CUDA the largest divisor of those rows <= 2 x micro_batch.
    eval_batch_size: int | str = "auto"
    log_interval: int = 10
    checkpoint_interval: int = 50  # optimizer steps between resumable training states
    # auto = bf16 autocast on CUDA and on CPUs with native bf16, else fp32; fp32, bf16-autocast,
    # bf16-pure (the seed's bf16 weights)
    precision: str = "auto"
    compile: bool | str = "auto"  # auto (on for CUDA), true, false
    tf32: bool = True
    fused_adamw: bool | str = "auto"  # auto (on where torch has a fused kernel), true, false
    vocab_pad_multiple: int | str = "auto"  # 64 on CUDA (tensor cores), 1 elsewhere
    resume: bool = True  # continue from the last training state when params match


@dataclass(frozen=True)
class EvalParams:
    batch_size: int = 16
    block_size: int = 0  # 0 = train.block_size


@dataclass(frozen=True)
class SampleParams:
    prompts: list[str] = field(
        default_factory=lambda: [
            "Once upon a time",
            "One day, a little girl named Lily",
            "The dog was sad because",
        ]
    )
    max_new_tokens: int = 160
    temperature: float = 0.8
    top_k: int = 200
    top_p: float = 0.95
    seed: int = 1337
    stop_at_eot: bool = True
    dtype: str = "auto"


@dataclass(frozen=True)
class TrackingParams:
    enabled: bool = True
    experiment: str = "gemma3-tinystories"
    registered_model: str = "gemma3-tinystories"  # MLflow Model Registry name; "" = do not register
    system_metrics: bool = True  # CPU, memory (and GPU with nvidia-ml-py) use, logged by MLflow


@dataclass(frozen=True)
class Params:
    seed: int = 1337
    data: DataParams = field(default_factory=DataParams)
    tokenize: TokenizeParams = field(default_factory=TokenizeParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    eval: EvalParams = field(default_factory=EvalParams)
    sample: SampleParams = field(default_factory=SampleParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)

    def model_config(self, vocab_pad_multiple: int = 1) -> Config:
        try:
            return Config.from_name(
                self.model.preset,
                **{"vocab_pad_multiple": vocab_pad_multiple, **self.model.overrides},
            )
        except TypeError:  # an override that names a from_name argument ("name")
            raise Gemma3Error(_bad_override(self.model.overrides)) from None
        except ConfigError as e:
            field_name = "preset" if e.field == "preset" else f"overrides.{e.field}"
            raise Gemma3Error(
                f"params.yaml: model.{field_name}: {str(e).split(': ', 1)[1]}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


REQUIRED_SECTIONS = ("seed", "data", "tokenize", "model", "train", "eval", "sample")


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, tp)


SWITCH_WORDS = {"true": True, "false": False}


def _switch(value: Any, tp: Any) -> Any:
    """ "true"/"false" (any case) as booleans where a setting takes true/false.

    YAML reads `true` as a boolean and `'true'` as a string; `dvc exp run -S x=true` writes the
    former. A user means the same by both, so both are accepted.
    """
    accepts_bool = tp is bool or bool in typing.get_args(tp)
    if accepts_bool and isinstance(value, str) and value.lower() in SWITCH_WORDS:
        return SWITCH_WORDS[value.lower()]
    return value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _build(cls: type, raw: Any, prefix: str, file: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise Gemma3Error(f"{file}: {prefix} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = (
                f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(fields)})"
            )
            raise Gemma3Error(f"{file}: {prefix}.{key}: unknown key{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}.{key}", file)
            continue
        value = _switch(value, tp)
        if not _type_ok(value, tp):
            raise Gemma3Error(f"{file}: {prefix}.{key}: must be {_type_name(tp)}, got {value!r}")
        if tp is float:
            value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


def _err(file: str, key: str, msg: str) -> Gemma3Error:
    return Gemma3Error(f"{file}: {key}: {msg}")


def _positive(file: str, section: Any, name: str, key: str, allow_zero: bool = False) -> None:
    v = getattr(section, name)
    if isinstance(v, float) and not math.isfinite(v):
        raise _err(file, key, f"must be finite, got {v}")
    if v < 0 or (v == 0 and not allow_zero):
        raise _err(file, key, f"must be {'>= 0' if allow_zero else '> 0'}, got {v}")


def _check_values(p: Params, file: str) -> None:
    _check_data(p, file)
    _check_train(p.train, file)
    _check_eval_sample(p, file)
    cfg = p.model_config()  # validates the preset and overrides
    for key, block in (
        ("train.block_size", p.train.block_size),
        ("eval.block_size", p.eval.block_size),
    ):
        if block > cfg.context_length:
            raise _err(
                file, key, f"({block}) exceeds the model's context_length ({cfg.context_length})"
            )


def _check_data(p: Params, file: str) -> None:
    d = p.data
    if not 0 < d.val_fraction < 1:
        raise _err(file, "data.val_fraction", f"must be between 0 and 1, got {d.val_fraction}")
    _positive(file, d.synthetic, "n_train", "data.synthetic.n_train")
    _positive(file, d.synthetic, "n_val", "data.synthetic.n_val")
    if not d.source.strip():
        raise _err(file, "data.source", "must name synthetic, a Hub repo or a local path, got ''")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", d.hub.repo_id):
        raise _err(file, "data.hub.repo_id", f"must look like owner/name, got {d.hub.repo_id!r}")
    if not re.fullmatch(r"[\w./-]+", d.hub.revision) or ".." in d.hub.revision:
        raise _err(
            file, "data.hub.revision", f"must be a commit, branch or tag, got {d.hub.revision!r}"
        )
    _positive(file, p.tokenize, "num_proc", "tokenize.num_proc")
    if p.tokenize.num_proc > 256:
        raise _err(file, "tokenize.num_proc", f"must be at most 256, got {p.tokenize.num_proc}")
    _positive(file, p.tokenize, "batch_stories", "tokenize.batch_stories")


def _check_train(t: TrainParams, file: str) -> None:
    for name in (
        "max_steps",
        "batch_size",
        "block_size",
        "grad_accum",
        "eval_interval",
        "eval_batches",
        "log_interval",
        "checkpoint_interval",
        "lr",
        "eps",
    ):
        _positive(file, t, name, f"train.{name}")
    for name in ("warmup_steps", "min_lr", "weight_decay", "grad_clip"):
        _positive(file, t, name, f"train.{name}", allow_zero=True)
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(t, name) < 1:
            raise _err(file, f"train.{name}", f"must be in [0, 1), got {getattr(t, name)}")
    if t.warmup_steps > t.max_steps:
        raise _err(
            file,
            "train.warmup_steps",
            f"({t.warmup_steps}) exceeds train.max_steps ({t.max_steps})",
        )
    if not 0 <= t.warmup_start_factor <= 1:
        raise _err(
            file,
            "train.warmup_start_factor",
            f"must be between 0 and 1, got {t.warmup_start_factor}",
        )
    choices = {
        "device": ("auto", "cpu", "cuda", "mps"),
        "precision": PRECISIONS,
        "compile": ("auto", True, False),
        "fused_adamw": ("auto", True, False),
    }
    for name, allowed in choices.items():
        v = getattr(t, name)
        if v not in allowed and not (name == "device" and str(v).startswith("cuda:")):
            words = ", ".join(str(a).lower() for a in allowed)
            hint = "; int8 is for generation only (sample.dtype)" if v == "int8" else ""
            raise _err(file, f"train.{name}", f"must be one of {words}, got {v!r}{hint}")
    rows = t.batch_size * t.grad_accum
    _auto_or_int(
        file,
        "train.micro_batch",
        t.micro_batch,
        rows,
        f"dividing train.batch_size x train.grad_accum ({rows})",
    )
    _auto_or_int(file, "train.eval_batch_size", t.eval_batch_size, None, ">= 1")
    _auto_or_int(file, "train.vocab_pad_multiple", t.vocab_pad_multiple, None, ">= 1")


def _auto_or_int(file: str, key: str, v: Any, dividing: int | None, what: str) -> None:
    """`auto`, or a positive integer (that divides `dividing`, when given). Types are checked
    before this, on load."""
    if v == "auto":
        return
    if not isinstance(v, int) or v < 1 or (dividing is not None and dividing % v):
        raise _err(file, key, f"must be auto or an integer {what}, got {v!r}")


def _check_eval_sample(p: Params, file: str) -> None:
    e, s = p.eval, p.sample
    _positive(file, e, "batch_size", "eval.batch_size")
    _positive(file, e, "block_size", "eval.block_size", allow_zero=True)
    if not s.prompts:
        raise _err(file, "sample.prompts", "must list at least one prompt")
    _positive(file, s, "max_new_tokens", "sample.max_new_tokens", allow_zero=True)
    _positive(file, s, "temperature", "sample.temperature", allow_zero=True)
    _positive(file, s, "top_k", "sample.top_k")
    if not 0 < s.top_p <= 1:
        raise _err(file, "sample.top_p", f"must be in (0, 1], got {s.top_p}")
    if s.dtype not in SAMPLE_DTYPES:
        raise _err(
            file, "sample.dtype", f"must be one of {', '.join(SAMPLE_DTYPES)}, got {s.dtype!r}"
        )


class ParamsLoader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as `1e-09`.

    `dvc exp run -S train.eps=1e-9` writes `eps: 1e-09`, which PyYAML's YAML 1.1 rules would
    read as the string '1e-09'.
    """


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_params(
    path: str | Path = "params.yaml", sections: tuple[str, ...] = REQUIRED_SECTIONS
) -> Params:
    """Parse and validate params.yaml; `sections` must be present (others fall back to defaults)."""
    path = Path(path)
    if not is_regular_file(path):
        raise Gemma3Error(f"{path}: not found; run from the repository root (where dvc.yaml is)")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=ParamsLoader)  # noqa: S506
    except DuplicateKeyError as e:
        raise Gemma3Error(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise Gemma3Error(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except UnicodeDecodeError as e:
        raise Gemma3Error(_not_utf8(path, e)) from None
    except RecursionError:  # `a: [[[[...` thousands deep: PyYAML recurses once per level
        raise Gemma3Error(f"{path}: not valid YAML (nested too deeply to read)") from None
    except ValueError as e:  # an integer of more than 4300 digits (Python's int() limit)
        raise Gemma3Error(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise Gemma3Error(f"{path}: must be a mapping of sections ({', '.join(REQUIRED_SECTIONS)})")
    for section in sections:
        if section not in raw:
            raise Gemma3Error(f"{path}: missing section '{section}'")
    hints = typing.get_type_hints(Params)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), hints, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise Gemma3Error(f"{path}: {key}: unknown section{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, key, str(path))
        elif not _type_ok(value, tp):
            raise Gemma3Error(f"{path}: {key}: must be {_type_name(tp)}, got {value!r}")
        else:
            kwargs[key] = value
    params = Params(**kwargs)
    _check_values(params, str(path))
    check_ranges(params, str(path))
    return params


# ---------------------------------------------------------------------------------------------
# Checks that need more than one field (a hostile run found each as a traceback or a late failure)
# ---------------------------------------------------------------------------------------------

# Seeds feed torch.manual_seed, numpy's default_rng and random.Random; an unsigned 32-bit range
# is valid for all of them (also with the sample stage's `sample.seed + i` per prompt).
MAX_SEED = 2**32 - 1


def _bad_override(overrides: dict[str, Any]) -> str:
    """`model.overrides` naming an argument of `Config.from_name` itself (only `name` today)."""
    key = "name" if "name" in overrides else next(iter(overrides), "?")
    return (
        f"params.yaml: model.overrides.{key}: cannot be overridden "
        "(the preset names the model; choose it with model.preset)"
    )


def check_ranges(p: Params, file: str) -> None:
    """Whole-file checks every stage runs up front, so the first stage that runs fails instead
    of a late one (under `dvc repro`, after earlier stages already replaced their outputs)."""
    for key, seed in (("seed", p.seed), ("sample.seed", p.sample.seed)):
        if not 0 <= seed <= MAX_SEED:
            raise Gemma3Error(f"{file}: {key}: must be an integer in [0, {MAX_SEED}], got {seed}")
    check_prompt_lengths(p.sample.prompts, p.model_config().context_length, file)


def check_prompt_lengths(prompts: list[str], context_length: int, file: str) -> None:
    """`sample.prompts` must leave room for one new token in the model's context.

    GPT-2 BPE gives at most one token per UTF-8 byte, so only prompts at least `context_length`
    bytes long are encoded (the tokenizer costs a fraction of a second to load).
    """
    for i, prompt in enumerate(prompts):
        try:
            n_bytes = len(prompt.encode("utf-8"))
        except UnicodeEncodeError as e:  # "\ud800" in YAML: no text, and samples.md cannot hold it
            raise Gemma3Error(
                f"{file}: sample.prompts[{i}]: {prompt[e.start]!r} at character {e.start} is a "
                "lone UTF-16 surrogate, not a character; remove it"
            ) from None
        if n_bytes < context_length:
            continue
        from gemma3.tokenizer import encode

        n = len(encode(prompt))
        if n >= context_length:
            raise Gemma3Error(
                f"{file}: sample.prompts[{i}]: prompt has {n} tokens; the model's context_length "
                f"is {context_length} (shorten the prompt or raise model.overrides.context_length)"
            )


def _not_utf8(path: Path, e: UnicodeDecodeError) -> str:
    line = e.object[: e.start].count(b"\n") + 1
    return (
        f"{path}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} on line {line}); save it as UTF-8"
    )


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one mapping of params.yaml."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    """A mapping that refuses a key given twice: YAML keeps the last, silently dropping the first."""
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, typing.Hashable) and key in seen:
            raise DuplicateKeyError(
                f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first on line "
                f"{seen[key] + 1}); YAML would silently keep the last one, so delete one"
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=True)


ParamsLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def check_token_counts(p: Params, tokens: dict[str, int], where: str) -> None:
    """The tokenize stage's check that the train stage will find enough tokens for one batch and
    one validation window; it runs before the new tokens replace the old ones."""
    t = p.train
    need = {"train": t.batch_size * t.block_size + 1, "validation": t.block_size + 1}
    for split, n_min in need.items():
        n = tokens[split]
        if n < n_min:
            what = (
                f"one batch (train.batch_size {t.batch_size} x train.block_size {t.block_size}) + 1"
                if split == "train"
                else f"one window (train.block_size {t.block_size}) + 1"
            )
            raise Gemma3Error(
                f"{where}/{split}.bin: {n:,} tokens is fewer than {what} = {n_min:,}; "
                "use more data or a smaller batch/block"
            )
