"""`make byo`'s job on a fresh checkout: the digits written as WebDataset shards into the store by
`nmm data export`, then `nmm run workflows/byo-webdataset.yaml` (curate as a RayJob, which the local
engine runs as a local Ray process) training the quickstart's model on them, passing its gates,
with the ledger and the data card next to the dataset."""

import json
import os
import subprocess

import pytest

from tests.conftest import NMM, WORKFLOWS

pytestmark = pytest.mark.slow


def test_byo_webdataset_trains_on_shards_in_the_store_and_passes_its_gates(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "NMM_HOME", "NMM_STORE", "NMM_S3_ENDPOINT", "RAY_ADDRESS")}
    missing = subprocess.run([NMM, "run", str(WORKFLOWS / "byo-webdataset.yaml")], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "matches no .tar shards" in missing.stdout + missing.stderr  # no data yet: says so
    r = subprocess.run([NMM, "data", "export", "--source", "digits", "--format", "webdataset", "--out", "store://byo/digits",
                        "--shard-size", "500"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([NMM, "run", str(WORKFLOWS / "byo-webdataset.yaml")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (status,) = [json.loads(p.read_text()) for p in (tmp_path / ".nmm" / "runs").glob("*/status.json")
                 if json.loads(p.read_text())["phase"] == "Succeeded"]
    assert status["steps"]["curated"]["outputs"]["cache"] == "miss"
    metrics = json.loads(status["steps"]["evaluate"]["outputs"]["metrics"])
    assert metrics["m2t.digits.accuracy"] >= 0.9 and metrics["m2g.digits.accuracy"] >= 0.8, metrics
    assert status["steps"]["rollout"]["outputs"]["decision"] == "promoted"
    ledger = subprocess.run([NMM, "data", "ledger", status["name"], "--reason", "near_duplicate", "--rows", "5"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert ledger.returncode == 0 and "digits-shards" in ledger.stdout and "1797" in ledger.stdout, ledger.stdout
