"""The whole pipeline (fewer steps) against a real `mlflow server` and an S3 server on loopback:
lineage through the MLflow client, objects through the minio client, curate cached on rerun."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import NMM, WORKFLOWS

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BUCKET = "nmm-it"


def small_pipeline(tmp_path: Path) -> Path:
    doc = yaml.safe_load((WORKFLOWS / "quickstart.yaml").read_text())
    doc["metadata"]["name"] = "it-quickstart"
    doc["spec"]["training"]["phases"][0].update(steps=20, warmupSteps=5)  # pretrain
    doc["spec"]["training"]["phases"][1].update(steps=20, warmupSteps=2)  # sft
    doc["spec"]["training"]["checkpoint"]["intervalSteps"] = 20
    doc["spec"]["evaluation"]["generationsPerClass"] = 2
    # Gates low enough that a 40-step model passes, so rollout runs and champion moves.
    doc["spec"]["evaluation"]["gates"] = ["m2t.digits.accuracy >= 0.0", "m2g.digits.accuracy >= 0.0"]
    doc["spec"]["rollout"]["registeredModelName"] = "it-model"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, s3_server, mlflow_server):
    from minio import Minio

    tmp = tmp_path_factory.mktemp("pipeline")
    mc = Minio(
        s3_server["endpoint"],
        access_key=s3_server["access_key"],
        secret_key=s3_server["secret_key"],
        secure=False,
        region="us-east-1",
    )
    if not mc.bucket_exists(BUCKET):
        mc.make_bucket(BUCKET)
    env = dict(os.environ)
    env.update(
        {
            "MLFLOW_TRACKING_URI": mlflow_server,
            "NMM_S3_ENDPOINT": f"http://{s3_server['endpoint']}",
            "NMM_S3_ACCESS_KEY": s3_server["access_key"],
            "NMM_S3_SECRET_KEY": s3_server["secret_key"],
            "NMM_S3_BUCKET": BUCKET,
            "NMM_HOME": str(tmp / ".nmm"),
        }
    )
    env.pop("NMM_STORE", None)
    spec = small_pipeline(tmp)
    results = []
    objects_before_second = None
    for i in range(2):
        if i == 1:
            objects_before_second = sorted(o.object_name for o in mc.list_objects(BUCKET, recursive=True))
        r = subprocess.run([NMM, "run", str(spec)], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        (status,) = [
            json.loads(p.read_text())
            for p in (tmp / ".nmm" / "runs").glob("*/status.json")
            if json.loads(p.read_text())["name"] not in [x["name"] for x in results]
        ]
        results.append(status)
    objects_after = sorted(o.object_name for o in mc.list_objects(BUCKET, recursive=True))
    return {"results": results, "minio": mc, "tmp": tmp, "before_second": objects_before_second, "after": objects_after}


def run_prefix(objects: list[str], run: str) -> str:
    """`runs/<namespace>/<pipeline>/<owner uid>/<run>`: a local run's owner is its Workflow (a UUID)."""
    (prefix,) = {o.split(f"/{run}/")[0] + f"/{run}" for o in objects if f"/{run}/" in o}
    assert prefix.startswith("runs/default/it-quickstart/"), prefix
    return prefix


def test_both_runs_succeed_and_the_second_curate_is_a_cache_hit(runs):
    first, second = runs["results"]
    assert first["phase"] == second["phase"] == "Succeeded"
    assert first["steps"]["curate"]["outputs"]["cache"] == "miss"
    assert second["steps"]["curate"]["outputs"]["cache"] == "hit"
    assert second["steps"]["curate"]["outputs"]["dataset_uri"] == first["steps"]["curate"]["outputs"]["dataset_uri"]


def test_rerun_of_curation_writes_no_new_dataset_objects_r20(runs):
    second = runs["results"][1]["name"]
    new = {o for o in set(runs["after"]) - set(runs["before_second"]) if "/logs/" not in o}  # logs are not data
    assert not [o for o in new if "/curate/" in o or o.startswith("cache/")], sorted(new)
    assert not [o for o in new if o.startswith(f"{run_prefix(runs['after'], second)}/curate")]


