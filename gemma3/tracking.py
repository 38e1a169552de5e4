"""MLflow tracking: the only module that imports mlflow.

Default store: `sqlite:///<root>/mlflow.db` with artifacts in `<root>/mlartifacts`, where root is
`DVC_ROOT` (set by DVC in every stage) or the working directory. Both are absolute on purpose:
`dvc exp run --temp/--queue` runs stages in a temporary copy that is deleted afterwards, so a
relative store or artifact location would vanish with it. `MLFLOW_TRACKING_URI` overrides the
store (a team `mlflow server`, say).

Tracking must never stop training: the first failing call prints one warning line and turns the
tracker into a no-op; the curves are still in the DVC metrics and plots files. Every HTTP call has a
short timeout and no retries, so a hung server costs seconds.

A run ends in the state training ended in: FINISHED (FAILED, KILLED) is set at the end even after
a failure turned tracking off mid-run, retried once. At the end of training the best checkpoint is
logged as an MLflow 3 LoggedModel, registered as `tracking.registered_model` with the aliases
`champion` and `latest-run` (gemma3.registry; the served model is gemma3.served); a failure there
is one warning and training still succeeds. gemma3.tracking, gemma3.registry and gemma3.served
are the only modules that import mlflow.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gemma3.provenance import dataset_info, git_commit, project_root, user

# Fail fast when a server is down or hung instead of retrying for minutes (users may raise these).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

MAX_PARAM_LEN = 6000
# The training loss as train.py logs it (`loss/train`, `loss/val`: MLflow's UI groups charts by
# the prefix before `/`, so both losses land on one chart section).
TRAIN_LOSS = "loss/train"
# Tags that say which process owns a RUNNING run, so a later run can tell a dead trainer's run.
HOST_TAG, PID_TAG = "gemma3.host", "gemma3.pid"
# The experiment tag MLflow 3's UI reads to open an experiment in its model-training view (not the
# GenAI one it guesses for an experiment without runs of its kind yet).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
LATEST_ALIAS = "latest-run"  # gemma3.registry.LATEST, without importing mlflow here
END_RETRY_S = 3.0  # wait before the one retry that ends a run (a locked store, a restarting server)


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


def _reason(e: BaseException) -> str:
    """A short cause: MLflow's HTTP errors bury it after the URL and the HTTP library's retry text."""
    text = " ".join(str(e).split())
    if "timed out" in text:
        timeout = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")
        return f"the server did not answer within {timeout} s (MLFLOW_HTTP_REQUEST_TIMEOUT)"
    if "Connection refused" in text or "Failed to establish" in text:
        return "connection refused: is the server running?"
    return f"{type(e).__name__}: {text[:200]}"


def _warn(message: str) -> None:
    print(f"tracking: warning: {' '.join(message.split())}", file=sys.stderr)


class Tracker:
    """A handle on one MLflow run. Every method is a no-op once disabled or after a failure."""

    def __init__(
        self,
        client: Any = None,
        run_id: str | None = None,
        uri: str = "",
        owns_run: bool = True,
        *,
        registered_model: str | None = None,
        first_step: int = 0,
    ) -> None:
        """`owns_run`: this process ends the run (status) when done; a stage that only adds to a
        finished run does not. `first_step`: metrics at earlier steps were already logged by a
        previous (killed) process of this run and are dropped. `registered_model`: where the
        checkpoint's MLflow Model is registered (None: log the model, do not register it)."""
        self._client = client
        self.run_id = run_id
        self.uri = uri
        self.registered_model = registered_model
        self.first_step = first_step
        self.model_version: str | None = None
        self.model_uri: str | None = None
        self.alias_line: str | None = None
        self.dataset: dict[str, Any] | None = None
        self.experiment_id: str | None = None
        self.status = "RUNNING"
        self.monitor: Any = None
        # The client that ends the run even after a tracking failure turned `_client` off.
        self._ender = client
        self._retried = False
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
                f"MLflow {what} failed at {self.uri} ({_reason(e)}); "
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
        """Log one step's metrics (None values skipped; steps a killed run already logged too)."""
        from mlflow.entities import Metric

        if step < self.first_step:
            return
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

    def log_best(self, checkpoint: str | os.PathLike[str], val_loss: float, step: int) -> None:
        """The best checkpoint as the run's MLflow Model (the one copy of its weights in MLflow),
        its val loss linked to the model and the dataset, registered with the aliases updated
        (gemma3.registry). A failure there is one warning; `best_val_loss` is logged anyway."""
        if self._client is None:
            return
        from gemma3.registry import RegistrationError, log_checkpoint

        try:
            logged = log_checkpoint(
                self._client,
                self.run_id,
                Path(checkpoint),
                step=step,
                val_loss=val_loss,
                dataset=self.dataset,
                registered_model=self.registered_model,
            )
        except RegistrationError as e:
            self.model_uri = e.logged.model_uri
            _warn(
                f"could not register the model as {self.registered_model!r} at {self.uri} "
                f"({type(e.cause).__name__}: {str(e.cause)[:200]}); it is logged in run "
                f"{self.run_id} as {e.logged.model_uri}"
            )
            return
        except Exception as e:  # noqa: BLE001 - the checkpoint is safe in DVC; warn only
            _warn(
                f"could not log the checkpoint as an MLflow Model ({type(e).__name__}: "
                f"{str(e)[:200]}); it is safe in {checkpoint} (DVC)"
            )
            self.log_metrics({"best_val_loss": val_loss}, step=step)
            return
        self.model_uri, self.model_version, self.alias_line = (
            logged.model_uri,
            logged.version,
            logged.alias_line,
        )
        if logged.version:
            self.set_tags({"registered_model": f"{self.registered_model}/{logged.version}"})

    def summary(self) -> list[str]:
        """The lines the train stage ends with: the run (id, UI address) and the model."""
        if self.run_id is None or self._ender is None:
            return []
        lines = [f"mlflow: run {self.run_id} ({self.status}) {ui_address(self)}"]
        if self.model_version:
            lines.append(
                f"mlflow: registered models:/{self.registered_model}/{self.model_version} "
                f"(alias {LATEST_ALIAS}); {self.alias_line}"
            )
        elif self.model_uri:
            lines.append(f"mlflow: model {self.model_uri} (not registered)")
        return lines

    def log_dataset(self, data_dir: str | os.PathLike[str], root: Path | None = None) -> None:
        """Record the training tokens as the run's dataset input (source, DVC md5, counts)."""
        if self._client is None:
            return
        info = dataset_info(Path(data_dir), root or project_root())
        if info is None:
            return
        self.dataset = info

        def log() -> None:
            from mlflow.entities import Dataset, DatasetInput, InputTag

            entity = Dataset(
                name=info["name"],
                digest=info["digest"],
                source_type="local",
                source=json.dumps({"uri": info["uri"]}),
                profile=json.dumps(info["profile"]),
            )
            self._client.log_inputs(
                self.run_id,
                datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", "training")])],
            )
            self.set_tags({f"data.{k}": v for k, v in info["profile"].items()})

        self._call("log_inputs", log)

    def retry(self) -> None:
        """Once, at the end of training: a tracker turned off by a failure mid-run tries again
        (the final metrics, the model, the end of the run), since the store may be back."""
        if self._client is None and self._ender is not None and not self._retried:
            self._retried = True
            self._client = self._ender

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as `status`, even after a tracking failure: tried, then retried once
        after END_RETRY_S, so the run never stays RUNNING because of a passing failure."""
        if self._finished:
            return
        self._finished = True
        if self.monitor is not None:
            with contextlib.suppress(Exception):
                self.monitor.finish()
        for attempt in (1, 2):
            try:
                self._ender.set_terminated(self.run_id, status=status)
            except Exception as e:  # noqa: BLE001 - the run's end must not stop the stage
                if attempt == 2:
                    _warn(f"could not end MLflow run {self.run_id} as {status} ({_reason(e)})")
                    return
                time.sleep(END_RETRY_S)
            else:
                self.status = status
                return

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.finish("FINISHED" if exc_type is None else "FAILED")


def ui_address(tracker: Tracker) -> str:
    """Where the run opens in the MLflow UI (a local store: after `mlflow ui`)."""
    view = f"#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}"
    if tracker.uri.startswith(("http://", "https://")):
        return f"{tracker.uri.rstrip('/')}/{view}"
    return f"http://127.0.0.1:5000/{view} (after: mlflow ui --backend-store-uri {tracker.uri})"


def _experiment_id(client: Any, name: str, artifact_root: Path | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND[0] not in exp.tags:  # made by an older version: model training too
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    location = (artifact_root / name).as_uri() if artifact_root is not None else None
    try:
        return client.create_experiment(
            name, artifact_location=location, tags=dict([EXPERIMENT_KIND])
        )
    except MlflowException:  # created meanwhile by a parallel stage
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's live process, or not a pid we can judge
    return True


def mark_dead_runs(client: Any, experiment_id: str, keep: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs whose trainer (recorded host + pid) is dead on this host.

    Queued experiments legitimately run two trainers at once; only a run whose own process is
    gone is stale. Runs from other hosts or without the tags are left alone.
    """
    host = socket.gethostname()
    killed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'"):
        t = run.data.tags
        if run.info.run_id == keep or t.get(HOST_TAG) != host or not t.get(PID_TAG, "").isdigit():
            continue
        if not _pid_alive(int(t[PID_TAG])):
            client.set_terminated(run.info.run_id, status="KILLED")
            killed.append(run.info.run_id)
    return killed


