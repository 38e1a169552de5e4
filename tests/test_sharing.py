"""Sharing weights: `dvc push` to a real remote, clone elsewhere, `dvc pull` only the checkpoint,
and generate the same text without any training data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dvcrepo import make_repo, sh, tool_env

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = make_repo(tmp_path_factory.mktemp("origin") / "repo", {"tracking": {"enabled": False}})
    sh(["dvc", "repro"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "trained"], repo)
    return repo


def greedy(repo: Path) -> str:
    proc = subprocess.run(
        [
            sys.executable, "-m", "gemma3.cli", "generate", PROMPT,
            "--model", "checkpoints/best", "--temperature", "0", "--max-new-tokens", "24",
            "--no-stop", "--device", "cpu",
        ],
        cwd=repo, env=tool_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(PROMPT)
    return proc.stdout


def round_trip(
    origin: Path, clone_dir: Path, remote: str, url: str, env: dict[str, str], **cfg: str
) -> None:
    def add_remote(repo: Path) -> None:
        sh(["dvc", "remote", "add", "--local", "-f", remote, url], repo, env)
        for k, v in cfg.items():
            sh(["dvc", "remote", "modify", "--local", remote, k, v], repo, env)

    add_remote(origin)
    sh(["dvc", "push", "-r", remote], origin, env)
    sh(["git", "clone", "-q", str(origin), str(clone_dir)], origin.parent, env)
    add_remote(clone_dir)
    sh(["dvc", "pull", "-r", remote, "checkpoints/best"], clone_dir, env)

    assert (clone_dir / "checkpoints/best/model.safetensors").is_file()
    # Only the weights came over: no raw data, no tokens.
    assert not (clone_dir / "data/raw").exists() and not (clone_dir / "data/tokens").exists()
    assert greedy(clone_dir) == greedy(origin)
    # The sample stage runs from the pulled checkpoint alone.
    sh(["dvc", "repro", "--single-item", "--force", "sample"], clone_dir, env)
    assert (clone_dir / "samples/samples.md").read_text() == (
        origin / "samples/samples.md"
    ).read_text()


def test_push_pull_through_a_local_directory_remote(trained: Path, tmp_path: Path) -> None:
    round_trip(trained, tmp_path / "clone", "shared", str(tmp_path / "remote"), tool_env())


def test_push_pull_through_s3(trained: Path, tmp_path: Path) -> None:
    pytest.importorskip("dvc_s3")
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        creds = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        s3 = boto3.client("s3", endpoint_url=endpoint, **{
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
            "region_name": "us-east-1",
        })  # fmt: skip
        s3.create_bucket(Bucket="team-weights")
        env = tool_env(**creds)
        round_trip(
            trained, tmp_path / "clone", "s3", "s3://team-weights/gemma3", env, endpointurl=endpoint
        )
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="team-weights")["Contents"]]
        assert keys and all(k.startswith("gemma3/") for k in keys)
    finally:
        server.stop()


def test_pull_from_a_remote_without_the_object_fails_clearly(trained: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty-remote"
    empty.mkdir()
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(trained), str(clone)], tmp_path)
    sh(["dvc", "remote", "add", "--local", "empty", str(empty)], clone)
    proc = sh(["dvc", "pull", "-r", "empty", "checkpoints/best"], clone, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "failed to pull data from the cloud" in out or "Missing cache files" in out, out
    # Nothing partial in the workspace: only git's own files under checkpoints/.
    assert sorted(
        str(p.relative_to(clone)) for p in (clone / "checkpoints").rglob("*") if p.is_file()
    ) == ["checkpoints/.gitignore"]
    # No stray temporary files in the workspace either.
    stray = [
        p
        for p in clone.rglob("*")
        if p.is_file() and ".git" not in p.parts and ".dvc" not in p.parts
        and p.name.endswith((".tmp", ".part"))
    ]  # fmt: skip
    assert stray == []
    assert os.listdir(empty) == []
