"""Curating users' shards through S3 (moto's server, the real minio client) on a local Ray, as the
curate stage does in a pod: every planted fault in the ledger, the same ledger as a local run,
the MLflow record (counts, grids, data card), a cache hit on rerun and a miss once a shard
changes, and clear exits for a source that names nothing or a bucket that cannot be reached."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from nmm.data import ledger
from tests import curation_fixture as fx
from tests.conftest import NMM, WORKFLOWS

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BUCKET = "byo-it"


def pipeline(uri: str) -> dict:
    """The shapes pipeline with the fixture's shards as a second source (a mixture, 3:1)."""
    doc = yaml.safe_load((WORKFLOWS / "shapes-m2m.yaml").read_text())
    doc["metadata"]["name"] = "it-byo"
    data = doc["spec"]["data"]
    data["sources"][0].update(samples=300, weight=3)
    data["sources"].append({"kind": "webdataset", "name": "web", "uri": uri, "weight": 1})
    data["curation"] = {"dedup": "near", "imageRadius": 6}
    return doc


@pytest.fixture(scope="module")
def env(s3_server, mlflow_server, tmp_path_factory):
    from minio import Minio

    mc = Minio(
        s3_server["endpoint"],
        access_key=s3_server["access_key"],
        secret_key=s3_server["secret_key"],
        secure=False,
        region="us-east-1",
    )
    if not mc.bucket_exists(BUCKET):
        mc.make_bucket(BUCKET)
    import io

    for name, data in fx.shards().items():
        mc.put_object(BUCKET, f"web/{name}", io.BytesIO(data), len(data))
    tmp = tmp_path_factory.mktemp("byo")
    e = dict(os.environ)
    e.update(
        {
            "MLFLOW_TRACKING_URI": mlflow_server,
            "NMM_S3_ENDPOINT": f"http://{s3_server['endpoint']}",
            "NMM_S3_ACCESS_KEY": s3_server["access_key"],
            "NMM_S3_SECRET_KEY": s3_server["secret_key"],
            "NMM_S3_BUCKET": BUCKET,
            "NMM_HOME": str(tmp / ".nmm"),
        }
    )
    e.pop("NMM_STORE", None)
    return {"env": e, "tmp": tmp, "mc": mc}