def _last_logged_step(client: Any, run_id: str) -> int:
    """The last step at which a (killed) process of this run logged the training loss."""
    steps = [m.step for m in client.get_metric_history(run_id, TRAIN_LOSS)]
    return max(steps, default=-1)


def start_run(
    *,
    enabled: bool,
    experiment: str,
    run_id: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    root: str | os.PathLike[str] | None = None,
    registered_model: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    system_metrics: bool = False,
) -> Tracker:
    """Continue run `run_id` if it exists in the store, else start a new run.

    New runs are named after the DVC experiment (`DVC_EXP_NAME`) when there is one, else after the
    git commit (`repro@<sha>`), and tagged with the git commit and DVC baseline, so MLflow and
    `dvc exp show` point at each other. A training run (tag `stage: train`) also records its
    process (to tell a killed trainer's run later), marks dead trainers' runs KILLED, and records
    `data_dir` as its dataset input, and (`system_metrics`) CPU, memory and GPU use.
    """
    if not enabled:
        return Tracker()
    root = Path(root).resolve() if root else project_root()
    uri = tracking_uri(root)
    training = bool(tags) and tags.get("stage") == "train"
    owner = {HOST_TAG: socket.gethostname(), PID_TAG: os.getpid()} if training else {}
    try:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        from gemma3.registry import quiet_mlflow

        quiet_mlflow()
        client = MlflowClient(tracking_uri=uri)
        run = _existing_run(client, run_id, MlflowException) if run_id else None
        if run is not None:
            # A resumed training run is running again; evaluate/sample only add to it.
            first_step = 0
            if training:
                mark_dead_runs(client, run.info.experiment_id, keep=run.info.run_id)
                if run.info.status != "RUNNING":
                    client.update_run(run.info.run_id, status="RUNNING")
                first_step = _last_logged_step(client, run.info.run_id) + 1
            tracker = Tracker(
                client,
                run.info.run_id,
                uri,
                owns_run=training,
                registered_model=registered_model,
                first_step=first_step,
            )
            tracker.set_tags({**dict(tags or {}), **owner})
            tracker.experiment_id = run.info.experiment_id
            if training and system_metrics:
                tracker.monitor = _system_metrics(run.info.run_id, uri, resume=True)
            return tracker
        local = not os.environ.get("MLFLOW_TRACKING_URI")
        exp_id = _experiment_id(client, experiment, root / "mlartifacts" if local else None)
        if training:
            mark_dead_runs(client, exp_id)
        name, all_tags = _new_run_identity(root, run_name, {**dict(tags or {}), **owner})
        run = client.create_run(exp_id, run_name=name, tags=all_tags)
    except Exception as e:  # noqa: BLE001
        _warn(
            f"cannot start an MLflow run at {uri} ({_reason(e)}); "
            "continuing without tracking, curves are still in metrics/ and plots/"
        )
        return Tracker(uri=uri)
    tracker = Tracker(client, run.info.run_id, uri, registered_model=registered_model)
    tracker.experiment_id = exp_id
    if data_dir is not None:
        tracker.log_dataset(data_dir, root)
    if training and system_metrics:
        tracker.monitor = _system_metrics(run.info.run_id, uri, resume=False)
    return tracker


