"""A real git + DVC copy of this project in a temp dir, with a tiny params.yaml, for e2e tests."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.project import REPO, deep_update

PROJECT_FILES = [
    "gemma3", "stages", "dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", "data/source"
]  # fmt: skip

# The whole pipeline on a 3.6M-parameter model: seconds per stage on 2 CPU cores.
TINY_PIPELINE = {
    "data": {"source": "synthetic", "synthetic": {"n_train": 300, "n_val": 30}},
    "model": {"preset": "gemma3-tiny", "overrides": {}},
    "train": {
        "max_steps": 12,
        "batch_size": 4,
        "block_size": 32,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 2,
        "eval_interval": 6,
        "eval_batches": 2,
        "log_interval": 3,
        "checkpoint_interval": 6,
    },
    "eval": {"batch_size": 8},
    "sample": {"prompts": ["Once upon a time"], "max_new_tokens": 12, "temperature": 0.0},
    "tracking": {"enabled": True, "experiment": "e2e"},
}


def tool_env(**extra: str) -> dict[str, str]:
    """Environment for dvc/mlflow/git subprocesses: this venv first on PATH, no telemetry."""
    e = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    e.update(
        {
            "PATH": bindir + os.pathsep + e.get("PATH", ""),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "DVC_NO_ANALYTICS": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "GIT_AUTHOR_NAME": "test",
            "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "test",
            "GIT_COMMITTER_EMAIL": "test@example.com",
        }
    )
    e.pop("MLFLOW_TRACKING_URI", None)
    e.pop("DVC_ROOT", None)
    e.update(extra)
    return e


def sh(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        args, cwd=cwd, env=env or tool_env(), capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode}) in {cwd}:\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def make_repo(root: Path, params: dict[str, Any] | None = None) -> Path:
    """Copy the project's pipeline into `root`, write tiny params, git init + commit."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src, dst = REPO / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    base = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    p = deep_update(deep_update(base, TINY_PIPELINE), params or {})
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False), encoding="utf-8")
    sh(["git", "init", "-q", "-b", "main"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-q", "-m", "init"], root)
    return root


def build_trained_repo(root: Path) -> Path:
    """The shared baseline: a tiny pipeline reproduced once and committed (DVC cache included).

    `root/run_commit` holds the commit the training ran at (what MLflow tags point at).
    """
    repo = make_repo(root / "repo")
    run_commit = sh(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    sh(["dvc", "repro"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "baseline run"], repo)
    (root / "run_commit").write_text(run_commit, encoding="utf-8")
    return repo


def copy_repo(src: Path, dst: Path) -> Path:
    """A private copy of a trained repo: git, DVC cache, outputs and the MLflow store.

    MLflow stores absolute artifact locations; they are rewritten to point into the copy, so
    new runs in the copy never write into the original (shared by other tests).
    """
    import sqlite3

    shutil.copytree(src, dst, symlinks=True)
    db = dst / "mlflow.db"
    if db.exists():
        con = sqlite3.connect(db)
        try:
            tables = [
                r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            for t in tables:
                cols = [
                    r[1]
                    for r in con.execute(f"PRAGMA table_info('{t}')")
                    if "CHAR" in r[2].upper() or "TEXT" in r[2].upper()
                ]
                for c in cols:
                    con.execute(
                        f'UPDATE "{t}" SET "{c}" = replace("{c}", ?, ?) WHERE instr("{c}", ?) > 0',
                        (str(src), str(dst), str(src)),
                    )
            con.commit()
        finally:
            con.close()
    return dst


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 over a SQLite store, for REST queries."""

    def __init__(self, backend_uri: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "mlflow-server.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", backend_uri,
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            ],
            cwd=workdir, env=tool_env(), stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"mlflow server exited: {(workdir / 'mlflow-server.log').read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("mlflow server did not become healthy in 120 s")

    def get(self, endpoint: str, **query: Any) -> Any:
        from urllib.parse import urlencode

        with urllib.request.urlopen(f"{self.url}{endpoint}?{urlencode(query)}", timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict[str, Any]) -> Any:
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def runs(self, experiment: str) -> list[dict[str, Any]]:
        exp = self.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name=experiment)
        eid = exp["experiment"]["experiment_id"]
        return self.post("/api/2.0/mlflow/runs/search", {"experiment_ids": [eid]}).get("runs", [])

    def history(self, run_id: str, key: str) -> list[dict[str, Any]]:
        return self.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key=key).get(
            "metrics", []
        )

    def artifacts(self, run_id: str, path: str = "") -> list[str]:
        res = self.get("/api/2.0/mlflow/artifacts/list", run_id=run_id, path=path)
        return [f["path"] for f in res.get("files", [])]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def metrics(run: dict[str, Any]) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


PROMPT = "Once upon a time"


def greedy_cli(repo: Path, max_new_tokens: int, *extra: str) -> str:
    """`gemma3 generate --temperature 0` as a user runs it (prompt + completion on stdout)."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "gemma3.cli", "generate", PROMPT, "--temperature", "0",
            "--max-new-tokens", str(max_new_tokens), "--device", "cpu", *extra,
        ],
        cwd=repo, env=tool_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.removesuffix("\n")
