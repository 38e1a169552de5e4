"""Hugging Face compatibility: config mapping, state-dict conversion, checkpoint directories.

Our module names already equal HF's `Gemma3ForCausalLM` keys, so conversion is only about the
things that differ in storage: a tied lm head (HF omits `lm_head.weight`) and vocab padding (HF
sees exactly `vocab_size` rows). A checkpoint directory is HF's layout (`config.json` +
`model.safetensors` + GPT-2 tokenizer files), so `from_pretrained(dir)` loads it as-is, plus a
small `gemma3.json` with our preset name and training metadata, a model card (`README.md` with
the Hub's metadata block) and a `generation_config.json` with the project's sampling defaults.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gemma3.config import FULL, SLIDING, Config, ConfigError
from gemma3.errors import Gemma3Error
from gemma3.fileio import (
    _UMASK,
    atomic_dir,
    atomic_write_json,
    is_regular_file,
    load_json_object,
    recover_dir,
)
from gemma3.model import Gemma3ForCausalLM
from gemma3.tokenizer import EOT_ID, write_hf_tokenizer_files

WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
META = "gemma3.json"
CARD = "README.md"
GENERATION_CONFIG = "generation_config.json"
# The project's sampling defaults: params.yaml's `sample` section (tests/test_hf_card.py holds
# them equal). Fixed here rather than read from params.yaml: the train stage does not depend on
# `sample`, so a checkpoint must not change with it.
SAMPLING = {"max_new_tokens": 160, "temperature": 0.8, "top_k": 200, "top_p": 0.95}
HUB_DATASET = "roneneldan/TinyStories"
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def to_hf_config(cfg: Config, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The `config.json` dict of a `Gemma3TextConfig` for this architecture (transformers 5.x)."""
    eot = EOT_ID if cfg.vocab_size > EOT_ID else None  # test vocabularies may be tiny
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.emb_dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.rms_norm_eps,
        "sliding_window": cfg.sliding_window,
        "layer_types": list(cfg.layer_types),
        "query_pre_attn_scalar": _int_if_integral(cfg.query_pre_attn_scalar),
        "rope_parameters": {
            SLIDING: {"rope_type": "default", "rope_theta": cfg.rope_local_base},
            FULL: {"rope_type": "default", "rope_theta": cfg.rope_base},
        },
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "use_bidirectional_attention": False,
        "initializer_range": 0.02,
        # No pad token: HF makes pad_token_id the embedding's padding_idx, which never gets a
        # gradient, and every id here is a real token (0 is "!", <|endoftext|> separates
        # stories). Batched HF generate pads with generation_config.json's pad_token_id.
        "pad_token_id": None,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _int_if_integral(x: float) -> float | int:
    """transformers types query_pre_attn_scalar as int; keep a real fraction if one is set."""
    return int(x) if float(x).is_integer() else x


# config.json keys -> Config fields; integers and numbers are type-checked here, under their
# config.json names, before Config validates the values (so messages name the file's key).
HF_INT_FIELDS = {
    "vocab_size": "vocab_size",
    "max_position_embeddings": "context_length",
    "hidden_size": "emb_dim",
    "num_attention_heads": "n_heads",
    "num_hidden_layers": "n_layers",
    "intermediate_size": "hidden_dim",
    "head_dim": "head_dim",
    "num_key_value_heads": "n_kv_heads",
    "sliding_window": "sliding_window",
}
HF_NAMES = {v: k for k, v in HF_INT_FIELDS.items()} | {
    "rope_local_base": "rope_parameters.sliding_attention.rope_theta",
    "rope_base": "rope_parameters.full_attention.rope_theta",
    "layer_types": "layer_types",
    "query_pre_attn_scalar": "query_pre_attn_scalar",
    "rms_norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "qk_norm": "qk_norm",
}


def _hf_int(d: dict[str, Any], key: str, default: Any = ...) -> int:
    v = d.get(key, default)
    if v is ...:
        raise Gemma3Error(f"config.json: missing field {key!r}")
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(HF_INT_FIELDS[key], f"must be an integer, got {_show(v)}")
    return v


