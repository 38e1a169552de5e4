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

HUB_SOURCE = "roneneldan/TinyStories"


@dataclass(frozen=True)
class SyntheticParams:
    n_train: int = 20_000
    n_val: int = 500


@dataclass(frozen=True)
class HubParams:
    repo_id: str = HUB_SOURCE
    revision: str = "main"


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
    num_threads: int = 2
    batch_stories: int = 1024


@dataclass(frozen=True)
class ModelParams:
    preset: str = "gemma3-small"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainParams:
    device: str = "auto"  # auto = cuda > mps > cpu
    max_steps: int = 300  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch (per process)
    block_size: int = 128
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 30  # optimizer steps of linear warmup
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    eval_interval: int = 50  # optimizer steps between validation passes
    eval_batches: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 100  # optimizer steps between resumable training states
    precision: str = "auto"  # auto (bf16 autocast on CUDA), fp32, bf16-autocast, bf16-pure (seed)
    compile: str = "auto"  # auto (on for CUDA), true, false
    tf32: bool = True
    fused_adamw: str = "auto"
    vocab_pad_multiple: int | str = "auto"  # 64 on CUDA (tensor cores), 1 elsewhere
    resume: bool = True  # continue from the last training state when params match


@dataclass(frozen=True)
class EvalParams:
    batch_size: int = 16
    block_size: int = 0  # 0 = train.block_size


@dataclass(frozen=True)
class SampleParams:
    prompts: list[str] = field(default_factory=lambda: ["Once upon a time"])
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 200
    top_p: float = 0.95
    seed: int = 1337
    stop_at_eot: bool = True


@dataclass(frozen=True)
class TrackingParams:
    enabled: bool = True
    experiment: str = "gemma3-tinystories"
    registered_model: str = "gemma3-tinystories"  # MLflow Model Registry name; "" = do not register


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
        if not _type_ok(value, tp):
            raise Gemma3Error(f"{file}: {prefix}.{key}: must be {_type_name(tp)}, got {value!r}")
        if tp is float:
            value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


def _check_values(p: Params, file: str) -> None:
    def err(key: str, msg: str) -> Gemma3Error:
        return Gemma3Error(f"{file}: {key}: {msg}")

    def positive(section: Any, name: str, key: str, allow_zero: bool = False) -> None:
        v = getattr(section, name)
        if isinstance(v, float) and not math.isfinite(v):
            raise err(key, f"must be finite, got {v}")
        if v < 0 or (v == 0 and not allow_zero):
            raise err(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {v}")

    d, t, e, s = p.data, p.train, p.eval, p.sample
    if not 0 < d.val_fraction < 1:
        raise err("data.val_fraction", f"must be between 0 and 1, got {d.val_fraction}")
    positive(d.synthetic, "n_train", "data.synthetic.n_train")
    positive(d.synthetic, "n_val", "data.synthetic.n_val")
    positive(p.tokenize, "num_threads", "tokenize.num_threads")
    positive(p.tokenize, "batch_stories", "tokenize.batch_stories")
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
        positive(t, name, f"train.{name}")
    for name in ("warmup_steps", "min_lr", "weight_decay", "grad_clip"):
        positive(t, name, f"train.{name}", allow_zero=True)
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(t, name) < 1:
            raise err(f"train.{name}", f"must be in [0, 1), got {getattr(t, name)}")
    if t.warmup_steps > t.max_steps:
        raise err(
            "train.warmup_steps", f"({t.warmup_steps}) exceeds train.max_steps ({t.max_steps})"
        )
    choices = {
        "device": ("auto", "cpu", "cuda", "mps"),
        "precision": ("auto", "fp32", "bf16-autocast", "bf16-pure"),
        "compile": ("auto", "true", "false"),
        "fused_adamw": ("auto", "true", "false"),
    }
    for name, allowed in choices.items():
        v = getattr(t, name)
        if v not in allowed and not (name == "device" and str(v).startswith("cuda:")):
            raise err(f"train.{name}", f"must be one of {', '.join(allowed)}, got {v!r}")
    if t.vocab_pad_multiple != "auto" and (
        not isinstance(t.vocab_pad_multiple, int) or t.vocab_pad_multiple < 1
    ):
        raise err(
            "train.vocab_pad_multiple",
            f"must be 'auto' or an integer >= 1, got {t.vocab_pad_multiple!r}",
        )
    positive(e, "batch_size", "eval.batch_size")
    positive(e, "block_size", "eval.block_size", allow_zero=True)
    if not s.prompts:
        raise err("sample.prompts", "must list at least one prompt")
    positive(s, "max_new_tokens", "sample.max_new_tokens", allow_zero=True)
    positive(s, "temperature", "sample.temperature", allow_zero=True)
    positive(s, "top_k", "sample.top_k")
    if not 0 < s.top_p <= 1:
        raise err("sample.top_p", f"must be in (0, 1], got {s.top_p}")

    cfg = p.model_config()  # validates the preset and overrides
    for key, block in (("train.block_size", t.block_size), ("eval.block_size", e.block_size)):
        if block > cfg.context_length:
            raise err(key, f"({block}) exceeds the model's context_length ({cfg.context_length})")


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
    if not path.is_file():
        raise Gemma3Error(f"{path}: not found; run from the repository root (where dvc.yaml is)")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=ParamsLoader)  # noqa: S506
    except yaml.YAMLError as e:
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
    return params
