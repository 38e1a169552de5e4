"""A failing `dvc repro` leaves the previous outputs as they were (README "When something goes
wrong").

DVC deletes a stage's outputs before it runs the stage's command unless they are `persist: true`,
so a stage that fails, however cleanly, would leave nothing behind. These tests run the failing
cases through `dvc repro` itself in a real git + DVC repo that has one complete pipeline run, and
compare every output file byte for byte before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dvcrepo import make_repo, sh, tool_env
from tests.project import deep_update
from tests.test_bad_input import stderr_lines

pytestmark = pytest.mark.slow

# Outputs of train, evaluate and sample; a failed repro must leave each byte-identical.
KEPT = ("checkpoints", "metrics", "plots", "samples")
DATA = ("data/raw", "data/tokens")
LONG_PROMPT = "dog" + " dog" * 4999  # 5,000 GPT-2 tokens ("dog", " dog"); gemma3-tiny: 1,024


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A repo after one complete `dvc repro` of the tiny pipeline, committed (read-only: each
    test copies it). Built once per session, shared by the xdist workers."""
    from tests.conftest import shared_build

    return shared_build(tmp_path_factory, request, "repro-baseline", _build_baseline) / "repo"


def _build_baseline(root: Path) -> None:
    repo = make_repo(root / "repo", {"tracking": {"enabled": False}})
    sh(["dvc", "repro"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "baseline run"], repo)


def snapshot(repo: Path, tops: tuple[str, ...]) -> dict[str, str]:
    files = (p for top in tops for p in sorted((repo / top).rglob("*")) if p.is_file())
    return {
        p.relative_to(repo).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }


def set_params(repo: Path, changes: dict[str, Any]) -> None:
    path = repo / "params.yaml"
    p = deep_update(yaml.safe_load(path.read_text(encoding="utf-8")), changes)
    path.write_text(yaml.safe_dump(p, sort_keys=False), encoding="utf-8")


REPRO_FAILURES = [
    # Only train is out of date; it fails on its data check, after DVC would have deleted
    # metrics/train.json (the reproduction).
    pytest.param(
        {"train": {"batch_size": 1_000_000_000}},
        "train",
        "data/tokens/train.bin",
        "fewer than one batch",
        id="train-batch-larger-than-the-data",
    ),
    # Train and sample are out of date: the prompt is rejected by train, the first stage to run,
    # before any training (it used to be rejected by sample, after training had replaced
    # checkpoints/best).
    pytest.param(
        {"train": {"lr": 0.001}, "sample": {"prompts": [LONG_PROMPT]}},
        "train",
        "sample.prompts[0]: prompt has 5000 tokens; the model's context_length is 1024",
        "",
        id="overlong-prompt-fails-before-training",
    ),
    # Only sample is out of date: it fails, samples/ stays.
    pytest.param(
        {"sample": {"prompts": ["Once upon a time", LONG_PROMPT]}},
        "sample",
        "sample.prompts[1]: prompt has 5000 tokens",
        "",
        id="overlong-prompt-keeps-the-samples",
    ),
    # Only evaluate is out of date: it fails, metrics/eval.json stays.
    pytest.param(
        {"eval": {"block_size": 4096}},
        "evaluate",
        "eval.block_size: (4096) exceeds the model's context_length (1024)",
        "",
        id="eval-window-over-context-keeps-the-eval-metrics",
    ),
    # New data too small for a batch: tokenize (the first stage that can count tokens) fails,
    # not train after the new tokens replaced the old ones.
    pytest.param(
        {"data": {"synthetic": {"n_train": 5}}, "train": {"batch_size": 100}},
        "tokenize",
        "data/tokens/train.bin",
        "fewer than one batch (train.batch_size 100 x train.block_size 32) + 1",
        id="too-few-tokens-fails-in-tokenize",
    ),
]


@pytest.mark.parametrize("changes,stage,needle,needle2", REPRO_FAILURES)
def test_failed_repro_leaves_previous_outputs_intact(
    baseline: Path, tmp_path: Path, changes: dict[str, Any], stage: str, needle: str, needle2: str
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(baseline, repo, symlinks=True)
    data_changes = "data" in changes
    before = snapshot(repo, KEPT if data_changes else KEPT + DATA)
    set_params(repo, changes)

    proc = sh(["dvc", "repro"], repo, check=False)

    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert snapshot(repo, KEPT if data_changes else KEPT + DATA) == before
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"{stage}: error: ")]
    assert len(errors) == 1, proc.stderr
    assert needle in errors[0] and needle2 in errors[0], errors[0]
    order = ["download", "tokenize", "train", "evaluate", "sample"]
    later = order[order.index(stage) + 1 :]
    assert f"Running stage '{stage}'" in proc.stdout, proc.stdout
    assert not [s for s in later if f"Running stage '{s}'" in proc.stdout], proc.stdout


def test_failed_download_removes_data_raw_and_dvc_checkout_restores_it(
    baseline: Path, tmp_path: Path
) -> None:
    """data/raw and data/tokens are deliberately not persistent (their stages keep DVC's
    run-cache): a failed download removes data/raw, and `dvc checkout` brings it back from the
    cache, byte for byte, while train's outputs were never touched."""
    repo = tmp_path / "repo"
    shutil.copytree(baseline, repo, symlinks=True)
    before = snapshot(repo, KEPT + DATA)
    (repo / "stories.txt").write_bytes(b"A story.\n<|endoftext|>\nCaf\xe9 story.\n")
    set_params(repo, {"data": {"source": "stories.txt"}})

    proc = sh(["dvc", "repro"], repo, check=False)

    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "download: error: stories.txt:3: not valid UTF-8" in proc.stderr, proc.stderr
    assert not (repo / "data/raw").exists()
    assert snapshot(repo, KEPT) == {k: v for k, v in before.items() if k.startswith(KEPT)}
    sh(["dvc", "checkout", "data/raw"], repo)
    assert snapshot(repo, KEPT + DATA) == before


def test_sigterm_to_dvc_repro_during_training_saves_the_state_and_says_so(
    baseline: Path, tmp_path: Path
) -> None:
    """`kill -TERM -<pgid>` of a running `dvc repro` (what a job scheduler or `timeout` does):
    the trainer gets SIGTERM from the group and again when dvc dies (exit_with_parent). It must
    stop after its step, save the state and print the documented line, not die on the second
    signal with a bare `train: interrupted` and the steps since the last save lost."""
    repo = tmp_path / "repo"
    shutil.copytree(baseline, repo, symlinks=True)
    set_params(repo, {"train": {"max_steps": 100_000, "eval_interval": 100_000}})
    state = repo / "checkpoints/state/state.json"
    old_state = state.read_bytes()
    proc = subprocess.Popen(
        ["dvc", "repro"], cwd=repo, env=tool_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while state.read_bytes() == old_state and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # the new run saved its first state (step 6): the loop is running
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)  # returns when the trainer, too, closed the pipe
    step = json.loads(state.read_text(encoding="utf-8"))["step"]
    assert 6 <= step < 100_000
    assert "Traceback" not in err, err
    lines = [ln for ln in stderr_lines(err) if ln.startswith("train: ")]
    assert lines == [
        f"train: interrupted: stopped at step {step}; training state saved to "
        "checkpoints/state, re-run to resume"
    ], err
