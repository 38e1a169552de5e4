"""MLflow tracking: a dead or hung server never stops training and costs one short timeout; runs
of killed trainers are closed; resumed runs never log a step twice; the logged MLflow Model predicts
and serves the same greedy story as `gemma3 generate`."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from gemma3.tracking import flatten, start_run, tracking_uri
from tests.conftest import Trained
from tests.dvcrepo import PROMPT, free_port, greedy_cli, read_json, tool_env
from tests.project import TINY_TRAIN, env, stage_cmd, write_params, write_tokens


def test_flatten_and_default_store(monkeypatch, tmp_path: Path) -> None:
    assert flatten({"train": {"lr": 0.001, "betas": [0.9, 0.95]}, "seed": 1, "o": {}}) == {
        "train.lr": "0.001",
        "train.betas": "[0.9, 0.95]",
        "seed": "1",
        "o": "{}",
    }
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team-server:5000")
    assert tracking_uri() == "http://team-server:5000"


def test_dead_tracking_server_warns_once_and_training_completes(tmp_path: Path) -> None:
    write_params(
        tmp_path, tracking={"enabled": True, "experiment": "down"}, train={"max_steps": 10}
    )
    write_tokens(tmp_path)
    e = env()
    e["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for stage in ("train", "evaluate"):
        proc = subprocess.run(
            stage_cmd(stage), cwd=tmp_path, env=e, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        warnings = [line for line in proc.stderr.splitlines() if "tracking: warning" in line]
        assert len(warnings) == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    m = read_json(tmp_path / "metrics/train.json")
    assert m["train"]["steps"] == 10 and m["train"]["best_val_loss"] is not None
    assert "mlflow" not in m  # no run: no run id
    with open(tmp_path / "plots/train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(
        range(TINY_TRAIN["log_interval"], 10 + 1, TINY_TRAIN["log_interval"])
    )
    assert read_json(tmp_path / "metrics/eval.json")["eval"]["loss"] > 0


class HungServer:
    """Accepts TCP connections and never answers: a tracking server that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.connections:
            c.close()


