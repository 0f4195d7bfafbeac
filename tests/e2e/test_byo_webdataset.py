"""`make byo`'s path on a fresh checkout: the digits written as WebDataset shards into the store by
`nmm data export`, then `nmm run` of workflows/byo-webdataset.yaml (curate as a RayJob, which the
local engine runs as a local Ray process), training the quickstart's model on them at a short
budget (60 steps, gates at 0: the model and its gates are the quickstart test's subject, and
`make byo` measures the full budget's figures), through evaluate and rollout, with the ledger
next to the dataset. Then the quickstart's registered model (`tests/e2e/conftest.quickstart_half`,
as the README's example names it) filters a copy of the shards in which every tenth caption names
the wrong digit (model-based filtering): it can only catch them if the shards' images and
captions are read back in line."""

import json
import subprocess

import numpy as np
import pytest
import yaml

from tests.conftest import NMM, WORKFLOWS
from tests.e2e.conftest import clean_env

pytestmark = pytest.mark.slow


def short_byo(path):
    doc = yaml.safe_load((WORKFLOWS / "byo-webdataset.yaml").read_text())
    pretrain, sft = doc["spec"]["training"]["phases"]
    pretrain.update(steps=20, warmupSteps=5)
    sft.update(steps=40, warmupSteps=5)
    doc["spec"]["training"]["checkpoint"]["intervalSteps"] = 20
    doc["spec"]["evaluation"]["gates"] = ["m2t.digits.accuracy >= 0.0", "m2g.digits.accuracy >= 0.0"]
    doc["spec"]["evaluation"]["seesaw"] = False
    path.write_text(yaml.safe_dump(doc))
    return path


def test_byo_webdataset_trains_on_shards_in_the_store_and_filters_with_a_model(tmp_path, quickstart_half):
    env = clean_env()
    spec = short_byo(tmp_path / "byo-webdataset.yaml")
    missing = subprocess.run(
        [NMM, "run", str(spec)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert (
        missing.returncode != 0 and "matches no .tar shards" in missing.stdout + missing.stderr
    )  # no data yet: says so
    r = subprocess.run(
        [
            NMM,
            "data",
            "export",
            "--source",
            "digits",
            "--format",
            "webdataset",
            "--out",
            "store://byo/digits",
            "--shard-size",
            "500",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run([NMM, "run", str(spec)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (status,) = [
        json.loads(p.read_text())
        for p in (tmp_path / ".nmm" / "runs").glob("*/status.json")
        if json.loads(p.read_text())["phase"] == "Succeeded"
    ]
    assert status["steps"]["curate-outputs"]["outputs"]["cache"] == "miss"
    metrics = json.loads(status["steps"]["evaluate"]["outputs"]["metrics"])
    assert {"m2t.digits.accuracy", "m2g.digits.accuracy"} <= set(metrics), metrics
    assert status["steps"]["rollout"]["outputs"]["decision"] == "promoted"
    ledger = subprocess.run(
        [NMM, "data", "ledger", status["name"], "--reason", "near_duplicate", "--rows", "5"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ledger.returncode == 0 and "digits-shards" in ledger.stdout and "1797" in ledger.stdout, ledger.stdout

    _model_filter_drops_the_wrong_captions(tmp_path, env, quickstart_half.folder)


def _model_filter_drops_the_wrong_captions(tmp_path, env, quickstart):
    """The quickstart's champion, read from its MLflow registry, filters shards in this store."""
    from nmm import storage
    from nmm.data import export, ledger
    from nmm.data.sources import digit_captions, load_digits

    data = load_digits(2)
    wrong = set(range(0, len(data.images), 10))
    for i in wrong:
        other = (int(data.labels[i]) + 5) % 10
        data.captions[i] = digit_captions(other, data.images[i].tobytes(), 2)
    store = (tmp_path / ".nmm" / "store").as_uri()
    export.export_webdataset(data, storage.join(store, "byo", "mixed"), 500)
    doc = yaml.safe_load((WORKFLOWS / "byo-webdataset.yaml").read_text())
    doc["spec"]["data"]["sources"][0]["uri"] = "store://byo/mixed/*.tar"
    doc["spec"]["data"]["curation"]["modelFilter"] = {"model": "models:/nmm-quickstart@champion", "keepFraction": 0.9}
    doc["spec"]["data"].pop("ray")
    r = subprocess.run(
        [
            NMM,
            "stage",
            "curate",
            "--spec",
            json.dumps(doc),
            "--namespace",
            "default",
            "--owner-uid",
            "u1",
            "--run-id",
            "filter-1",
            "--store",
            store,
            "--outputs",
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        env=env | {"MLFLOW_TRACKING_URI": f"sqlite:///{quickstart / '.nmm' / 'mlflow.db'}"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    uri = (tmp_path / "out" / "dataset_uri").read_text()
    rows = ledger.from_bytes(storage.read_file(uri, storage.read_manifest(uri), ledger.FILE)).to_pylist()
    index = {f"shard-{i // 500:06d}.tar/digits-{i:08d}": i for i in range(len(data.images))}
    low = {index[r["key"]] for r in rows if r["reason"] == "low_alignment_score"}
    scored = [r for r in rows if r["alignment_score"] is not None]
    assert len(low) == len(scored) - int(np.ceil(0.9 * len(scored)))  # the bottom tenth, exactly
    caught = len(low & wrong) / len(wrong)
    print(f"model filter caught {caught:.2f} of the wrong captions")
    assert caught >= 0.8, f"the filter dropped {len(low & wrong)} of {len(wrong)} wrong captions"
    right = [r["alignment_score"] for r in scored if index[r["key"]] not in wrong]
    wrongs = [r["alignment_score"] for r in scored if index[r["key"]] in wrong]
    assert np.median(right) > np.median(wrongs)
