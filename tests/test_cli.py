"""The `gemma3` command as a user runs it: export-hf never destroys what it did not write, flags
that are refused say so in one line, help shows defaults, weights are readable by the team."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dvcrepo import tool_env

GEMMA3 = str(Path(sys.executable).parent / "gemma3")


def gemma3(*args: str, cwd: Path, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    def preexec() -> None:
        if umask is not None:
            os.umask(umask)

    return subprocess.run(
        [GEMMA3, *args], cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=300,
        preexec_fn=preexec,
    )  # fmt: skip


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny-preset checkpoint in `<tmp>/work/checkpoints/best`, beside a training state."""
    import torch

    from gemma3.config import Config
    from gemma3.hf import save_checkpoint
    from gemma3.model import Gemma3ForCausalLM

    torch.manual_seed(0)
    work = tmp_path_factory.mktemp("cli") / "work"
    best = work / "checkpoints" / "best"
    save_checkpoint(Gemma3ForCausalLM(Config.from_name("gemma3-tiny")), best, meta={"step": 3})
    (work / "checkpoints" / "state").mkdir()
    (work / "checkpoints" / "state" / "state.safetensors").write_bytes(b"precious")
    return best


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_export_hf_refuses_to_replace_the_current_directory(checkpoint: Path) -> None:
    # On the old code `--out .` exited 0 after deleting the directory's contents, .git included.
    work = checkpoint.parents[1]
    (work / ".git").mkdir(exist_ok=True)
    (work / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (work / "notes.txt").write_text("mine")
    before = tree(work)
    one_line_error(gemma3("export-hf", "--out", ".", cwd=work), "--out", "contains the checkpoint")
    assert tree(work) == before


@pytest.mark.parametrize(
    ("out", "why"),
    [
        ("checkpoints", "contains the checkpoint"),  # used to delete checkpoints/state
        ("checkpoints/best", "contains the checkpoint"),
        ("checkpoints/best/hf", "inside the checkpoint"),
        ("notes.txt", "not a directory"),  # used to become a directory
        ("someone-elses", "not empty"),
    ],
)
def test_export_hf_refuses_targets_it_did_not_write(checkpoint: Path, out: str, why: str) -> None:
    work = checkpoint.parents[1]
    (work / "notes.txt").write_text("mine")
    (work / "someone-elses").mkdir(exist_ok=True)
    (work / "someone-elses" / "config.json").write_text("{}")  # looks like, but is not, an export
    before = tree(work)
    one_line_error(gemma3("export-hf", "--out", out, cwd=work), why)
    assert tree(work) == before


def test_export_hf_writes_new_dirs_and_replaces_only_its_own_exports(
    checkpoint: Path, tmp_path: Path
) -> None:
    work = checkpoint.parents[1]
    out = tmp_path / "exports" / "hf"
    proc = gemma3("export-hf", "--model", str(checkpoint), "--out", str(out), cwd=work, umask=0o022)
    assert proc.returncode == 0, proc.stderr
    first = tree(out)
    assert first["model.safetensors"] and first["config.json"]
    # Readable by the team (0644 under umask 022), weights included.
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    # A previous export is replaced (bf16 weights are half the size)...
    proc = gemma3("export-hf", "--model", str(checkpoint), "--out", str(out), "--dtype", "bf16", cwd=work)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(tree(out)["model.safetensors"]) < len(first["model.safetensors"])
    # ...but not once the user has put a file of their own into it.
    (out / "README.md").write_text("my notes")
    before = tree(out)
    one_line_error(
        gemma3("export-hf", "--model", str(checkpoint), "--out", str(out), cwd=work), "README.md"
    )
    assert tree(out) == before
    # An empty directory is fine to fill.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert gemma3("export-hf", "--model", str(checkpoint), "--out", str(empty), cwd=work).returncode == 0  # fmt: skip
    assert set(tree(empty)) == set(first)


def test_checkpoint_weights_respect_the_umask(tmp_path: Path) -> None:
    import torch

    from gemma3.hf import write_safetensors

    write_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o666 & ~umask


def test_generate_flags_are_one_line_and_say_what_happened(checkpoint: Path) -> None:
    work = checkpoint.parents[1]
    model = ["--model", str(checkpoint), "--device", "cpu"]
    one_line_error(gemma3("generate", "hi", *model, "--seed", str(2**70), cwd=work), "--seed")
    one_line_error(gemma3("generate", "hi", *model, "--dtype", "fp16", cwd=work), "--dtype")
    # The tiny preset's context is 256 tokens: asking for more is capped, and said so.
    from gemma3.config import Config

    ctx = Config.from_name("gemma3-tiny").context_length
    proc = gemma3(
        "generate", "Once upon a time", *model, "--max-new-tokens", "100000",
        "--temperature", "0", "--no-stop", cwd=work,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"--max-new-tokens 100000 capped at {ctx - 4}" in proc.stderr  # 4 prompt tokens
    assert f"[{ctx - 4} tokens in" in proc.stderr


def test_version_and_help_show_defaults_and_examples(checkpoint: Path) -> None:
    from importlib.metadata import version

    proc = gemma3("--version", cwd=checkpoint)
    assert proc.returncode == 0 and proc.stdout.strip() == f"gemma3 {version('gemma3-tinystories')}"
    for cmd in ("info", "generate", "export-hf", "recipe", "runs"):
        out = gemma3(cmd, "--help", cwd=checkpoint).stdout
        assert "examples:" in out and f"gemma3 {cmd}" in out.split("examples:")[1], cmd
    gen = gemma3("generate", "--help", cwd=checkpoint).stdout
    assert "(default: 0.8)" in gen and "(default: checkpoints/best)" in gen
    # Every --dtype value help offers is accepted (fp16 used to be offered, then rejected).
    assert "fp16" not in gen


def test_runs_without_a_store_or_experiment_is_one_line(tmp_path: Path) -> None:
    one_line_error(gemma3("runs", cwd=tmp_path), "no MLflow store at", "dvc repro")
    assert list(tmp_path.iterdir()) == []  # no empty mlflow.db left behind
    import mlflow

    mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("mine")
    one_line_error(
        gemma3("runs", "--experiment", "theirs", cwd=tmp_path),
        "no MLflow experiment 'theirs'",
        "mine",
    )


@pytest.mark.parametrize(
    ("flag", "native_bf16", "expected"),
    [
        ("auto", True, "bf16-autocast"),
        ("auto", False, "fp32"),
        ("fp32", True, "fp32"),
        ("bf16", False, "bf16-pure"),
        ("bfloat16", True, "bf16-pure"),
    ],
)
def test_generate_dtype_auto_follows_the_training_precision_policy(
    flag: str, native_bf16: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gemma3 import cli, runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda *a: native_bf16)
    args = cli.build_parser().parse_args(["generate", "hi", "--device", "cpu", "--dtype", flag])
    device, precision = cli._generation_precision(args)
    assert str(device) == "cpu" and precision == expected
