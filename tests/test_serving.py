"""The registered model served by a real `mlflow models serve` on 127.0.0.1, started by the
README's serving walkthrough replayed verbatim: greedy text equal to `gemma3 generate
--temperature 0` (same precision rule, same encoding of `<|endoftext|>` in a prompt), a 400 naming
the field for every request the CLI would refuse, no generation past the request's time limit,
and no process left after SIGTERM to the server's process group."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch

from gemma3.config import Config
from gemma3.hf import save_checkpoint
from gemma3.model import Gemma3ForCausalLM
from gemma3.tracking import start_run
from tests.dvcrepo import REPO, free_port, tool_env

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time"
README_PORT = "5001"
TIME_LIMIT = 12  # MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT for this server, seconds


def readme_serve_block() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- walkthrough: serve -->\n```bash\n(.*?)```", text, re.S)
    assert m, "README.md has no serving walkthrough"
    return m.group(1)


def cli_greedy(root: Path, prompt: str, max_new_tokens: int) -> str:
    """What a user sees from `gemma3 generate --temperature 0` (default --dtype auto, device)."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "gemma3.cli", "generate", prompt, "--model", "checkpoints/best",
            "--temperature", "0", "--max-new-tokens", str(max_new_tokens),
        ],
        cwd=root, env=tool_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.removesuffix("\n")


def post(port: int, body: dict, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"message": raw.decode(errors="replace")}


def group(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, ProcessLookupError):
            continue
    return out


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


@pytest.fixture
def registered(tmp_path: Path, monkeypatch) -> Path:
    """An untrained tiny model (its greedy text is varied gibberish, so any token mismatch
    shows) logged and registered as the champion in tmp_path/mlflow.db, as the train stage does."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ckpt = tmp_path / "checkpoints" / "best"
    save_checkpoint(Gemma3ForCausalLM(Config.from_name("gemma3-tiny")), ckpt, meta={"step": 3})
    tracker = start_run(
        enabled=True, experiment="served", root=tmp_path, tags={"stage": "train"},
        registered_model="gemma3-tinystories",
    )  # fmt: skip
    tracker.log_best(ckpt, 3.25, 3)
    tracker.finish()
    assert tracker.model_version == "1" and "champion" in tracker.alias_line
    return tmp_path


def test_served_champion_is_bounded_like_the_cli(registered: Path) -> None:
    root, port = registered, free_port()
    expected = cli_greedy(root, PROMPT, 50)
    assert len(set(expected.removeprefix(PROMPT).split())) > 3  # not one repeated token
    script = readme_serve_block().replace(README_PORT, str(port))
    env = tool_env(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT=str(TIME_LIMIT))
    # The walkthrough as written: the server in the background, then curl until it answers.
    with open(root / "curl.out", "w") as out, open(root / "serve.log", "w") as log:
        shell = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", script], cwd=root, env=env,
            start_new_session=True, stdout=out, stderr=log,
        )  # fmt: skip
    pgid = shell.pid
    try:
        # The server keeps running in the background (in the shell's process group).
        assert shell.wait(timeout=300) == 0, (root / "serve.log").read_text()[-3000:]
        out = (root / "curl.out").read_text(encoding="utf-8")  # uvicorn's access log too
        answer, _ = json.JSONDecoder().raw_decode(out[out.index('{"predictions"') :])
        assert answer == {"predictions": [expected]}
        check_requests(root, port)
        check_time_limit(port, pgid)
        check_shutdown(port, pgid)
    finally:
        if group(pgid):
            os.killpg(pgid, signal.SIGKILL)


def check_requests(root: Path, port: int) -> None:
    # One rule for `<|endoftext|>` in a prompt: ordinary text, for the CLI and the server alike.
    special = "The end.<|endoftext|>Once"
    assert post(port, {"inputs": [special], "params": {"max_new_tokens": 20}}) == (
        200,
        {"predictions": [cli_greedy(root, special, 20)]},
    )
    bad = {
        "top_p": ({"inputs": [PROMPT], "params": {"top_p": 2.0}}, "top_p must be in (0, 1]"),
        "temperature": ({"inputs": [PROMPT], "params": {"temperature": -1.0}}, "temperature"),
        "max_new_tokens": (
            {"inputs": [PROMPT], "params": {"max_new_tokens": 1_000_000_000}},
            "max_new_tokens: 1000000000 is more than the model's context_length 1024",
        ),
        "long prompt": (
            {"inputs": ["word " * 2000]},
            "inputs: prompt has 2001 tokens; the model's context_length is 1024",
        ),
        "too many prompts": ({"inputs": [PROMPT] * 65}, "inputs: 65 prompts; at most 64"),
    }
    for case, (body, field) in bad.items():
        status, answer = post(port, body)
        assert status == 400 and field in answer["message"], (case, status, answer)


def check_time_limit(port: int, pgid: int) -> None:
    """A request longer than the time limit gets 504, and the worker stops generating then."""
    long = {"inputs": [PROMPT] * 64, "params": {"max_new_tokens": 1000}}  # minutes of work
    t0 = time.monotonic()
    status, _ = post(port, long, timeout=120)
    assert status == 504 and time.monotonic() - t0 < TIME_LIMIT + 10
    time.sleep(3)
    procs = group(pgid)
    before = cpu_seconds(procs)
    time.sleep(3)
    assert cpu_seconds(procs) - before < 0.5  # idle: nothing generates for a gone request


def check_shutdown(port: int, pgid: int) -> None:
    """SIGTERM to the server's process group during a long request: every process exits within
    seconds (before the request's own time limit could end the generation)."""
    long = {"inputs": [PROMPT] * 64, "params": {"max_new_tokens": 1000}}
    threading.Thread(target=post, args=(port, long), daemon=True).start()
    time.sleep(3)  # generating now
    os.killpg(pgid, signal.SIGTERM)
    t0 = time.monotonic()
    while group(pgid) and time.monotonic() - t0 < TIME_LIMIT:
        time.sleep(0.2)
    left = [p.cmdline() for p in group(pgid)]
    assert not left and time.monotonic() - t0 < 5, left