def test_hung_tracking_server_costs_one_short_timeout_per_stage(tmp_path: Path) -> None:
    write_params(
        tmp_path, tracking={"enabled": True, "experiment": "hung"}, train={"max_steps": 10}
    )
    write_tokens(tmp_path)
    server = HungServer()
    try:
        e = env()
        e.pop("MLFLOW_HTTP_REQUEST_TIMEOUT", None)
        e.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        e["MLFLOW_TRACKING_URI"] = server.url
        for stage in ("train", "evaluate"):
            before = len(server.connections)
            proc = subprocess.run(
                stage_cmd(stage), cwd=tmp_path, env=e, capture_output=True, text=True, timeout=600
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            warnings = [line for line in proc.stderr.splitlines() if "tracking: warning" in line]
            assert len(warnings) == 1, proc.stderr[-3000:]
            # One request, given up after the short read timeout, never retried.
            assert "did not answer within 5 s" in warnings[0], warnings[0]
            assert len(server.connections) - before == 1
    finally:
        server.close()
    assert "mlflow" not in read_json(tmp_path / "metrics/train.json")


def test_tracking_disabled_writes_no_store_and_no_run(tmp_path: Path) -> None:
    write_params(tmp_path, tracking={"enabled": False}, train={"max_steps": 10})
    write_tokens(tmp_path)
    e = env()
    e.pop("MLFLOW_TRACKING_URI", None)
    for stage in ("train", "evaluate"):
        proc = subprocess.run(
            stage_cmd(stage), cwd=tmp_path, env=e, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "tracking" not in proc.stderr and "mlflow" not in proc.stderr.lower()
    assert "mlflow" not in read_json(tmp_path / "metrics/train.json")
    assert set(read_json(tmp_path / "metrics/eval.json")) == {"eval"}
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_runs_of_dead_trainers_are_marked_killed_live_ones_are_not(
    tmp_path: Path, monkeypatch
) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(tmp_path)
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("k", artifact_location=(tmp_path / "art").as_uri())
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        owners = {
            "dead": {"gemma3.host": host, "gemma3.pid": str(_dead_pid())},
            "live": {"gemma3.host": host, "gemma3.pid": str(live.pid)},  # a queued twin
            "other-host": {"gemma3.host": host + "-elsewhere", "gemma3.pid": str(_dead_pid())},
            "untagged": {},
        }
        ids = {n: client.create_run(exp, run_name=n, tags=t).info.run_id for n, t in owners.items()}
        tracker = start_run(
            enabled=True, experiment="k", root=tmp_path, tags={"stage": "train"}, run_name="new"
        )
        status = {n: client.get_run(i).info.status for n, i in ids.items()}
        assert status == {
            "dead": "KILLED",
            "live": "RUNNING",
            "other-host": "RUNNING",
            "untagged": "RUNNING",
        }
        new = client.get_run(tracker.run_id)
        assert new.data.tags["gemma3.pid"] == str(os.getpid())
        tracker.finish()
    finally:
        live.kill()
        live.wait()


def test_a_resumed_run_never_logs_a_step_twice(tmp_path: Path, monkeypatch) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = start_run(enabled=True, experiment="r", root=tmp_path, tags={"stage": "train"})
    for step in (3, 6, 9):  # killed after step 9; its last saved state was step 6
        first.log_metrics({"loss/train": 10.0 - step, "loss/val": None}, step=step)
    first._finished = True  # as after kill -9: nothing ends the run
    again = start_run(
        enabled=True, experiment="r", root=tmp_path, run_id=first.run_id, tags={"stage": "train"}
    )
    assert again.run_id == first.run_id
    for step in (9, 12):  # resumed from step 6: step 9 comes again
        again.log_metrics({"loss/train": 1.0, "loss/val": 2.0}, step=step)
    again.finish()
    client = mlflow.MlflowClient(tracking_uri(tmp_path))
    hist = client.get_metric_history(first.run_id, "loss/train")
    assert sorted((m.step, m.value) for m in hist) == [(3, 7.0), (6, 4.0), (9, 1.0), (12, 1.0)]
    assert [m.step for m in client.get_metric_history(first.run_id, "loss/val")] == [12]
    assert client.get_run(first.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_the_pipelines_registered_model_predicts_the_cli_greedy_story(trained: Trained) -> None:
    import mlflow

    expected = greedy_cli(trained.repo, 20, "--dtype", "fp32")  # the pipeline model runs in fp32
    mlflow.set_tracking_uri(f"sqlite:///{trained.repo / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/gemma3-tinystories/latest")
    assert model.predict([PROMPT], params={"max_new_tokens": 20}) == [expected]


def test_logged_model_is_registered_and_served_with_the_cli_greedy_story(
    tmp_path: Path, monkeypatch
) -> None:
    """An untrained model: its greedy text is varied gibberish, so any token mismatch shows."""
    import mlflow
    import torch

    from gemma3.config import Config
    from gemma3.hf import save_checkpoint
    from gemma3.model import Gemma3ForCausalLM

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.manual_seed(0)
    ckpt = tmp_path / "checkpoints" / "best"
    save_checkpoint(
        Gemma3ForCausalLM(Config.from_name("gemma3-tiny")), ckpt, meta={"step": 7, "val_loss": 3.25}
    )
    tracker = start_run(
        enabled=True,
        experiment="served",
        root=tmp_path,
        tags={"stage": "train"},
        registered_model="gemma3-tinystories",
    )
    tracker.log_artifact(ckpt, "checkpoint")
    tracker.finish()
    assert tracker.model_version == "1"
    uri = tracking_uri(tmp_path)
    client = mlflow.MlflowClient(uri)
    mv = client.get_model_version("gemma3-tinystories", "1")
    assert mv.run_id == tracker.run_id
    assert mv.tags["val_loss"] == "3.25" and mv.tags["step"] == "7"
    assert client.get_run(tracker.run_id).info.status == "FINISHED"

    expected = greedy_cli(tmp_path, 20, "--model", str(ckpt), "--dtype", "fp32")  # as served
    assert len(set(expected.removeprefix(PROMPT).split())) > 3  # not one repeated token

    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    serve = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/gemma3-tinystories/1",
            "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        cwd=tmp_path, env=tool_env(MLFLOW_TRACKING_URI=uri), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        body = json.dumps({"inputs": [PROMPT], "params": {"max_new_tokens": 20}}).encode()
        answer = None
        for _ in range(600):
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    answer = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.5)
        assert answer == {"predictions": [expected]}, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()
        log.close()


def test_model_logging_or_registry_failures_warn_once_and_the_run_succeeds(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import mlflow
    import torch

    from gemma3.config import Config
    from gemma3.hf import save_checkpoint
    from gemma3.model import Gemma3ForCausalLM

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.manual_seed(0)
    good, broken = tmp_path / "good" / "best", tmp_path / "broken" / "best"
    for d in (good, broken):
        save_checkpoint(Gemma3ForCausalLM(Config.from_name("gemma3-tiny")), d, meta={"step": 1})
    (broken / "vocab.json").unlink()  # no tokenizer: the pipeline cannot be built

    client = mlflow.MlflowClient(tracking_uri(tmp_path))
    cases = {
        # A name the registry refuses stands in for a server without a model registry.
        "registry": (good, "team/gemma3", "could not register the model as 'team/gemma3'"),
        "model": (broken, "gemma3-tinystories", "could not log the checkpoint as an MLflow Model"),
    }
    for name, (ckpt, registered, warning) in cases.items():
        capsys.readouterr()
        tracker = start_run(
            enabled=True, experiment=name, root=tmp_path, tags={"stage": "train"},
            registered_model=registered,
        )  # fmt: skip
        tracker.log_artifact(ckpt, "checkpoint")
        tracker.log_metrics({"best_val_loss": 1.5}, step=1)  # tracking goes on after the warning
        tracker.finish()
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "tracking: warning" in line]
        assert len(lines) == 1 and warning in lines[0], err
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["best_val_loss"] == 1.5
        files = [f.path for f in client.list_artifacts(tracker.run_id, "checkpoint/best")]
        assert "checkpoint/best/model.safetensors" in files
        assert tracker.model_version is None
    assert client.search_registered_models() == []
