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
from gemma3.fileio import _UMASK, atomic_dir, atomic_write_json, recover_dir
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


def from_hf_config(d: dict[str, Any], name: str = "custom", vocab_pad_multiple: int = 1) -> Config:
    """Our Config from a Gemma 3 text `config.json` dict (new rope_parameters or legacy keys)."""
    if not d.get("qk_norm", True):
        raise ConfigError("qk_norm", "Gemma 3 always uses QK-norm")
    rope = d.get("rope_parameters") or {}
    try:
        local = rope.get(SLIDING, {}).get("rope_theta", d.get("rope_local_base_freq", 10_000.0))
        glob = rope.get(FULL, {}).get("rope_theta", d.get("rope_theta", 1_000_000.0))
        n_layers = d["num_hidden_layers"]
        return Config(
            name=name,
            vocab_size=d["vocab_size"],
            context_length=d.get("max_position_embeddings", 32768),
            emb_dim=d["hidden_size"],
            n_heads=d["num_attention_heads"],
            n_layers=n_layers,
            hidden_dim=d["intermediate_size"],
            head_dim=d["head_dim"],
            n_kv_heads=d["num_key_value_heads"],
            rope_local_base=float(local),
            rope_base=float(glob),
            sliding_window=d["sliding_window"],
            layer_types=tuple(d["layer_types"]),
            query_pre_attn_scalar=float(d["query_pre_attn_scalar"]),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(d.get("tie_word_embeddings", True)),
            vocab_pad_multiple=vocab_pad_multiple,
        )
    except KeyError as e:
        raise Gemma3Error(f"config.json: missing field {e.args[0]!r}") from None


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


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / META
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise Gemma3Error(f"{path}: not valid JSON ({e})") from None


def load_config(directory: str | os.PathLike[str], vocab_pad_multiple: int = 1) -> Config:
    directory = Path(directory)
    recover_dir(directory)  # a save killed between its two renames left it as .<name>.old
    if not directory.is_dir():
        raise Gemma3Error(
            f"{directory}: checkpoint directory not found (train first, or dvc pull it)"
        )
    path = directory / HF_CONFIG
    if not path.is_file():
        raise Gemma3Error(f"{path}: missing; not a checkpoint directory")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Gemma3Error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise Gemma3Error(f"{path}: must be a JSON object of config fields")
    name = read_meta(directory).get("preset", "custom")
    try:
        return from_hf_config(d, name=name, vocab_pad_multiple=vocab_pad_multiple)
    except Gemma3Error as e:  # name the file: "config.json: model.head_dim: must be even"
        raise Gemma3Error(f"{path}: {str(e).removeprefix(HF_CONFIG + ': ')}") from None
    except (TypeError, ValueError) as e:
        raise Gemma3Error(f"{path}: invalid value ({e})") from None


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
    if not weights.is_file():
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
    with torch.device("meta"):
        meta_model = Gemma3ForCausalLM(cfg)
        meta_sd = {
            k: torch.empty(shape, dtype=WEIGHT_DTYPES[dtype])
            for k, (dtype, shape) in header.items()
        }
    load_hf_state_dict(meta_model, meta_sd, source=str(weights))


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


def _too_big(cfg: Config, weights: Path, why: str) -> str:
    n = cfg.param_counts()["total"]
    return (
        f"{weights.parent / HF_CONFIG}: the model it describes has {n:,} parameters "
        f"(hidden_size {cfg.emb_dim}, intermediate_size {cfg.hidden_dim}, "
        f"{cfg.n_layers} layers: {4 * n / 1e9:,.1f} GB in float32); {why}"
    )


def check_fits_in_memory(cfg: Config, weights: Path) -> None:
    """The float32 model plus the file's tensors must fit in the RAM available now."""
    n = cfg.param_counts()["total"]
    need = 4 * n + weights.stat().st_size
    free = _available_memory()
    if free is not None and need > free:
        raise Gemma3Error(
            _too_big(cfg, weights, f"loading it needs about {need / 1e9:,.1f} GB, "
                     f"more than the {free / 1e9:,.1f} GB of memory available")
        )  # fmt: skip


def check_finite(sd: dict[str, torch.Tensor], weights: Path) -> None:
    """NaN/Inf weights (a diverged or corrupted run) would generate '!!!!' without an error."""
    for key in sorted(sd):
        bad = int((~torch.isfinite(sd[key])).sum())
        if bad:
            raise Gemma3Error(
                f"{weights}: {key} has {bad:,} NaN/Inf value(s); the checkpoint is corrupt "
                "(a diverged run?): retrain, or dvc pull / dvc checkout checkpoints/best"
            )
