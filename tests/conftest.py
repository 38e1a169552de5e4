import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Trained:
    """The shared trained baseline (read-only: copy it with `repo_copy` to change anything)."""

    repo: Path
    run_commit: str  # the commit the baseline trained at (MLflow's git tags point here)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Trained:
    """One tiny pipeline, trained and committed once per test session (one build shared by all
    xdist workers through a file lock), for the pipeline, sharing and tracking tests."""
    from filelock import FileLock

    from tests.dvcrepo import build_trained_repo

    base = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):  # an xdist worker: share the build with the others
        base = base.parent
    root = base / "trained-baseline"
    with FileLock(str(base / "trained-baseline.lock")):
        if not (root / "run_commit").is_file():
            shutil.rmtree(root, ignore_errors=True)  # a build that failed half way
            build_trained_repo(root)
    return Trained(root / "repo", (root / "run_commit").read_text(encoding="utf-8"))


@pytest.fixture
def repo_copy(trained: Trained, tmp_path: Path) -> Path:
    """A private, writable copy of the trained baseline."""
    from tests.dvcrepo import copy_repo

    return copy_repo(trained.repo, tmp_path / "repo")