def stage(env, doc: dict, run_id: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = env["tmp"] / run_id
    out.mkdir(exist_ok=True)
    r = subprocess.run(
        [
            NMM,
            "stage",
            "curate",
            "--spec",
            json.dumps(doc),
            "--namespace",
            "it",
            "--owner-uid",
            "uid-1",
            "--run-id",
            run_id,
            "--store",
            f"s3://{BUCKET}",
            "--outputs",
            str(out),
        ],
        env=env["env"],
        cwd=env["tmp"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    outputs = {p.name: p.read_text() for p in out.iterdir()} if r.returncode == 0 else {}
    return r, outputs


@pytest.fixture(scope="module")
def first(env):
    r, outputs = stage(env, pipeline(f"s3://{BUCKET}/web/shard-{{000000..000002}}.tar"), "run-1")
    assert r.returncode == 0, r.stdout + r.stderr
    return outputs


def s3_env(env, monkeypatch) -> None:
    """This process reaches the bucket as the stage did (for this test only)."""
    for k, v in env["env"].items():
        if k.startswith("NMM_S3"):
            monkeypatch.setenv(k, v)


def test_the_ledger_in_the_bucket_has_every_planted_reason_and_keeps_the_clean(env, first, monkeypatch):
    from nmm import storage

    s3_env(env, monkeypatch)
    uri = first["dataset_uri"]
    manifest = storage.read_manifest(uri)
    rows = {r["key"]: r for r in ledger.from_bytes(storage.read_file(uri, manifest, ledger.FILE)).to_pylist()}
    for key, (reason, dup_of) in fx.EXPECTED.items():
        assert rows[key]["reason"] == reason, key
        assert rows[key]["duplicate_of"] == dup_of
    assert all(rows[k]["decision"] == "keep" for k in fx.CLEAN_KEYS)
    assert {r["source"] for r in rows.values()} == {"shapes", "web"}
    assert manifest["mixture"] == {"shapes": 0.75, "web": 0.25}
    assert manifest["curation"]["counts"]["sources"]["web"]["kept"] == len(fx.CLEAN_KEYS)


def test_mlflow_has_the_counts_the_grids_and_the_data_card(env, first):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["env"]["MLFLOW_TRACKING_URI"])
    (run,) = [
        r
        for r in client.search_runs([client.get_experiment_by_name("it/it-byo").experiment_id])
        if r.data.tags.get("nmm.stage") == "curate" and r.data.tags.get("nmm.cache") == "miss"
    ]
    m = run.data.metrics
    assert m["curate.kept"] == m["curate.source.shapes.kept"] + len(fx.CLEAN_KEYS)
    assert m["curate.dropped.decode_error"] == 6 and m["curate.dropped.near_duplicate"] >= 3
    assert m["curate.mixture.web"] == 0.25 and "curate.leakage.naive_test_with_train_near_duplicate" in m
    names = {a.path for a in client.list_artifacts(run.info.run_id, "curate")}
    assert "curate/datacard.md" in names
    grids = {a.path for a in client.list_artifacts(run.info.run_id, "curate/examples")}
    shown = (
        "keep",
        "exact_duplicate",
        "near_duplicate",
        "caption_near_duplicate",
        "blank_image",
        "caption_empty",
        "caption_length",
    )
    assert {f"curate/examples/{name}.png" for name in shown} <= grids  # decode errors have no picture to show
    card = open(client.download_artifacts(run.info.run_id, "curate/datacard.md")).read()
    assert f"s3://{BUCKET}/web/shard-{{000000..000002}}.tar" in card and "Leakage" in card


def test_a_rerun_is_a_cache_hit_and_a_changed_shard_is_not(env, first):
    import io

    doc = pipeline(f"s3://{BUCKET}/web/shard-{{000000..000002}}.tar")
    r, again = stage(env, doc, "run-2")
    assert r.returncode == 0 and again["cache"] == "hit" and again["dataset_uri"] == first["dataset_uri"]
    data = fx.shards()["shard-000002.tar"] + b"\0" * 1024  # same samples, different object (ETag)
    env["mc"].put_object(BUCKET, "web/shard-000002.tar", io.BytesIO(data), len(data))
    r, changed = stage(env, doc, "run-3")
    assert r.returncode == 0 and changed["cache"] == "miss", r.stderr


def test_a_glob_that_matches_nothing_exits_2_and_an_unreachable_store_129(env):
    r, _ = stage(env, pipeline(f"s3://{BUCKET}/nothing/*.tar"), "run-4")
    assert r.returncode == 2 and "data.sources[web].uri" in r.stderr and "matches no .tar shards" in r.stderr
    assert "Traceback" not in r.stderr
    # (two retries, not five: the backoff itself is tests/faults/test_store_faults.py's subject)
    down = dict(env, env=env["env"] | {"NMM_S3_ENDPOINT": "http://127.0.0.1:9", "NMM_S3_RETRIES": "2"})
    r, _ = stage(down, pipeline(f"s3://{BUCKET}/web/*.tar"), "run-5")
    assert r.returncode == 129 and "Traceback" not in r.stderr, r.stderr


def test_ray_and_a_plain_loop_decide_the_same_ledger_bytes(env, first, monkeypatch):
    """Ray's parallelism and block order change nothing: the ledger of the shards in the bucket,
    examined on Ray (one unit a shard, so three tasks race) and in a plain loop, is the same bytes;
    and tokenizing on Ray (several batches) and in the loop gives the same codes and token ids."""
    import numpy as np

    from nmm.data import dedup, ray_transforms, readers, stream, userdata
    from nmm.data.examine import Settings
    from nmm.spec.data import Source
    from nmm.tokenizers.image import PatchVQ
    from nmm.tokenizers.text import TextTokenizer

    s3_env(env, monkeypatch)  # before Ray starts: its workers inherit this env
    src = Source(kind="webdataset", name="web", uri=f"s3://{BUCKET}/web/shard-{{000000..000002}}.tar")
    units, _ = readers.units(src)
    units = [
        readers.Unit(i, u.source, u.kind, (uri,))
        for i, (u, uri) in enumerate((u, uri) for u in units for uri in u.uris)
    ]
    got = []
    try:
        for engine in ("ray", "loop"):
            ex = stream.examine(units, Settings(32, 3, userdata.Limits(), {"web": None}), engine=engine)
            d = dedup.decide(ex.cols, "near", radius=6, caption_dedup=True, threshold=0.9, train=0.7, val=0.1)
            got.append(ledger.to_bytes(ledger.table(ex.cols, d)))
            stream.cleanup(ex)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (600, 16, 16, 3), dtype=np.uint8)
        texts = [[f"a photo of {i % 7} things", f"number {i}"] for i in range(len(images))]
        vq = PatchVQ.fit(images, 4, 16).to_bytes()
        text = TextTokenizer.train("bpe", [t for pair in texts for t in pair], 64).to_bytes()
        tokenized = [
            ray_transforms.tokenize_samples(images, texts, vq, text, engine=e, batch_size=128) for e in ("ray", "loop")
        ]
    finally:
        ray_transforms.shutdown()
    assert len(units) == 3 and got[0] == got[1]
    (ray_codes, ray_ids), (loop_codes, loop_ids) = tokenized
    assert ray_codes.shape == (600, 16) and ray_codes.dtype == loop_codes.dtype == np.int32
    assert np.array_equal(ray_codes, loop_codes) and ray_ids == loop_ids and len(ray_ids[0]) == 2


def test_a_source_that_keeps_nothing_exits_2_with_the_reasons(env):
    import io

    import numpy as np

    blank = fx.encode(np.full((64, 64, 3), 128, np.uint8))
    shard = fx.tar([(f"blank-{i}", {"png": blank, "txt": fx.caption(i).encode()}) for i in range(5)])
    env["mc"].put_object(BUCKET, "blank/shard-000000.tar", io.BytesIO(shard), len(shard))
    r, _ = stage(env, pipeline(f"s3://{BUCKET}/blank/*.tar"), "run-6")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "['web'] kept no samples" in r.stderr and "'blank_image': 5" in r.stderr
