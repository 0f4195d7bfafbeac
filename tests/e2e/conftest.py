"""The quickstart run at half its training steps, once per session: `test_quickstart` checks it
end to end, and `test_byo_webdataset` uses the model it registered as its model filter."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import NMM, half_budget


def clean_env() -> dict[str, str]:
    """The developer's shell without its MLflow, store and Ray settings: embedded defaults."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "NMM_HOME", "NMM_STORE", "NMM_S3_ENDPOINT", "RAY_ADDRESS")
    }


@dataclass(frozen=True)
class QuickstartRun:
    folder: Path  # the run's working directory: .nmm/ (store, mlflow.db, runs) lies in it
    result: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def quickstart_half(tmp_path_factory) -> QuickstartRun:
    folder = tmp_path_factory.mktemp("quickstart")
    spec = half_budget("quickstart.yaml", folder / "quickstart.yaml")
    r = subprocess.run(
        [NMM, "run", str(spec)], cwd=folder, env=clean_env(), capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return QuickstartRun(folder, r)
