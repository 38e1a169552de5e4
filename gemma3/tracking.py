"""MLflow tracking: the only module that imports mlflow.

Default store: `sqlite:///<root>/mlflow.db` with artifacts in `<root>/mlartifacts`, where root is
`DVC_ROOT` (set by DVC in every stage) or the working directory. Both are absolute on purpose:
`dvc exp run --temp/--queue` runs stages in a temporary copy that is deleted afterwards, so a
relative store or artifact location would vanish with it. `MLFLOW_TRACKING_URI` overrides the
store (a team `mlflow server`, say).

Tracking must never stop training: the first failing call prints one warning line and turns the
tracker into a no-op; the curves are still in the DVC metrics and plots files. Every HTTP call has a
short timeout and no retries, so a hung server costs seconds.

At the end of training the best checkpoint is logged as an MLflow Model (`transformers` flavour, a
text-generation pipeline) and registered as `tracking.registered_model`; a failure there is one
warning and training still succeeds.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
        """Log a file or a whole directory (under `artifact_path`/<dir name>).

        The training checkpoint (`artifact_path="checkpoint"`) is also logged as an MLflow Model
        and registered, so it can be loaded with `mlflow.pyfunc` and served.
        """
        path = Path(path)
        if path.is_dir():
            dest = f"{artifact_path}/{path.name}" if artifact_path else path.name
            self._call(
                "log_artifacts", lambda: self._client.log_artifacts(self.run_id, str(path), dest)
            )
            if artifact_path == "checkpoint" and self._client is not None:
                self.log_model(path)
        else:
            self._call(
                "log_artifact",
                lambda: self._client.log_artifact(self.run_id, str(path), artifact_path),
            )

    def log_model(self, checkpoint: str | os.PathLike[str]) -> str | None:
        """Log `checkpoint` as a transformers text-generation MLflow Model and register it.

        Returns the model URI, or None (after one warning line) when it could not be logged.
        """
        if self._client is None:
            return None
        try:
            uri = _log_transformers_model(self.uri, self.run_id, Path(checkpoint))
        except Exception as e:  # noqa: BLE001 - the checkpoint is safe in DVC; warn only
            _warn(
                f"could not log the checkpoint as an MLflow Model ({type(e).__name__}: "
                f"{str(e)[:200]}); the checkpoint files are still logged under checkpoint/"
            )
            return None
        if self.registered_model:
            self.model_version = self._register(uri, Path(checkpoint))
        return uri

    def _register(self, model_uri: str, checkpoint: Path) -> str | None:
        meta = _read_json(checkpoint / "gemma3.json")
        try:
            from mlflow.exceptions import MlflowException

            run = self._client.get_run(self.run_id)
            tags = {
                "val_loss": meta.get("val_loss"),
                "step": meta.get("step"),
                "dvc.experiment": run.data.tags.get("dvc.exp_name") or "workspace (dvc repro)",
                "git.commit": run.data.tags.get("mlflow.source.git.commit"),
            }

            try:
                self._client.create_registered_model(
                    self.registered_model,
                    description="Gemma 3 architecture trained from scratch on TinyStories "
                    "(gemma3-tinystories): a text-generation pipeline with the GPT-2 tokenizer.",
                )
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            mv = self._client.create_model_version(
                self.registered_model,
                source=model_uri,
                run_id=self.run_id,
                tags={k: str(v) for k, v in tags.items() if v is not None},
                await_creation_for=30,
            )
        except Exception as e:  # noqa: BLE001 - e.g. a server without a model registry
            _warn(
                f"could not register the model as {self.registered_model!r} at {self.uri} "
                f"({type(e).__name__}: {str(e)[:200]}); it is logged in run {self.run_id}"
            )
            return None
        self.set_tags({"registered_model": f"{self.registered_model}/{mv.version}"})
        return str(mv.version)

    def log_dataset(self, data_dir: str | os.PathLike[str], root: Path | None = None) -> None:
        """Record the training tokens as the run's dataset input (source, DVC md5, counts)."""
        if self._client is None:
            return
        info = dataset_info(Path(data_dir), root or project_root())
        if info is None:
            return

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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return d if isinstance(d, dict) else {}


