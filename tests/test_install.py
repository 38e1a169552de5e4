"""`pip install .` with no extras, in a fresh venv: the library loads a checkpoint and generates
with torch, numpy, tiktoken and safetensors only; the pipeline's stack and `stages` are absent.

The venv is built once per test session (about 2 minutes from pip's cache; torch comes from the
local wheel the machine carries). Where pip cannot get a package (no network and no cache) the
tests skip, naming pip's reason; any other pip failure (a broken pyproject.toml) fails them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ("mlflow", "dvc", "datasets", "pandas", "pyarrow", "transformers", "yaml", "tqdm")
pytestmark = pytest.mark.slow

# Signs that pip could not reach a package, as opposed to a packaging error of ours.
UNREACHABLE = ("No matching distribution", "Could not find a version", "NewConnectionError")


def _pip(venv: Path, *args: str) -> None:
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "--quiet", "--no-compile", *args]
    proc = subprocess.run(pip, capture_output=True, text=True, timeout=900)
    if proc.returncode == 0:
        return
    if any(s in proc.stderr for s in UNREACHABLE):
        pytest.skip(f"pip cannot install offline here: {proc.stderr.strip().splitlines()[-1]}")
    raise AssertionError(f"pip install {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


@pytest.fixture(scope="session")
def clean_venv(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A fresh venv (no system site-packages) with torch and `pip install <copy of the repo>`,
    built once per session and shared by the xdist workers (each would build its own)."""
    from tests.conftest import shared_build

    return shared_build(tmp_path_factory, request, "clean-venv", _build_venv) / "venv"


def _build_venv(base: Path) -> None:
    src = base / "src"  # a copy: building a wheel writes build/ and *.egg-info into the source
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("gemma3", "stages"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    _pip(venv, "torch==2.13.0")  # the Makefile's pin; the machine's local wheel
    _pip(venv, str(src))


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint written by this (full) environment's save_checkpoint."""
    import torch

    from gemma3.config import Config
    from gemma3.hf import save_checkpoint
    from gemma3.model import Gemma3ForCausalLM

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Config.from_name("gemma3-tiny"))
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "best", meta={"step": 1})


def _reference(checkpoint: Path, prompt: str, n: int, **kw: object) -> list[int]:
    """Greedy tokens from this (full) environment: what the installed library must reproduce."""
    from gemma3.generation import generate
    from gemma3.hf import load_checkpoint
    from gemma3.tokenizer import encode

    return generate(load_checkpoint(checkpoint), [encode(prompt)], n, temperature=0, **kw)[0]


LIBRARY_SCRIPT = """
import importlib.metadata, importlib.util, json, sys
import gemma3
cheap = "torch" not in sys.modules
from gemma3 import Config, Gemma3ForCausalLM, generate, load_checkpoint
from gemma3.tokenizer import encode
model = load_checkpoint(sys.argv[1])
tokens = generate(model, [encode("Once upon a time")], 8, temperature=0)[0]
print(json.dumps({
    "version": gemma3.__version__,
    "dist": importlib.metadata.version("gemma3-tinystories"),
    "cheap": cheap,
    "config": isinstance(model.config, Config) and isinstance(model, Gemma3ForCausalLM),
    "tokens": tokens,
    "absent": [m for m in sys.argv[2:] if importlib.util.find_spec(m) is None],
    "file": gemma3.__file__,
}))
"""


def test_library_install_loads_a_checkpoint_and_generates(clean_venv, checkpoint, tmp_path):
    proc = _run(
        clean_venv, "python", "-c", LIBRARY_SCRIPT, str(checkpoint), "stages", *PIPELINE,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dynamic = ["version"]' in pyproject  # one source: gemma3/__init__.py
    assert out["version"] == out["dist"] != ""
    assert out["file"].startswith(str(clean_venv))  # the installed copy, not this repository's
    assert out["cheap"], "import gemma3 should not import torch"
    assert out["config"]
    assert out["tokens"] == _reference(checkpoint, "Once upon a time", 8)
    # stages/ is not installed, and nothing of the pipeline extra came with the library.
    assert out["absent"] == ["stages", *PIPELINE]


def test_library_install_console_script(clean_venv, checkpoint, tmp_path):
    bin_ = clean_venv / "bin"
    gen = _run(
        clean_venv, str(bin_ / "gemma3"), "generate", "--model", str(checkpoint),
        "--temperature", "0", "--max-new-tokens", "8", "--dtype", "fp32", "--no-stop",
        "--device", "cpu", "Once upon a time", cwd=tmp_path,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr[-3000:]
    from gemma3.tokenizer import decode

    want = decode(_reference(checkpoint, "Once upon a time", 8, stop_token=None))
    assert gen.stdout.removesuffix("\n") == "Once upon a time" + want

    exported = tmp_path / "export"
    exp = _run(
        clean_venv, str(bin_ / "gemma3"), "export-hf", "--model", str(checkpoint),
        "--out", str(exported), cwd=tmp_path,
    )  # fmt: skip
    assert exp.returncode == 0, exp.stderr[-3000:]
    assert (exported / "model.safetensors").is_file() and (exported / "README.md").is_file()

    # A pipeline command says in one line what to install (exit 2), not a traceback.
    runs = _run(clean_venv, str(bin_ / "gemma3"), "runs", cwd=tmp_path)
    assert runs.returncode == 2
    lines = runs.stderr.strip().splitlines()
    assert len(lines) == 1 and "gemma3-tinystories[pipeline]" in lines[0], runs.stderr
    assert lines[0].startswith("gemma3: error: this needs the 'pandas' package of the pipeline")
