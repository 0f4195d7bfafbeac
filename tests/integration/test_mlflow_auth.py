"""MLflow behind its basic-auth app, as the chart deploys it (`--app-name basic-auth`, the admin
bootstrapped from env, the auth database in the config file): the real server on loopback.

Must hold: nmm's lineage signs in with MLFLOW_TRACKING_USERNAME/PASSWORD (what the chart's
secretKeyRefs set) and records a stage run; without credentials, or with wrong ones, every call
is refused as TRACKING_DENIED (exit 4, not retried), and nothing is recorded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nmm import exitcodes
from nmm.identity import RunIdentity
from nmm.ports import free_port
from tests.conftest import wait_http

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-auth")
    ini = root / "basic_auth.ini"
    ini.write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = free_port()
    env = dict(
        os.environ,
        MLFLOW_AUTH_CONFIG_PATH=str(ini),
        MLFLOW_AUTH_ADMIN_USERNAME="nmm-admin",
        MLFLOW_AUTH_ADMIN_PASSWORD="s3cret-for-tests",
        MLFLOW_BACKEND_STORE_URI=f"sqlite:///{root / 'mlflow.db'}",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_FLASK_SERVER_SECRET_KEY="csrf-key-for-tests",
    )
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--app-name",
            "basic-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--default-artifact-root",
            str(root / "artifacts"),
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
        proc.wait(timeout=15)
        log.close()


def stage(monkeypatch, uri: str, user: str | None, password: str | None):
    from nmm import lineage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    run = RunIdentity(namespace="ns", pipeline="auth", owner_uid="u1", run_id=f"r-{user}-{password}")
    with lineage.stage_run(run, "curate") as s:
        s.log_metrics({"rows": 3.0})
    return lineage.find_stage_run(run, "curate")


def test_the_platform_signs_in_and_nobody_else_gets_in(auth_server, monkeypatch):
    from nmm.lineage import TrackingError

    found = stage(monkeypatch, auth_server, "nmm-admin", "s3cret-for-tests")
    assert found is not None
    for user, password in ((None, None), ("nmm-admin", "wrong"), ("intruder", "s3cret-for-tests")):
        with pytest.raises(TrackingError) as exc:
            stage(monkeypatch, auth_server, user, password)
        assert exc.value.exit_code == exitcodes.TRACKING_DENIED and not exc.value.retryable, str(exc.value)