def _dvc_md5(root: Path, data_dir: Path) -> str | None:
    """The md5 DVC recorded in dvc.lock for `data_dir` (an output of an earlier stage)."""
    import yaml

    try:
        rel = data_dir.resolve().relative_to(root).as_posix()
        lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, yaml.YAMLError):
        return None
    for stage in (lock or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") == rel:
                return out.get("md5")
    return None


def dataset_info(data_dir: Path, root: Path) -> dict[str, Any] | None:
    """What identifies the training data: source, DVC md5 of the tokens, token counts."""
    meta = _read_json(data_dir / "meta.json")
    if not meta:
        return None
    source = meta.get("source") or {}
    label = source.get("source", "unknown") if isinstance(source, dict) else str(source)
    if isinstance(source, dict) and source.get("revision"):
        label = f"{label}@{source['revision']}"
    md5 = _dvc_md5(root, data_dir)
    profile = {
        "source": label,
        "dvc_md5": md5,
        "train_tokens": (meta.get("train") or {}).get("tokens"),
        "validation_tokens": (meta.get("validation") or {}).get("tokens"),
        "tokenizer": meta.get("tokenizer"),
        "eot": meta.get("eot"),
    }
    name = f"tokens:{label}"[:500]
    return {
        "name": name,
        "uri": data_dir.resolve().as_uri(),
        "digest": (md5 or json.dumps(profile, sort_keys=True))[:36],
        "profile": profile,
    }


def _pip_requirements() -> list[str]:
    """What the logged pipeline needs to load: pinned to this environment, no torchvision."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "accelerate"):
        try:
            v = version(dist)
        except PackageNotFoundError:
            continue
        reqs.append(f"{dist}=={v.split('+')[0]}")
    return reqs


def _log_transformers_model(uri: str, run_id: str | None, checkpoint: Path) -> str:
    # A relative checkpoint path looks like a Hub repo id to MLflow's model-card lookup, which then
    # retries the network for ~45 s; an absolute path and offline mode keep it local.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import mlflow
    from huggingface_hub import ModelCard
    from mlflow.models import infer_signature
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    checkpoint = checkpoint.resolve()
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    card = ModelCard(
        "---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n"
        "# gemma3-tinystories\n\nGemma 3 architecture trained from scratch on TinyStories with "
        "the GPT-2 tokenizer.\n"
    )
    # Defaults for every predict(): greedy, like `gemma3 generate --temperature 0`; a request
    # overrides them with `params` (the sampling ones act only with do_sample=True).
    gen = {"max_new_tokens": 200, "do_sample": False}
    sampling = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}  # transformers' own defaults
    signature = infer_signature(
        ["Once upon a time"], ["Once upon a time ..."], params={**gen, **sampling}
    )
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):  # resumes the run; its end re-marks it terminated
        info = mlflow.transformers.log_model(
            pipe,
            name="model",
            task="text-generation",
            model_card=card,
            signature=signature,
            model_config=gen,
            pip_requirements=_pip_requirements(),
            metadata={"checkpoint": str(checkpoint)},
        )
    return info.model_uri


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
) -> Tracker:
    """Continue run `run_id` if it exists in the store, else start a new run.

    New runs are named after the DVC experiment (`DVC_EXP_NAME`) when there is one, else after the
    git commit (`repro@<sha>`), and tagged with the git commit and DVC baseline, so MLflow and
    `dvc exp show` point at each other. A training run (tag `stage: train`) also records its
    process (to tell a killed trainer's run later), marks dead trainers' runs KILLED, and records
    `data_dir` as its dataset input.
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
    if data_dir is not None:
        tracker.log_dataset(data_dir, root)
    return tracker


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
    commit = _git_commit(root)
    all_tags = {
        "dvc.exp_name": exp_name,
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV") or commit,
        "mlflow.source.git.commit": commit,
        "mlflow.source.name": "dvc exp run" if exp_name else "dvc repro",
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
    view = f"#/experiments/{df['experiment_id'].iloc[0]}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        ui = f"in the MLflow UI: {uri.rstrip('/')}/{view}"
    else:
        ui = f"in the MLflow UI: mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000/{view}"
    return header + "\n" + table.fillna("-").to_string(index=False) + "\n" + ui


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, yaml.YAMLError):
        return {}
    return d if isinstance(d, dict) else {}
