"""Sharing: the README's walkthrough replayed verbatim on a bare git repository + a local DVC
remote (push, clone, pull only the weights, experiments pushed and pulled with their outputs,
`dvc artifacts get`); the same round trip through S3; a remote without the objects fails clearly."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import Trained
from tests.dvcrepo import PROMPT, REPO, sh, tool_env

pytestmark = pytest.mark.slow

README_DVC_REMOTE = "/mnt/shared/gemma3-dvc"
README_GIT_URL = "git@example.com:team/gemma3-tinystories.git"
README_GIT_PATH = "/srv/git/team/gemma3-tinystories.git"  # the same repository, on the server


def readme_block(role: str) -> str:
    """The bash block that follows `<!-- walkthrough: ROLE -->` in README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"<!-- walkthrough: {role} -->\n```bash\n(.*?)```", text, re.S)
    assert m, f"README.md has no walkthrough block for {role}"
    return m.group(1)


def replay(block: str, cwd: Path, remote: Path, git_url: Path) -> str:
    """Run the README's commands as written, with only the two addresses replaced."""
    script = block.replace(README_DVC_REMOTE, str(remote)).replace(README_GIT_URL, str(git_url))
    script = script.replace(README_GIT_PATH, str(git_url))
    assert script != block or README_DVC_REMOTE not in block
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"{script}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def greedy(repo: Path) -> str:
    proc = sh(["gemma3", "generate", "--temperature", "0", PROMPT], repo)
    return proc.stdout


def files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_readme_walkthrough_replayed_verbatim(repo_copy: Path, tmp_path: Path) -> None:
    origin, remote, bare = repo_copy, tmp_path / "dvc-remote", tmp_path / "team.git"
    replay(readme_block("server"), tmp_path, remote, bare)  # the bare repository, HEAD -> main
    head = sh(["git", "symbolic-ref", "HEAD"], bare).stdout.strip()
    assert head == "refs/heads/main"  # what `dvc artifacts get` resolves the default branch by
    sh(["git", "remote", "add", "origin", str(bare)], origin)  # the team's git server
    baseline = files(origin / "checkpoints/best")

    replay(readme_block("trainer"), origin, remote, bare)
    exp_weights = files(origin / "checkpoints/best")  # `dvc exp run` left lr-low's outputs here
    assert exp_weights != baseline
    # The remote was committed before the experiment, so the experiment carries it.
    assert "storage" in sh(["git", "show", "HEAD:.dvc/config"], origin).stdout

    team = tmp_path / "teammate"
    team.mkdir()
    out = replay(readme_block("teammate"), team, remote, bare)
    clone = team / "gemma3-tinystories"
    # Only the weights were pulled: no raw data and no tokens came over.
    assert not (clone / "data/raw").exists() and not (clone / "data/tokens").exists()
    assert files(clone / "checkpoints/best") == baseline

    # `dvc artifacts get` (no clone) fetched the baseline weights of the pushed main.
    assert files(team / "gemma3-model") == baseline
    # The greedy story generated from the pulled weights is the trainer's, in the README's order.
    sh(["git", "stash", "-q"], origin)  # back to main's params/outputs, for the trainer's text
    sh(["dvc", "checkout", "-q"], origin)
    assert files(origin / "checkpoints/best") == baseline
    assert greedy(origin) in out

    out = replay(readme_block("teammate-experiment"), clone, remote, bare)
    # `dvc exp show --only-changed` listed the experiment with its changed param.
    assert "lr-low" in out and "train.lr" in out
    # After `dvc exp apply`, the workspace holds lr-low's params and weights (pulled outputs).
    params = yaml.safe_load((clone / "params.yaml").read_text(encoding="utf-8"))
    assert params["train"]["lr"] == 0.0005
    assert files(clone / "checkpoints/best") == exp_weights


def test_push_pull_through_s3(repo_copy: Path, tmp_path: Path) -> None:
    pytest.importorskip("dvc_s3")
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    origin = repo_copy
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
        for repo in (origin,):
            sh(["dvc", "remote", "add", "-d", "s3", "s3://team-weights/gemma3"], repo, env)
            sh(["dvc", "remote", "modify", "s3", "endpointurl", endpoint], repo, env)
        sh(["git", "commit", "-qam", "s3 remote"], origin, env)
        sh(["dvc", "push"], origin, env)
        clone = tmp_path / "clone"
        sh(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
        sh(["dvc", "pull", "checkpoints/best"], clone, env)
        assert files(clone / "checkpoints/best") == files(origin / "checkpoints/best")
        assert not (clone / "data/tokens").exists()
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="team-weights")["Contents"]]
        assert keys and all(k.startswith("gemma3/") for k in keys)
        # The sample stage runs from the pulled checkpoint alone, to the same stories.
        sh(["dvc", "repro", "--single-item", "--force", "sample"], clone, env)
        assert (clone / "samples/samples.json").read_text() == (
            origin / "samples/samples.json"
        ).read_text()
    finally:
        server.stop()


def test_pull_from_a_remote_without_the_object_fails_clearly(
    trained: Trained, tmp_path: Path
) -> None:
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(trained.repo), str(clone)], tmp_path)
    # No remote at all: dvc says so (README: run the pipeline instead).
    proc = sh(["dvc", "pull", "checkpoints/best"], clone, check=False)
    assert proc.returncode != 0
    assert "No remote provided and no default remote set" in proc.stdout + proc.stderr
    empty = tmp_path / "empty-remote"
    empty.mkdir()
    sh(["dvc", "remote", "add", "--local", "empty", str(empty)], clone)
    proc = sh(["dvc", "pull", "-r", "empty", "checkpoints/best"], clone, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "failed to pull data from the cloud" in out or "Missing cache files" in out, out
    # Nothing partial in the workspace: only git's own files under checkpoints/.
    assert sorted(
        str(p.relative_to(clone)) for p in (clone / "checkpoints").rglob("*") if p.is_file()
    ) == ["checkpoints/.gitignore"]
    stray = [
        p
        for p in clone.rglob("*")
        if p.is_file() and ".git" not in p.parts and ".dvc" not in p.parts
        and p.name.endswith((".tmp", ".part"))
    ]  # fmt: skip
    assert stray == []
    assert os.listdir(empty) == []
