"""The acceptance of `nmm run --resume` on the quickstart itself (a shorter budget: 60 steps, a
checkpoint every 20, two DDP ranks, no see-saw): `nmm run` killed with SIGKILL while train runs
(after its first checkpoint; the trainer's processes live on as orphans), then
`nmm run FILE --resume RUN`.

Must hold: curate is not rerun; the orphans are stopped; train resumes from its checkpoint; the
evaluation's metrics equal those of an uninterrupted run of the same spec and seed; MLflow holds
one parent run, one run per stage and one model version. (A killed DDP rank: test_rank_killed.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import NMM, WORKFLOWS, wait_for

pytestmark = pytest.mark.slow


def short_quickstart(path: Path) -> Path:
    doc = yaml.safe_load((WORKFLOWS / "quickstart.yaml").read_text())
    pretrain, sft = doc["spec"]["training"]["phases"]
    pretrain.update(steps=20, warmupSteps=5)
    sft.update(steps=40, warmupSteps=5)
    doc["spec"]["training"]["checkpoint"] = {"intervalSteps": 20, "keepLatest": 2}
    doc["spec"]["evaluation"]["gates"] = ["m2t.digits.accuracy >= 0.0", "m2g.digits.accuracy >= 0.0"]
    doc["spec"]["evaluation"]["seesaw"] = False
    path.write_text(yaml.safe_dump(doc))
    return path


def env() -> dict:
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "NMM_HOME", "NMM_STORE", "NMM_S3_ENDPOINT")
    }


def status(home: Path) -> tuple[str, dict]:
    (folder,) = (home / ".nmm" / "runs").iterdir()
    return folder.name, json.loads((folder / "status.json").read_text())


def metrics(record: dict) -> dict:
    return json.loads(record["steps"]["evaluate"]["outputs"]["metrics"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The short quickstart run straight through: its evaluation's metrics."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    spec = short_quickstart(folder / "quickstart.yaml")
    r = subprocess.run([NMM, "run", str(spec)], cwd=folder, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return metrics(status(folder)[1])


def test_a_quickstart_killed_during_train_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted):
    spec = short_quickstart(tmp_path / "quickstart.yaml")
    res = tmp_path / "res"
    res.mkdir()

    engine = subprocess.Popen(
        [NMM, "run", str(spec)], cwd=res, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    store = res / ".nmm" / "store" / "runs" / "default" / "quickstart"
    wait_for(lambda: any(store.glob("*/*/train/checkpoints/*/latest.json")), 300, "train's first checkpoint")
    engine.send_signal(signal.SIGKILL)  # the engine only: torchrun and its workers live on
    engine.wait()
    name, killed = status(res)
    assert killed["phase"] == "Running" and killed["steps"]["curate"]["phase"] == "Succeeded"
    assert [g["step"] for g in killed["groups"]] == ["train"]

    r = subprocess.run(
        [NMM, "run", str(spec), "--resume", name], cwd=res, env=env(), capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    _, resumed = status(res)
    assert resumed["phase"] == "Succeeded" and resumed["uid"] == killed["uid"] and resumed["attempt"] == 2
    assert "reused" in resumed["steps"]["curate"]["message"]  # curate not rerun
    assert len(list((res / ".nmm" / "runs" / name / "logs").glob("curate-*.log"))) == 1
    logs = "".join(p.read_text() for p in (res / ".nmm" / "runs" / name / "logs").glob("train-*.log"))
    assert "resuming from step" in logs
    assert metrics(resumed) == uninterrupted

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{res / '.nmm' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("default/quickstart")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`nmm.run_id` = '{name}'", max_results=1000)
    (parent,) = [x for x in runs if x.data.tags.get("nmm.stage") == "pipeline"]
    assert parent.info.status == "FINISHED"
    stages = sorted(
        x.data.tags["nmm.stage"] for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    )
    assert stages == ["curate", "evaluate", "rollout", "train"], stages
    assert len(client.search_model_versions("name='nmm-quickstart'")) == 1
