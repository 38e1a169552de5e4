"""A training state moves between a CUDA machine and a CPU one with the same params.yaml.

`train.vocab_pad_multiple: auto` pads the embedding and lm head to a multiple of 64 on CUDA and
not at all elsewhere, so a state saved on one has more (or fewer) vocabulary rows than the model
the other builds. The CUDA side is simulated on this CPU: the train stage runs with the resolved
runtime's padding forced to 64 (what `resolve_runtime` picks on CUDA), everything else as is.

The truth a resumed run is held to: padding rows never reach the loss (inputs are < vocab_size,
logits are cropped to it), so the real rows, every other weight and every optimizer moment
follow the same trajectory whatever the padding. A run stopped on one machine and resumed on the
other must end where an uninterrupted run on the first machine ends.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.project import REPO, env, write_params, write_tokens

VOCAB = 500  # padded to 512 by a multiple of 64: not a multiple of 64 itself
STATE = "checkpoints/state"

# The train stage with the resolved padding forced (PAD) and, optionally, Ctrl-C after the
# optimizer step STOP_AT (0-based) -- a signal at a known step, without a sleep.
DRIVER = """
import dataclasses, os, runpy, signal
import gemma3.train as t

PAD, STOP_AT = os.environ.get("PAD"), int(os.environ.get("STOP_AT", "-1"))
resolve, step = t.resolve_runtime, t.train_step

def resolve_runtime(p, d=None):
    rt = resolve(p, d)
    return dataclasses.replace(rt, vocab_pad_multiple=int(PAD)) if PAD else rt

def train_step(run, i, *args, **kwargs):
    out = step(run, i, *args, **kwargs)
    if i == STOP_AT:
        os.kill(os.getpid(), signal.SIGINT)
    return out

t.resolve_runtime, t.train_step = resolve_runtime, train_step
runpy.run_module("stages.train", run_name="__main__")
"""

TRAIN = {
    "max_steps": 8,
    "warmup_steps": 1,
    "eval_interval": 4,
    "eval_batches": 1,
    "log_interval": 1,
    "checkpoint_interval": 100,
    "vocab_pad_multiple": "auto",
}


def workspace(root: Path) -> Path:
    root.mkdir(parents=True)
    write_params(root, train=TRAIN, model={"overrides": {"vocab_size": VOCAB}})
    write_tokens(root)  # ids < 256
    return root


def train(root: Path, pad: int | None, stop_at: int = -1) -> subprocess.CompletedProcess[str]:
    e = env() | {"PYTHONPATH": str(REPO), "STOP_AT": str(stop_at)}
    if pad is not None:
        e["PAD"] = str(pad)
    return subprocess.run(
        [sys.executable, "-c", DRIVER], cwd=root, env=e, capture_output=True, text=True, timeout=300
    )


def saved(root: Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = load_file(str(root / STATE / "state.safetensors"))
    return tensors, json.loads((root / STATE / "state.json").read_text(encoding="utf-8"))


def real_rows(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights and moments without the padding rows (the model the user trained)."""
    return {k: v[:VOCAB] if v.dim() == 2 and v.shape[0] > VOCAB else v for k, v in tensors.items()
            if not k.startswith("rng.")}  # fmt: skip


@pytest.mark.parametrize(
    ("first", "then"), [(64, None), (None, 64)], ids=["cuda-to-cpu", "cpu-to-cuda"]
)
def test_state_resumes_across_vocab_padding_and_ends_where_an_uninterrupted_run_ends(
    tmp_path: Path, first: int | None, then: int | None
) -> None:
    reference = workspace(tmp_path / "reference")
    assert train(reference, first).returncode == 0

    moved = workspace(tmp_path / "moved")
    stopped = train(moved, first, stop_at=2)
    assert stopped.returncode == 130, stopped.stderr
    tensors, info = saved(moved)
    assert info["step"] == 3 and info["vocab_pad_multiple"] == (first or 1)
    assert tensors["model.model.embed_tokens.weight"].shape[0] == (512 if first else VOCAB)

    resumed = train(moved, then)  # the other machine, the same params.yaml
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    assert "resuming from checkpoints/state at step 3/8" in resumed.stderr, resumed.stderr
    assert "starting fresh" not in resumed.stderr

    end, end_info = saved(moved)
    ref, _ = saved(reference)
    assert end_info["step"] == 8 and end_info["vocab_pad_multiple"] == (then or 1)
    rows = 512 if then else VOCAB  # the state describes the model as trained here
    assert end["model.model.embed_tokens.weight"].shape[0] == rows
    a, b = real_rows(end), real_rows(ref)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    if then:  # rows added on resume are zeros and stay zeros (no gradient ever reaches them)
        padded = [k for k, v in end.items() if v.dim() == 2 and v.shape[0] == 512]
        assert padded and all(end[k][VOCAB:].abs().max() == 0 for k in padded)
