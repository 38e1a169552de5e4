"""Build a small, self-contained pipeline workspace in a temp dir for stage-level tests."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]

# A tiny model and a short run: seconds on 2 CPU cores.
TINY_TRAIN = {
    "max_steps": 40,
    "batch_size": 4,
    "block_size": 32,
    "grad_accum": 1,
    "lr": 3e-3,
    "min_lr": 3e-4,
    "warmup_steps": 4,
    "eval_interval": 10,
    "eval_batches": 2,
    "log_interval": 5,
    "checkpoint_interval": 10,
}
TINY_MODEL = {"preset": "gemma3-tiny", "overrides": {"vocab_size": 512}}


def base_params() -> dict[str, Any]:
    return yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


def deep_update(d: dict[str, Any], u: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(d)
    for k, v in u.items():
        out[k] = (
            deep_update(out.get(k, {}), v)
            if isinstance(v, dict) and v and isinstance(out.get(k), dict)
            else v
        )
    return out


def write_params(root: Path, **sections: Any) -> dict[str, Any]:
    params = deep_update(
        base_params(), {"model": TINY_MODEL, "train": TINY_TRAIN, "tracking": {"enabled": False}}
    )
    params = deep_update(params, sections)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return params


def patterned_tokens(n: int, vocab: int = 512, seed: int = 0) -> np.ndarray:
    """Learnable token stream: short repeating 'sentences' with a few random choices."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    while len(out) < n:
        a, b = rng.integers(10, vocab // 2, size=2)
        out += [1, 2, int(a), 3, int(b), int(a), 4, 0]
    return np.asarray(out[:n], dtype=np.uint16)


def write_tokens(root: Path, n_train: int = 20_000, n_val: int = 2_000, vocab: int = 512) -> Path:
    d = root / "data" / "tokens"
    d.mkdir(parents=True, exist_ok=True)
    patterned_tokens(n_train, vocab, 0).tofile(d / "train.bin")
    patterned_tokens(n_val, vocab, 1).tofile(d / "validation.bin")
    meta = {
        "train": {"tokens": n_train, "stories": n_train // 8, "bytes": n_train * 4},
        "validation": {"tokens": n_val, "stories": n_val // 8, "bytes": n_val * 4},
        "vocab_size": 50257,
        "dtype": "uint16",
        "eot": True,
        "eot_id": 50256,
        "tokenizer": "gpt2",
    }
    (d / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return d


def env() -> dict[str, str]:
    """Environment for stage subprocesses in a temp workspace: `stages` is not installed (DVC
    runs it from the repository root), so the repository goes on PYTHONPATH."""
    e = dict(os.environ)
    path = os.pathsep.join(x for x in (str(REPO), e.get("PYTHONPATH")) if x)
    e.update(
        {
            "PYTHONPATH": path,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DVC_NO_ANALYTICS": "1",
        }
    )
    return e


def stage_cmd(name: str) -> list[str]:
    return [sys.executable, "-m", f"stages.{name}"]


def run_stage(
    root: Path, name: str, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        stage_cmd(name), cwd=root, env=env(), capture_output=True, text=True, **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"stage {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc
