"""Faults of the tracking server: the real `mlflow server` (sqlite) on loopback, stopped while a
stage logs.

- Stopped and started again within the client's retry budget (MLflow's own backoff:
  MLFLOW_HTTP_REQUEST_MAX_RETRIES / _BACKOFF_FACTOR; here 6 tries, 1-2-4-8-16 s): the stage's
  calls wait it out and finish, and each metric is recorded exactly once.
- Stopped for longer than the budget: the call fails with a retryable TrackingError (the stage
  exits 130, Argo retries it), never a guess; nothing is half-recorded."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from nmm import exitcodes
from nmm.identity import RunIdentity
from nmm.ports import free_port
from tests.conftest import wait_http

pytestmark = pytest.mark.integration


class Server:
    def __init__(self, root):
        self.root, self.port, self.proc = root, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--default-artifact-root",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            env=env,
            stdout=open(self.root / "server.log", "ab"),
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        wait_http(f"{self.url}/health", 90, self.proc)
        return self

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def test_mlflow_down_for_a_while_then_back_the_stage_finishes_logging_once(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from nmm import lineage

    server = Server(tmp_path).start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "6")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    run = RunIdentity(namespace="ns", pipeline="outage", owner_uid="u1", run_id="r1")
    try:
        with lineage.stage_run(run, "train") as stage:
            stage.log_metrics({"train/loss": 2.0}, step=1)
            server.stop()  # the tracking server goes away mid-stage…
            back = threading.Timer(3.0, server.start)  # …and comes back a few seconds later
            back.start()
            t0 = time.monotonic()
            stage.log_metrics({"train/loss": 1.5}, step=2)  # waits it out (MLflow's backoff)
            waited = time.monotonic() - t0
            back.join()
        found = lineage.find_stage_run(run, "train")
        history = MlflowClient(server.url).get_metric_history(found.info.run_id, "train/loss")
        assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.5)]  # each exactly once
        assert found.info.status == "FINISHED" and waited >= 3.0
    finally:
        server.stop()


def test_mlflow_down_for_longer_than_the_budget_fails_retryably(tmp_path, monkeypatch):
    from nmm import lineage
    from nmm.lineage import TrackingError

    port = free_port()  # nothing listens here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    run = RunIdentity(namespace="ns", pipeline="outage", owner_uid="u1", run_id="r2")
    with pytest.raises(TrackingError) as exc:
        with lineage.stage_run(run, "train"):
            pass
    assert exc.value.retryable and exc.value.exit_code == exitcodes.TRACKING_UNAVAILABLE
