"""An ablation runs end to end on the local engine: one curate, train-<v> and evaluate-<v> per
variant (early fusion causal, on two seeds, and with bidirectional image attention, mid, late
fusion), sibling runs in MLflow with the same metrics side by side, and each variant's mean ± std
across its seeds on the pipeline's run and in `nmm run`'s table."""

import json
import os
import subprocess

import pytest
import yaml

from tests.conftest import NMM, WORKFLOWS

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_fusion_ablation_trains_and_evaluates_each_variant_side_by_side(tmp_path):
    doc = yaml.safe_load((WORKFLOWS / "fusion-ablation.yaml").read_text())
    doc["metadata"]["name"] = "it-ablation"
    doc["spec"]["model"]["size"] = {"dim": 32, "layers": 1, "heads": 2}
    doc["spec"]["model"]["encoder"] = {"dim": 16, "layers": 1, "steps": 20}
    doc["spec"]["training"]["phases"][0].update(steps=30, warmupSteps=5)
    doc["spec"]["training"]["resources"]["processesPerNode"] = 1
    doc["spec"]["training"]["checkpoint"]["intervalSteps"] = 15
    doc["spec"]["evaluation"]["gates"] = ["m2t.digits.accuracy >= 0.0"]
    doc["spec"]["evaluation"]["seesaw"] = False  # (not what this test is about)
    for v in doc["spec"]["variants"]:  # early: runs earlys0 (seed 0) and earlys1 (seed 1); the others one seed
        v["seeds"] = 2 if v["name"] == "early" else 1
    spec = tmp_path / "ablation.yaml"
    spec.write_text(yaml.safe_dump(doc))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "NMM_HOME", "NMM_STORE", "NMM_S3_ENDPOINT")
    }
    r = subprocess.run([NMM, "run", str(spec)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "evaluation across seeds: mean ± std" in r.stdout
    (status_file,) = (tmp_path / ".nmm" / "runs").glob("*/status.json")
    steps = json.loads(status_file.read_text())["steps"]
    variants = ["earlys0", "earlys1", "earlybidir", "mid", "late"]
    assert [s for s in steps if s != "finalize"] == [
        "curate",
        *[f"{s}-{v}" for v in variants for s in ("train", "evaluate")],
        "rollout",
    ]
    assert all(s["phase"] == "Succeeded" for s in steps.values())

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / '.nmm' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("default/it-ablation")
    evals = client.search_runs([exp.experiment_id], filter_string="tags.`nmm.stage` LIKE 'evaluate-%'")
    by_variant = {r.data.params["variant"]: r for r in evals}
    assert sorted(by_variant) == sorted(variants)
    for v, run in by_variant.items():
        assert run.data.params["model.fusion"] == {"earlybidir": "early", "earlys0": "early", "earlys1": "early"}.get(
            v, v
        )
        assert 0.0 <= run.data.metrics["m2t.digits.accuracy"] <= 1.0
    parents = {r.data.tags["mlflow.parentRunId"] for r in evals}
    assert len(parents) == 1  # siblings under the one pipeline run
    trains = client.search_runs([exp.experiment_id], filter_string="tags.`nmm.stage` LIKE 'train-%'")
    assert {r.data.params["model.fusion"] for r in trains if "/" not in r.data.tags["nmm.stage"]} == {
        "early",
        "mid",
        "late",
    }
    # Each variant's model folder is its own, under train-<variant>.
    # runs/<namespace>/<pipeline>/<owner uid>/<run>: a local run's owner is its Workflow (a UUID).
    (run_dir,) = (tmp_path / ".nmm" / "store" / "runs" / "default" / "it-ablation").glob(f"*/{status_file.parent.name}")
    for v in variants:
        config = json.loads((run_dir / f"train-{v}" / "config.json").read_text())
        assert config["model"]["fusion"] == {"earlybidir": "early", "earlys0": "early", "earlys1": "early"}.get(v, v)
        assert config["model"]["image_attention"] == ("bidirectional" if v == "earlybidir" else "causal")
    # The seeds' spread on the pipeline's run: early's mean is its two runs' mean (tags keep 4 decimals).
    (parent,) = [r for r in client.search_runs([exp.experiment_id], filter_string="tags.`nmm.stage` = 'pipeline'")]
    acc = [by_variant[v].data.metrics["m2t.digits.accuracy"] for v in ("earlys0", "earlys1")]
    assert abs(parent.data.metrics["early/m2t.digits.accuracy.mean"] - sum(acc) / 2) < 1e-4
    assert abs(parent.data.metrics["early/m2t.digits.accuracy.std"] - abs(acc[0] - acc[1]) / 2**0.5) < 1e-4
    assert parent.data.metrics["late/m2t.digits.accuracy.std"] == 0.0  # one seed
    seeded = {
        r.data.params["variant"]: r.data.params["training.seed"] for r in trains if "/" not in r.data.tags["nmm.stage"]
    }
    assert (seeded["earlys0"], seeded["earlys1"], seeded["late"]) == ("0", "1", "0")
    champion = client.get_model_version_by_alias("nmm-fusion-ablation", "champion")
    assert champion.tags["nmm.run_id"] == status_file.parent.name
