"""Shared fixtures. Servers for integration tests start once per session and always stop."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nmm.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
NMM = str(Path(sys.executable).parent / "nmm")


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def half_budget(workflow: str, path: Path) -> Path:
    """The workflow with half its training steps (gates unchanged), written to `path`: for the
    end-to-end test of `make run` (tests/e2e/conftest.quickstart_half), whose subject is the path
    through every stage and the gates; the full budget's figures are measured by `make run`
    itself (README)."""
    import yaml

    doc = yaml.safe_load((WORKFLOWS / workflow).read_text())
    for phase in doc["spec"]["training"]["phases"]:
        phase["steps"] //= 2
    path.write_text(yaml.safe_dump(doc))
    return path


def wait_for(fn, timeout: float = 30.0, what="condition"):
    """Poll `fn` until it returns something truthy (returned); `what` (or a callable giving it)
    names what was awaited in the failure."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}; last value: {last!r}")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No MLflow/S3 settings leak in from the developer's shell; NMM_HOME under tmp_path."""
    for var in ("MLFLOW_TRACKING_URI", "NMM_S3_ENDPOINT", "NMM_STORE", "NMM_S3_BUCKET", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NMM_HOME", str(tmp_path / ".nmm"))
    return tmp_path


@pytest.fixture(scope="session")
def hearing(tmp_path_factory):
    """The small model that hears and speaks spoken digits (tests.audio_fixture), trained once."""
    from tests.audio_fixture import train_small_audio_model

    return train_small_audio_model(tmp_path_factory.mktemp("hearing").as_uri())


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback, reached with the minio client as production reaches MinIO."""
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", 30, proc)
        yield {"endpoint": f"127.0.0.1:{port}", "access_key": "testing-access", "secret_key": "testing-secret"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server):
    """The real `mlflow server` (sqlite backend, artifacts proxied to the S3 stand-in)."""
    from minio import Minio

    client = Minio(
        s3_server["endpoint"],
        access_key=s3_server["access_key"],
        secret_key=s3_server["secret_key"],
        secure=False,
        region="us-east-1",
    )
    if not client.bucket_exists("mlflow"):
        client.make_bucket("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "MLFLOW_S3_ENDPOINT_URL": f"http://{s3_server['endpoint']}",
            "AWS_ACCESS_KEY_ID": s3_server["access_key"],
            "AWS_SECRET_ACCESS_KEY": s3_server["secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
    )
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            "s3://mlflow/artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 90, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