def _hf_number(v: Any, field_name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(field_name, f"must be a number, got {_show(v)}")
    try:
        return float(v)
    except OverflowError:  # an integer beyond what a float holds
        raise ConfigError(field_name, f"must be a finite number, got {_show(v)}") from None


def _show(v: Any) -> str:
    """A value for an error message, cut short (a hostile file may hold a huge one)."""
    text = repr(v) if not isinstance(v, int) or abs(v) < 10**40 else f"a {len(str(v))}-digit number"
    return text if len(text) <= 60 else text[:57] + "..."


def _rope_theta(
    d: dict[str, Any], kind: str, legacy: str, default: float, field_name: str
) -> float:
    rope = d.get("rope_parameters") or {}
    entry = rope.get(kind, {}) if isinstance(rope, dict) else None
    if not isinstance(entry, dict):
        raise ConfigError(
            field_name, f"rope_parameters must map layer types to objects, got {_show(rope)}"
        )
    return _hf_number(entry.get("rope_theta", d.get(legacy, default)), field_name)


def from_hf_config(d: dict[str, Any], name: str = "custom", vocab_pad_multiple: int = 1) -> Config:
    """Our Config from a Gemma 3 text `config.json` dict (new rope_parameters or legacy keys).

    A ConfigError's `field` is ours (emb_dim); `load_config` names the file's key (hidden_size).
    """
    if not d.get("qk_norm", True):
        raise ConfigError("qk_norm", "Gemma 3 always uses QK-norm")
    ints = {
        HF_INT_FIELDS[k]: _hf_int(d, k) for k in HF_INT_FIELDS if k != "max_position_embeddings"
    }
    layer_types = d.get("layer_types", ...)
    if layer_types is ...:
        raise Gemma3Error("config.json: missing field 'layer_types'")
    if not isinstance(layer_types, list):
        raise ConfigError("layer_types", f"must be a list, got {_show(layer_types)}")
    if "query_pre_attn_scalar" not in d:
        raise Gemma3Error("config.json: missing field 'query_pre_attn_scalar'")
    tie = d.get("tie_word_embeddings", True)
    if not isinstance(tie, bool):
        raise ConfigError("tie_embeddings", f"must be true or false, got {_show(tie)}")
    return Config(
        name=name,
        context_length=_hf_int(d, "max_position_embeddings", 32768),
        rope_local_base=_rope_theta(
            d, SLIDING, "rope_local_base_freq", 10_000.0, "rope_local_base"
        ),
        rope_base=_rope_theta(d, FULL, "rope_theta", 1_000_000.0, "rope_base"),
        layer_types=tuple(layer_types),
        query_pre_attn_scalar=_hf_number(d["query_pre_attn_scalar"], "query_pre_attn_scalar"),
        rms_norm_eps=_hf_number(d.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        tie_embeddings=tie,
        vocab_pad_multiple=vocab_pad_multiple,
        **ints,
    )


def to_hf_state_dict(
    model: Gemma3ForCausalLM, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """HF-keyed tensors: vocab padding cropped, tied head omitted, contiguous, optional dtype."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            t = t[: cfg.vocab_size]
        t = t.detach()
        if dtype is not None:
            t = t.to(dtype)
        out[key] = t.contiguous().clone()
    return out


def load_hf_state_dict(
    model: Gemma3ForCausalLM, sd: dict[str, torch.Tensor], source: str = "weights"
) -> None:
    """Load HF-keyed tensors into our model, padding vocab rows; mismatches are one-line errors."""
    cfg = model.config
    own = model.state_dict()
    expected = set(own) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        n = len(missing) + len(unexpected)
        raise Gemma3Error(f"{source}: weights do not match the config ({what}, {n} key(s) differ)")
    with torch.no_grad():
        for key in sorted(expected):  # sorted: the same key is named on every run
            t, target = sd[key], own[key]
            if (
                key in ("model.embed_tokens.weight", "lm_head.weight")
                and t.shape[0] != target.shape[0]
            ):
                if t.shape[0] != cfg.vocab_size or t.shape[1:] != target.shape[1:]:
                    raise Gemma3Error(
                        f"{source}: {key} has shape {tuple(t.shape)}, config expects "
                        f"({cfg.vocab_size}, {cfg.emb_dim})"
                    )
                padded = torch.zeros_like(target)
                padded[: cfg.vocab_size] = t
                t = padded
            if t.shape != target.shape:
                raise Gemma3Error(
                    f"{source}: {key} has shape {tuple(t.shape)}, config expects {tuple(target.shape)}"
                )
            target.copy_(t.to(target.dtype))


def to_transformers(model: Gemma3ForCausalLM) -> Any:
    """A `transformers.Gemma3ForCausalLM` with our weights (needs the `hf` extra)."""
    from transformers import Gemma3ForCausalLM as HFModel
    from transformers import Gemma3TextConfig

    hf_cfg = to_hf_config(model.config)
    hf_cfg.pop("architectures"), hf_cfg.pop("model_type"), hf_cfg.pop("dtype")
    hf = HFModel(Gemma3TextConfig(**hf_cfg)).eval()
    result = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    # Only the tied head may be absent (HF ties it below); anything else is a mapping bug.
    allowed_missing = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if set(result.missing_keys) - allowed_missing or result.unexpected_keys:
        raise Gemma3Error(
            f"transformers model does not match ours: missing {sorted(result.missing_keys)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    if model.config.tie_embeddings:
        hf.tie_weights()
    return hf


def from_transformers(hf_model: Any, vocab_pad_multiple: int = 1) -> Gemma3ForCausalLM:
    """Our model from a `transformers.Gemma3ForCausalLM` (its config and weights)."""
    cfg = from_hf_config(hf_model.config.to_dict(), vocab_pad_multiple=vocab_pad_multiple)
    model = Gemma3ForCausalLM(cfg)
    sd = {
        k: v
        for k, v in hf_model.state_dict().items()
        if not (cfg.tie_embeddings and k == "lm_head.weight")
    }
    load_hf_state_dict(model, sd, source="transformers model")
    return model


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """`save_file`, but a write failure (a full disk) is an OSError like any other file write.

    safetensors reports I/O errors as SafetensorError, which would otherwise print a traceback.
    """
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        raise OSError(f"{path}: cannot write ({e}); check the free disk space") from None
    os.chmod(path, 0o666 & ~_UMASK)  # save_file creates 0600 whatever the umask: teammates read it


def save_checkpoint(
    model: Gemma3ForCausalLM,
    directory: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write an HF-layout checkpoint directory atomically (a crash leaves the old one intact)."""
    directory = Path(directory)
    cfg = model.config
    sd = to_hf_state_dict(model, dtype)
    store_dtype = dtype or next(iter(sd.values())).dtype
    with atomic_dir(directory) as tmp:
        write_safetensors({k: v.cpu() for k, v in sd.items()}, tmp / WEIGHTS, {"format": "pt"})
        atomic_write_json(tmp / HF_CONFIG, to_hf_config(cfg, store_dtype))
        atomic_write_json(tmp / GENERATION_CONFIG, generation_config())
        write_hf_tokenizer_files(tmp, cfg.context_length)
        card = model_card(cfg, meta or {}, store_dtype).encode()
        (tmp / CARD).write_bytes(card)
        info = {"preset": cfg.name, "config": cfg.to_dict(), **(meta or {})}
        # export-hf replaces a previous export only while its card is the one written here.
        info["card_sha256"] = hashlib.sha256(card).hexdigest()
        atomic_write_json(tmp / META, info)
    return directory


def generation_config() -> dict[str, Any]:
    """`generation_config.json`: transformers' `generate()` samples as the sample stage does."""
    ids = {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID}
    return {**ids, "do_sample": True, **SAMPLING}


def _yaml(value: Any, indent: int = 0) -> str:
    """A YAML block for dicts, lists and JSON scalars (JSON scalars are YAML), without pyyaml."""
    pad = " " * indent
    if isinstance(value, dict):
        lines = []
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{k}:\n{_yaml(v, indent + 2)}")
            else:
                lines.append(f"{pad}{k}: {json.dumps(v)}")
        return "\n".join(lines)
    items = []
    for v in value:
        if isinstance(v, (dict, list)) and v:
            block = _yaml(v, indent + 2)
            items.append(f"{pad}- {block[indent + 2 :]}")  # the first key on the dash's line
        else:
            items.append(f"{pad}- {json.dumps(v)}")
    return "\n".join(items)


def _data_description(source: Any) -> tuple[str, dict[str, str], list[str]]:
    """(what the card says the data was, the model-index dataset, the Hub dataset ids)."""
    kind = source.get("source") if isinstance(source, dict) else None
    if kind == "hub":
        repo = source.get("repo_id", HUB_DATASET)
        rev = str(source.get("commit") or source.get("revision") or "")[:12]
        what = f"[{repo}](https://huggingface.co/datasets/{repo}) at revision `{rev}`"
        return what, {"name": "TinyStories", "type": repo}, [repo]
    if kind == "local":
        what = f"a local file of TinyStories-style stories (`{source.get('path')}`)"
        return what, {"name": "Local stories", "type": "local"}, []
    what = "synthetic TinyStories-style stories generated by the project (seeded, offline)"
    return what, {"name": "Synthetic stories", "type": "synthetic"}, []


def model_card(cfg: Config, meta: dict[str, Any], dtype: torch.dtype) -> str:
    """`README.md` of a checkpoint: the Hub's metadata block, the result, training params, usage."""
    val, step = meta.get("val_loss"), meta.get("step")
    data, dataset, hub_ids = _data_description((meta.get("data") or {}).get("source"))
    front: dict[str, Any] = {
        "license": "apache-2.0",
        "language": ["en"],
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["gemma3", "tinystories", "text-generation", "from-scratch", "safetensors"],
    }
    if hub_ids:
        front["datasets"] = hub_ids
    if val is not None:
        metric = {"type": "loss", "value": round(float(val), 4), "name": "Validation loss"}
        dataset = {**dataset, "split": "validation"}
        task = {"type": "text-generation", "name": "Text Generation"}
        result = {"task": task, "dataset": dataset, "metrics": [metric]}
        front["model-index"] = [{"name": "gemma3-tinystories", "results": [result]}]
    n = cfg.param_counts()["total"]
    lines = [
        "---", _yaml(front), "---", "", "# gemma3-tinystories", "",
        f"A Gemma 3 text model (`{cfg.name}`: {n:,} parameters, {cfg.n_layers} layers, "
        f"d={cfg.emb_dim}, context {cfg.context_length:,}) trained from scratch on {data}, with "
        "the GPT-2 tokenizer (50,257 tokens; `<|endoftext|>` separates stories). "
        f"Weights stored as {str(dtype).removeprefix('torch.')} safetensors.", "",
    ]  # fmt: skip
    if val is not None:
        lines += [
            f"**Validation loss {float(val):.4f}** nats/token (perplexity "
            f"{math.exp(float(val)):.2f}) at optimizer step {step}, on the fixed validation "
            "batches used to pick this best checkpoint.", "",
        ]  # fmt: skip
    training = meta.get("training") or {}
    if training:
        lines += ["## Training", "", "| param | value |", "| --- | --- |"]
        lines += [f"| `{k}` | {v} |" for k, v in training.items()] + [""]
    if meta.get("mlflow_run_id"):
        lines += [f"MLflow run: `{meta['mlflow_run_id']}`.", ""]
    return "\n".join(lines + _usage()) + "\n"


def _usage() -> list[str]:
    s = SAMPLING
    kw = f"temperature={s['temperature']}, top_k={s['top_k']}, top_p={s['top_p']}"
    return [
        "## How to load", "",
        "With `transformers` (`generation_config.json` holds the sampling defaults: "
        f"{kw}, max_new_tokens={s['max_new_tokens']}):", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'path = "path/to/this/folder"',
        "tokenizer = AutoTokenizer.from_pretrained(path)  # GPT-2's BPE",
        "model = AutoModelForCausalLM.from_pretrained(path)",
        'ids = tokenizer("Once upon a time", return_tensors="pt").input_ids',
        "print(tokenizer.decode(model.generate(ids)[0]))",
        "```", "",
        "The ids are GPT-2's, so `tiktoken.get_encoding(\"gpt2\")` encodes and decodes them too. "
        "With the `gemma3` library (`pip install gemma3-tinystories`; needs only torch, tiktoken, "
        "safetensors and numpy):", "",
        "```python",
        "from gemma3 import generate, load_checkpoint",
        "from gemma3.tokenizer import decode, encode",
        "",
        'model = load_checkpoint("path/to/this/folder")',
        f'new = generate(model, [encode("Once upon a time")], {s["max_new_tokens"]}, {kw})[0]',
        "print(decode(new))",
        "```",
    ]  # fmt: skip


# gemma3.json fields the stages and the CLI read, with the types they need.
META_TYPES = {"step": int, "val_loss": (int, float), "mlflow_run_id": str, "preset": str}


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """gemma3.json ({} when absent: an HF checkpoint has none); a wrong shape is one line."""
    path = Path(directory) / META
    if not is_regular_file(path):
        return {}
    meta = load_json_object(path, "re-save the checkpoint or delete gemma3.json")
    for key, types in META_TYPES.items():
        v = meta.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, types)):
            want = "a string" if types is str else "a number"
            raise Gemma3Error(f"{path}: {key}: must be {want} or null, got {_show(v)}")
    return meta


def load_config(directory: str | os.PathLike[str], vocab_pad_multiple: int = 1) -> Config:
    directory = Path(directory)
    recover_dir(directory)  # a save killed between its two renames left it as .<name>.old
    if not directory.is_dir():
        if directory.exists():
            raise Gemma3Error(f"{directory}: not a directory; give a checkpoint directory")
        raise Gemma3Error(
            f"{directory}: checkpoint directory not found (train first, or dvc pull it)"
        )
    path = directory / HF_CONFIG
    if not is_regular_file(path):
        raise Gemma3Error(f"{path}: missing; not a checkpoint directory")
    d = load_json_object(path)
    name = read_meta(directory).get("preset", "custom")
    try:
        return from_hf_config(d, name=name, vocab_pad_multiple=vocab_pad_multiple)
    except ConfigError as e:  # name the file's key: "config.json: hidden_size: must be ..."
        message = str(e).split(": ", 1)[1]
        raise Gemma3Error(f"{path}: {HF_NAMES.get(e.field, e.field)}: {message}") from None
    except Gemma3Error as e:  # "config.json: missing field 'vocab_size'"
        raise Gemma3Error(f"{path}: {str(e).removeprefix(HF_CONFIG + ': ')}") from None


def load_checkpoint(
    directory: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    vocab_pad_multiple: int = 1,
) -> Gemma3ForCausalLM:
    """Load a checkpoint directory (ours or one written by HF `save_pretrained`); no pickle."""
    directory = Path(directory)
    cfg = load_config(directory, vocab_pad_multiple)
    weights = directory / WEIGHTS
    if not is_regular_file(weights):
        raise Gemma3Error(
            f"{weights}: missing; the checkpoint is incomplete (re-run training or dvc pull)"
        )
    check_weights_header(cfg, weights)  # names, shapes, dtypes: before anything is allocated
    check_fits_in_memory(cfg, weights)
    try:
        sd = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise Gemma3Error(f"{weights}: unreadable or truncated safetensors file ({e})") from None
    check_finite(sd, weights)
    try:
        model = Gemma3ForCausalLM(cfg)
    except RuntimeError as e:  # torch reports a failed allocation as RuntimeError, not MemoryError
        if "memory" not in str(e).lower():
            raise
        raise Gemma3Error(_too_big(cfg, weights, "torch could not allocate it")) from None
    load_hf_state_dict(model, sd, source=str(weights))
    model = model.to(device=device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Checks on a checkpoint before and after its weights are read (each a one-line Gemma3Error)
# ---------------------------------------------------------------------------------------------

# What a checkpoint may store. float16 is refused rather than cast: Gemma 3's activations overflow
# float16, and a silent cast would hide an integer or half-precision file that is not ours.
WEIGHT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16}
_DTYPE_NAMES = {"F16": "float16", "F64": "float64", "I64": "int64", "I32": "int32", "I8": "int8"}


def check_weights_header(cfg: Config, weights: Path) -> None:
    """Tensor names, shapes and dtypes from the safetensors header against `cfg`, on the meta
    device: a config.json asking for a huge model fails here without allocating it."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            names = f.keys()
            header = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in names}
    except (SafetensorError, OSError, ValueError) as e:
        raise Gemma3Error(f"{weights}: unreadable or truncated safetensors file ({e})") from None
    for key in sorted(header):
        dtype = header[key][0]
        if dtype not in WEIGHT_DTYPES:
            name = _DTYPE_NAMES.get(dtype, dtype)
            raise Gemma3Error(
                f"{weights}: {key} is {name}; checkpoints hold float32 or bfloat16 weights "
                "(a float16 or integer file is refused, not cast: convert it to float32 or bfloat16)"
            )
    _check_layer_count(cfg, weights, header)
    try:
        with torch.device("meta"):
            meta_model = Gemma3ForCausalLM(cfg)
            meta_sd = {
                k: torch.empty(shape, dtype=WEIGHT_DTYPES[dtype])
                for k, (dtype, shape) in header.items()
            }
    except RuntimeError as e:  # sizes whose byte count overflows int64 (hidden_size 2**62)
        if "overflow" not in str(e):
            raise
        raise Gemma3Error(_too_big(cfg, weights, "no machine can hold it")) from None
    load_hf_state_dict(meta_model, meta_sd, source=str(weights))


def _check_layer_count(cfg: Config, weights: Path, header: dict[str, Any]) -> None:
    """A config.json asking for more layers than the file holds fails before a meta model of a
    million layers is built (minutes of Python objects) just to say so."""
    found = {k.split(".")[2] for k in header if k.startswith("model.layers.")}
    n_file = len(found)
    if cfg.n_layers > n_file:
        raise Gemma3Error(
            f"{weights}: holds {n_file} layers, but {weights.parent / HF_CONFIG} has "
            f"num_hidden_layers {cfg.n_layers}; config.json and the weights come from different "
            "models"
        )


def _available_memory() -> int | None:
    """Bytes of RAM a new allocation can get now (Linux MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes a new allocation on `device` can get now: free CUDA memory on a GPU, else RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):
            return None
    return _available_memory()


def _too_big(cfg: Config, weights: Path, why: str) -> str:
    n = cfg.param_counts()["total"]
    return (
        f"{weights.parent / HF_CONFIG}: the model it describes has {n:,} parameters "
        f"(hidden_size {cfg.emb_dim}, intermediate_size {cfg.hidden_dim}, "
        f"{cfg.n_layers} layers: {4 * n / 1e9:,.1f} GB in float32); {why}"
    )


def check_fits_in_memory(cfg: Config, weights: Path) -> None:
    """The float32 model plus the file's tensors must fit in the RAM available now."""
    n = cfg.param_counts()["stored"]
    need = 4 * n + weights.stat().st_size
    free = _available_memory()
    if free is not None and need > free:
        raise Gemma3Error(
            _too_big(cfg, weights, f"loading it needs about {need / 1e9:,.1f} GB, "
                     f"more than the {free / 1e9:,.1f} GB of memory available")
        )  # fmt: skip


# Training memory per parameter, in units of the weights' dtype size: the weights, their
# gradients and AdamW's two moments (both kept in the parameter's dtype by torch).
TRAIN_COPIES = 4


def check_trainable(cfg: Config, device: torch.device, weight_dtype: torch.dtype) -> None:
    """Refuse, from arithmetic on the config alone, a model whose training state cannot fit on
    `device`: parameters (stored, vocab padding included) x 4 copies (weights, gradients, two
    AdamW moments) x the weights' bytes. Activations come on top, so passing is necessary, not
    sufficient; failing is certain, and takes milliseconds instead of minutes of allocating."""
    n = cfg.param_counts()["stored"]
    per_param = TRAIN_COPIES * weight_dtype.itemsize
    need, free = n * per_param, available_memory(device)
    if free is not None and need > free:
        raise Gemma3Error(
            f"params.yaml: model: {n:,} parameters need {need / 2**30:,.1f} GiB to train "
            f"({per_param} bytes each: weights, gradients and two AdamW moments; activations "
            f"come on top), more than the {free / 2**30:,.1f} GiB free on {device}; "
            "use a smaller model (model.preset / model.overrides)"
        )


def check_finite(sd: dict[str, torch.Tensor], weights: Path) -> None:
    """NaN/Inf weights (a diverged or corrupted run) would generate '!!!!' without an error."""
    for key in sorted(sd):
        bad = int((~torch.isfinite(sd[key])).sum())
        if bad:
            raise Gemma3Error(
                f"{weights}: {key} has {bad:,} NaN/Inf value(s); the checkpoint is corrupt "
                "(a diverged run?): retrain, or dvc pull / dvc checkout checkpoints/best"
            )
