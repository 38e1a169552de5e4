"""The training state on disk, and which run it continues.

A resumable run is its weights, optimizer moments and RNG state (`state.safetensors`) plus the
step, best loss, logged history and run ids (`state.json`), written together through one atomic
directory swap so a kill leaves the previous state whole. `fingerprint` hashes everything that
shapes the trajectory: a state resumes only under params with the same fingerprint, and a state
saved on a machine with another vocab padding (CUDA <-> CPU) loads with its padding rows fitted.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gemma3.errors import Gemma3Error
from gemma3.fileio import atomic_dir, atomic_write_json, is_regular_file, load_json_object
from gemma3.hf import write_safetensors
from gemma3.model import Gemma3ForCausalLM
from gemma3.params import Params

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


# Settings that do not change the trajectory: a state made with other values still resumes.
NOT_IN_FINGERPRINT = (
    "eval_interval",
    "eval_batches",
    "log_interval",
    "checkpoint_interval",
    "resume",
    "device",
    # How an optimizer step's rows are grouped into passes: the same rows and the same step
    # (within rounding) for any split, so a state resumes under another split or device.
    "micro_batch",
    "eval_batch_size",
)


def fingerprint(
    p: Params, data_meta: dict[str, Any], world_size: int, vocab_pad_multiple: int = 1
) -> str:
    """Hash of everything that shapes the training trajectory; a saved state resumes only on a match.

    The model is described as trained: with the vocab padding its machine resolved (64 on CUDA
    under `vocab_pad_multiple: auto`, 1 elsewhere), which the state records beside the hash.
    """
    train = {k: v for k, v in p.to_dict()["train"].items() if k not in NOT_IN_FINGERPRINT}
    data = {k: data_meta.get(k) for k in ("train", "validation", "eot", "vocab_size", "source")}
    relevant = {
        "seed": p.seed,
        "model": p.model_config(vocab_pad_multiple).to_dict(),
        "train": train,
        "data": data,
        "world_size": world_size,
    }
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs; saved and loaded whole."""

    step: int = 0  # optimizer steps done
    fingerprint: str = ""
    best_val_loss: float = math.inf
    best_step: int | None = None  # None: this run has not written checkpoints/best yet
    history: list[dict[str, Any]] = field(default_factory=list)  # the rows of plots/train.csv
    mlflow_run_id: str | None = None
    # The padding of the saved embedding / lm head rows (states from before it was recorded: 1,
    # which is also what their fingerprint describes).
    vocab_pad_multiple: int = 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def save_state(
    directory: Path,
    model: Gemma3ForCausalLM,
    optimizer: torch.optim.Optimizer,
    state: TrainState | dict[str, Any],
) -> None:
    if isinstance(state, dict):
        state = TrainState.from_dict(state)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and model.config.tie_embeddings:
            continue
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    osd = optimizer.state_dict()
    for idx, st in osd["state"].items():
        for name, v in st.items():
            tensors[f"optim.{idx}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.torch_cuda"] = torch.cuda.get_rng_state()
    groups = [
        {k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
        for g in osd["param_groups"]
    ]
    with atomic_dir(directory) as tmp:
        write_safetensors(tensors, tmp / STATE_TENSORS)
        atomic_write_json(tmp / STATE_JSON, {**asdict(state), "param_groups": groups})


def read_state_info(directory: Path) -> dict[str, Any] | None:
    """state.json as written (None when absent: then nothing is resumed); unreadable is one line."""
    path = directory / STATE_JSON
    if not is_regular_file(path) or not is_regular_file(directory / STATE_TENSORS):
        return None
    info = load_json_object(path, "delete the directory to start fresh")
    for key, types in (("step", int), ("fingerprint", str), ("param_groups", list)):
        if not isinstance(info.get(key), types) or isinstance(info.get(key), bool):
            raise Gemma3Error(
                f"{path}: {key}: missing or of the wrong type; not a training state written by "
                "this project: delete the directory to start fresh"
            )
    return info


def read_state_tensors(directory: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(directory / STATE_TENSORS))
    except (SafetensorError, OSError) as e:
        raise Gemma3Error(
            f"{directory / STATE_TENSORS}: unreadable training state ({e}); delete it to start fresh"
        ) from None


# Tensors with one row per (padded) vocabulary entry.
VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


def fit_vocab_rows(t: torch.Tensor, rows: int, vocab: int) -> torch.Tensor:
    """`t` with `rows` rows, changing only padding (rows at or beyond `vocab`): extra rows are
    zeros (never read: inputs are < vocab and logits are cropped to it, so they stay zero:
    no gradient, no moment, decay keeps 0 at 0), surplus padding rows are dropped. A tensor
    with fewer than `vocab` rows is another model's and is returned as is (the shape check
    then refuses it)."""
    if t.shape[0] == rows or t.shape[0] < vocab or rows < vocab:
        return t
    out = t.new_zeros((rows, *t.shape[1:]))
    n = min(rows, t.shape[0])
    out[:n] = t[:n]
    return out


def load_state(
    directory: Path,
    model: Gemma3ForCausalLM,
    optimizer: torch.optim.Optimizer,
    info: dict[str, Any],
    tensors: dict[str, torch.Tensor] | None = None,
) -> TrainState:
    """Put a saved state into `model` and `optimizer`; `tensors` when already read (or sent)."""
    tensors = read_state_tensors(directory) if tensors is None else tensors
    own = model.state_dict()
    vocab = model.config.vocab_size
    sd = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    if model.config.tie_embeddings and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    for key in VOCAB_ROWS:  # saved on a machine with another vocab padding (CUDA <-> CPU)
        if key in sd and sd[key].shape[1:] == own[key].shape[1:]:
            sd[key] = fit_vocab_rows(sd[key], own[key].shape[0], vocab)
    if set(sd) != set(own) or any(sd[k].shape != own[k].shape for k in own):
        raise Gemma3Error(
            f"{directory}: training state does not match the model config; delete it to start fresh"
        )
    model.load_state_dict(sd)
    params = [p for g in optimizer.param_groups for p in g["params"]]  # state_dict's numbering
    vocab_params = {id(model.get_parameter(k)) for k in VOCAB_ROWS}
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            i = int(idx)
            if i < len(params) and id(params[i]) in vocab_params and v.dim() == 2:
                v = fit_vocab_rows(v, params[i].shape[0], vocab)  # moments move with their rows
            moments.setdefault(i, {})[name] = v
    optimizer.load_state_dict({"state": moments, "param_groups": info["param_groups"]})
    torch.set_rng_state(tensors["rng.torch_cpu"])
    if "rng.torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.torch_cuda"])
    return TrainState.from_dict(info)
