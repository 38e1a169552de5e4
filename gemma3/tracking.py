"""MLflow tracking: the only module that imports mlflow.

Default store: `sqlite:///<root>/mlflow.db` with artifacts in `<root>/mlartifacts`, where root is
`DVC_ROOT` (set by DVC in every stage) or the working directory. Both are absolute on purpose:
`dvc exp run --temp/--queue` runs stages in a temporary copy that is deleted afterwards, so a
relative store or artifact location would vanish with it. `MLFLOW_TRACKING_URI` overrides the
store (a team `mlflow server`, say).

Tracking must never stop training: the first failing call prints one warning line and turns the
tracker into a no-op; the curves are still in the DVC metrics and plots files.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Fail fast when a server is down instead of retrying for minutes (users may raise these).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

MAX_PARAM_LEN = 6000


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(root: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI if set, else the project's SQLite database."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(root or project_root()) / 'mlflow.db'}"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": "0.001"}; lists become JSON."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            text = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
            out[key] = text[:MAX_PARAM_LEN]
    return out


def _git_commit(root: Path) -> str | None:
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def _warn(message: str) -> None:
    print(f"tracking: warning: {' '.join(message.split())}", file=sys.stderr)


class Tracker:
    """A handle on one MLflow run. Every method is a no-op once disabled or after a failure."""

    def __init__(
        self, client: Any = None, run_id: str | None = None, uri: str = "", owns_run: bool = True
    ) -> None:
        """`owns_run`: this process ends the run (status) when done; a stage that only adds to a
        finished run does not."""
        self._client = client
        self.run_id = run_id
        self.uri = uri
        self._finished = client is None or not owns_run
        if not self._finished:
            atexit.register(self.finish, "KILLED")  # a crash must not leave the run RUNNING

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._client is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any tracking failure must not stop the stage
            _warn(
                f"MLflow {what} failed at {self.uri} ({type(e).__name__}: {str(e)[:200]}); "
                "continuing without tracking, curves are still in metrics/ and plots/"
            )
            self._client = None
            return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._call(
                "log_params",
                lambda b: self._client.log_batch(self.run_id, params=b),
                items[i : i + 100],
            )

    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if batch:
            self._call("log_metrics", lambda: self._client.log_batch(self.run_id, metrics=batch))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        if batch:
            self._call("set_tags", lambda: self._client.log_batch(self.run_id, tags=batch))

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Log a file or a whole directory (under `artifact_path`/<dir name>)."""
        path = Path(path)
        if path.is_dir():
            dest = f"{artifact_path}/{path.name}" if artifact_path else path.name
            self._call(
                "log_artifacts", lambda: self._client.log_artifacts(self.run_id, str(path), dest)
            )
        else:
            self._call(
                "log_artifact",
                lambda: self._client.log_artifact(self.run_id, str(path), artifact_path),
            )

    def finish(self, status: str = "FINISHED") -> None:
        if not self._finished:
            self._finished = True
            self._call(
                "set_terminated", lambda: self._client.set_terminated(self.run_id, status=status)
            )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.finish("FINISHED" if exc_type is None else "FAILED")


def _experiment_id(client: Any, name: str, artifact_root: Path | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = (artifact_root / name).as_uri() if artifact_root is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by a parallel stage
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(
    *,
    enabled: bool,
    experiment: str,
    run_id: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    root: str | os.PathLike[str] | None = None,
) -> Tracker:
    """Continue run `run_id` if it exists in the store, else start a new run.

    New runs are named after the DVC experiment (`DVC_EXP_NAME`) when there is one and tagged with
    the git commit and DVC baseline, so MLflow and `dvc exp show` point at each other.
    """
    if not enabled:
        return Tracker()
    root = Path(root).resolve() if root else project_root()
    uri = tracking_uri(root)
    try:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        if run_id:
            try:
                run = client.get_run(run_id)
                if run.info.lifecycle_stage != "deleted":
                    # A resumed training run is running again; evaluate/sample only add to it.
                    resumed = bool(tags) and tags.get("stage") == "train"
                    if resumed and run.info.status != "RUNNING":
                        client.update_run(run_id, status="RUNNING")
                    tracker = Tracker(client, run_id, uri, owns_run=resumed)
                    tracker.set_tags(dict(tags or {}))
                    return tracker
            except Exception:  # noqa: BLE001 - unknown run id in this store: start a new run
                pass
        local = not os.environ.get("MLFLOW_TRACKING_URI")
        exp_id = _experiment_id(client, experiment, root / "mlartifacts" if local else None)
        exp_name = os.environ.get("DVC_EXP_NAME")
        all_tags = {
            "dvc.exp_name": exp_name,
            "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV"),
            "mlflow.source.git.commit": _git_commit(root),
            "mlflow.source.name": "dvc exp run" if exp_name else "dvc repro",
            **dict(tags or {}),
        }
        run = client.create_run(
            exp_id,
            run_name=run_name or exp_name or None,
            tags={k: str(v) for k, v in all_tags.items() if v is not None},
        )
    except Exception as e:  # noqa: BLE001
        _warn(
            f"cannot start an MLflow run at {uri} ({type(e).__name__}: {str(e)[:200]}); "
            "continuing without tracking, curves are still in metrics/ and plots/"
        )
        return Tracker(uri=uri)
    return Tracker(client, run.info.run_id, uri)