def _system_metrics(run_id: str, uri: str, resume: bool) -> Any:
    """MLflow's system metrics monitor (CPU, memory, disk, network; GPU with nvidia-ml-py) in a
    background thread; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL sets its period (10 s)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        interval = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or 10)
        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=interval, resume_logging=resume, tracking_uri=uri
        )
        monitor.start()
    except Exception as e:  # noqa: BLE001 - e.g. psutil missing: train without them
        _warn(f"system metrics are off ({type(e).__name__}: {str(e)[:200]})")
        return None
    return monitor


def _existing_run(client: Any, run_id: str, not_found: type[Exception]) -> Any:
    """The run `run_id` if this store has it (and it is not deleted), else None."""
    try:
        run = client.get_run(run_id)
    except not_found as e:  # unknown run id in this store: start a new run
        if getattr(e, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    return None if run.info.lifecycle_stage == "deleted" else run


def _new_run_identity(
    root: Path, run_name: str | None, tags: dict[str, Any]
) -> tuple[str | None, dict[str, str]]:
    """A new run's name (DVC experiment, else `repro@<sha>`) and its provenance tags."""
    exp_name = os.environ.get("DVC_EXP_NAME")
    commit = git_commit(root)
    all_tags = {
        "dvc.exp_name": exp_name,
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV") or commit,
        "mlflow.source.git.commit": commit,
        "mlflow.source.name": "dvc exp run" if exp_name else "dvc repro",
        "mlflow.user": user(),
        **tags,
    }
    default_name = f"repro@{commit[:7]}" if commit else None
    return run_name or exp_name or default_name, {
        k: str(v) for k, v in all_tags.items() if v is not None
    }