def test_shards_and_manifest_are_in_the_bucket(runs):
    mc = runs["minio"]
    uri = runs["results"][0]["steps"]["curate"]["outputs"]["dataset_uri"]
    prefix = uri.removeprefix(f"s3://{BUCKET}/")
    names = [
        o.object_name
        for o in mc.list_objects(BUCKET, prefix=prefix + "/", recursive=True)
        if "/logs/" not in o.object_name
    ]
    assert f"{prefix}/manifest.json" in names
    shards = [n for n in names if "/shards/" in n and n.endswith(".safetensors")]
    assert {s.split("/shards/")[1].split("-")[0] for s in shards} == {"train", "val", "test"}
    manifest = json.loads(mc.get_object(BUCKET, f"{prefix}/manifest.json").read())
    assert manifest["digest"].startswith("sha256:")
    assert sorted(manifest["files"]) == sorted(
        n.removeprefix(prefix + "/") for n in names if not n.endswith("manifest.json")
    )
    # The model folder was published the same way.
    first = run_prefix(runs["after"], runs["results"][0]["name"])
    assert mc.stat_object(BUCKET, f"{first}/train/manifest.json")
    assert mc.stat_object(BUCKET, f"{first}/train/model.safetensors")
    # Every stage archived its log next to its outputs (both train ranks too), for `nmm logs`.
    for stage, count in (("curate", 1), ("train", 2), ("evaluate", 1), ("rollout", 1), ("finalize", 1)):
        logs = list(mc.list_objects(BUCKET, prefix=f"{first}/{stage}/logs/", recursive=True))
        assert len(logs) == count, (stage, [o.object_name for o in logs])


def test_lineage_parent_and_four_stage_runs_with_dataset_metrics_and_champion(runs, mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("default/it-quickstart")  # <namespace>/<pipeline>
    first = runs["results"][0]["name"]
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`nmm.run_id` = '{first}'")
    by_stage = {r.data.tags["nmm.stage"]: r for r in found}
    assert sorted(by_stage) == ["curate", "evaluate", "pipeline", "rollout", "train", "train/pretrain", "train/sft"]
    parent = by_stage.pop("pipeline")
    # Each training phase is a run nested under the train run, with its recipe and its steps.
    for phase, recipe, steps in (("pretrain", "pretrain", set(range(2, 21, 2))), ("sft", "sft", set(range(22, 41, 2)))):
        r = by_stage.pop(f"train/{phase}")
        assert r.data.tags["mlflow.parentRunId"] == by_stage["train"].info.run_id
        assert r.data.params["recipe"] == recipe and r.info.status == "FINISHED"
        assert {m.step for m in client.get_metric_history(r.info.run_id, "train/loss")} == steps
    assert parent.info.status == "FINISHED"
    for stage, r in by_stage.items():
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags["nmm.pipeline"] == "it-quickstart"
        assert r.data.tags["nmm.code_version"].startswith("0.1.0+")
        assert len(r.data.tags["nmm.cache_key"]) == 32
        assert r.info.status == "FINISHED", stage
    digest = runs["results"][0]["steps"]["curate"]["outputs"]["dataset_digest"]
    inputs = by_stage["train"].inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest == digest[-32:]
    assert inputs[0].dataset.source  # the dataset URI
    ev = by_stage["evaluate"].data.metrics
    assert 0.0 <= ev["m2t.digits.accuracy"] <= 1.0 and 0.0 <= ev["m2g.digits.accuracy"] <= 1.0
    assert "train/loss" in by_stage["train"].data.metrics
    artifacts = [a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id, "eval")]
    assert "eval/m2g_digits_grid.png" in artifacts and "eval/seesaw.png" in artifacts
    # The see-saw: understanding and generation of the step-20 snapshot and of the final model.
    for metric in ("seesaw/m2t.digits.accuracy", "seesaw/m2g.digits.accuracy"):
        history = client.get_metric_history(by_stage["evaluate"].info.run_id, metric)
        assert sorted(m.step for m in history) == [20, 40]
    final = client.get_metric_history(by_stage["evaluate"].info.run_id, "seesaw/m2t.digits.accuracy")
    assert [m.value for m in final if m.step == 40] == [ev["m2t.digits.accuracy"]]
    champion = client.get_model_version_by_alias("it-model", "champion")
    owner = champion.tags["nmm.run_id"]
    assert owner in {runs["results"][0]["name"], runs["results"][1]["name"]}
    (train_run,) = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`nmm.run_id` = '{owner}' and tags.`nmm.stage` = 'train'"
    )
    assert champion.run_id == train_run.info.run_id  # the version is linked to its train run


def test_second_run_registers_its_own_version_and_decides(runs, mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    versions = client.search_model_versions("name='it-model'")
    assert len(versions) == 2  # one per pipeline run, none duplicated
    for v in versions:
        assert v.tags["nmm.rollout.decision"] in ("promoted", "kept")
