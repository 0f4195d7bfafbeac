"""SIGTERM (what Kubernetes sends a pod it evicts) during `nmm stage train`: the process writes a
final checkpoint and exits 143, a retryable code (R17); the restarted stage resumes from it."""

import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from tests.conftest import NMM, WORKFLOWS

pytestmark = pytest.mark.integration


def small_spec() -> str:
    spec = yaml.safe_load((WORKFLOWS / "quickstart.yaml").read_text())
    spec["metadata"]["name"] = "sigterm"
    spec["spec"]["model"]["size"] = {"dim": 32, "layers": 1, "heads": 2}
    phase = spec["spec"]["training"]["phases"][0]
    phase.update(steps=600, batchSize=8, warmupSteps=10)  # logged every 30 steps
    spec["spec"]["training"]["phases"] = [phase]
    spec["spec"]["training"]["checkpoint"] = {"intervalSteps": 100_000, "keepLatest": 2}
    spec["spec"]["training"]["resources"] = {"nodes": 1, "processesPerNode": 1}
    return json.dumps(spec)


def stage(name: str, spec: str, store: str, outputs, *extra) -> list[str]:
    return [
        NMM,
        "stage",
        name,
        "--spec",
        spec,
        "--namespace",
        "default",
        "--owner-uid",
        "u1",
        "--run-id",
        "r1",
        "--store",
        store,
        "--outputs",
        str(outputs),
        *extra,
    ]


def test_sigterm_writes_a_final_checkpoint_exits_143_and_the_restart_resumes(clean_env, tmp_path):
    spec, store = small_spec(), (tmp_path / "store").as_uri()
    env = dict(os.environ)
    cur = subprocess.run(
        stage("curate", spec, store, tmp_path / "cur"), env=env, capture_output=True, text=True, timeout=300
    )
    assert cur.returncode == 0, cur.stderr[-2000:]
    dataset = (tmp_path / "cur" / "dataset_uri").read_text()
    train = stage("train", spec, store, tmp_path / "train", "--dataset-uri", dataset)
    log = tmp_path / "train.log"
    with log.open("w") as f:
        proc = subprocess.Popen(train, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and "step 210/600" not in log.read_text():
        assert proc.poll() is None, log.read_text()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-2000:]
    text = log.read_text()
    assert "SIGTERM at step" in text and "exiting 143" in text
    # The run's folder (namespace, pipeline, owner UID, run), checkpoints under the train cache key.
    (index,) = (tmp_path / "store" / "runs" / "default" / "sigterm" / "u1" / "r1" / "train" / "checkpoints").glob(
        "*/latest.json"
    )
    saved = json.loads(index.read_text())["latest"]
    assert 210 <= saved < 600  # the interval is 100,000 steps: only SIGTERM could have saved it
    assert not (tmp_path / "train" / "model_uri").exists()

    again = subprocess.run(train, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from step {saved}" in again.stderr + again.stdout
    assert (tmp_path / "train" / "model_uri").exists()