def leaderboard(experiment: str | None = None, limit: int = 50) -> str:
    """MLflow runs as a text table, best eval loss first: name, differing params, losses, speed."""
    import pandas as pd

    from gemma3.errors import Gemma3Error

    if experiment is None:
        params = _read_yaml(project_root() / "params.yaml")
        experiment = (params.get("tracking") or {}).get("experiment") or "gemma3-tinystories"
    uri = tracking_uri()
    db = uri.removeprefix("sqlite:///")
    if uri.startswith("sqlite:///") and not Path(db).is_file():  # do not create an empty store
        raise Gemma3Error(
            f"no MLflow store at {db}: train first (dvc repro), run from the repository root, "
            "or set MLFLOW_TRACKING_URI"
        )
    try:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise Gemma3Error(
                f"no MLflow experiment {experiment!r} at {uri} (experiments: {names}); "
                "pick one with --experiment"
            )
        df = mlflow.search_runs([exp.experiment_id], max_results=limit)
    except Gemma3Error:
        raise
    except Exception as e:  # noqa: BLE001 - a store we cannot read is the user's to fix
        raise Gemma3Error(f"cannot read MLflow runs at {uri} ({_reason(e)})") from None
    if df.empty:
        return f"no runs in experiment {experiment!r} at {uri}"
    params = [
        c for c in df.columns if c.startswith("params.") and not c.startswith("params.runtime")
    ]
    # Runs that never logged a param (a run killed early) do not make it "differ".
    differ = [c for c in params if df[c].dropna().astype(str).nunique() > 1]
    cols = {
        "tags.mlflow.runName": "run",
        **{c: c.removeprefix("params.") for c in differ},
        "metrics.best_val_loss": "best val loss",
        "metrics.eval/loss": "eval loss",
        "metrics.tokens_per_s": "tokens/s",
        "status": "status",
    }
    table = pd.DataFrame({v: df[k] if k in df else None for k, v in cols.items()})
    table = table.sort_values("eval loss", na_position="last", kind="stable")
    for c in ("best val loss", "eval loss"):
        table[c] = table[c].map(lambda x: "-" if pd.isna(x) else f"{x:.4f}")
    table["tokens/s"] = table["tokens/s"].map(lambda x: "-" if pd.isna(x) else f"{x:,.0f}")
    header = f"experiment {experiment!r} at {uri}: {len(table)} runs, best eval loss first"
    header += _champion_line(client)
    view = f"#/experiments/{df['experiment_id'].iloc[0]}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        ui = f"in the MLflow UI: {uri.rstrip('/')}/{view}"
    else:
        ui = f"in the MLflow UI: mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000/{view}"
    return header + "\n" + table.fillna("-").to_string(index=False) + "\n" + ui


def _champion_line(client: Any) -> str:
    """`\nchampion: models:/NAME@champion = version N (run R, val loss L)`, or "" if none."""
    params = _read_yaml(project_root() / "params.yaml")
    name = (params.get("tracking") or {}).get("registered_model", "gemma3-tinystories")
    if not name:
        return ""
    try:
        mv = client.get_model_version_by_alias(name, "champion")
        run = client.get_run(mv.run_id).data.tags.get("mlflow.runName", mv.run_id)
    except Exception:  # noqa: BLE001 - no registry, no model, no alias: nothing to show
        return ""
    loss = mv.tags.get("val_loss", "?")
    return (
        f"\nchampion: models:/{name}@champion = version {mv.version} (run {run}, val loss {loss})"
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, yaml.YAMLError):
        return {}
    return d if isinstance(d, dict) else {}
