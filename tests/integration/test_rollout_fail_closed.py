"""Rollout fails closed (issue 10, defect 2): only MLflow's "does not exist" means "no champion";
an outage or any other failure stops the stage with a retryable exit code and moves no alias.
Against MLflow's real sqlite store, and against a tracking server that does not answer."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, PERMISSION_DENIED

from nmm import exitcodes, lineage, storage
from nmm.compile import spec_json
from nmm.ports import free_port
from nmm.spec import parse_pipeline
from nmm.stages import rollout
from nmm.stages.context import StageContext
from tests.conftest import NMM, WORKFLOWS

pytestmark = pytest.mark.integration
MODEL = "nmm-quickstart"
GOOD = {"m2t.digits.accuracy": 0.97, "m2g.digits.accuracy": 0.99}
POOR = {"m2t.digits.accuracy": 0.05, "m2g.digits.accuracy": 0.05}


def _context(tmp_path, run_id: str, owner: str = "uid-1", namespace: str = "default") -> StageContext:
    spec = parse_pipeline((WORKFLOWS / "quickstart.yaml").read_text())
    store = (tmp_path / "store").as_uri()
    return StageContext.create(spec_json(spec), namespace, owner, run_id, store, str(tmp_path / f"out-{run_id}"))


def _published_model(ctx: StageContext, tmp_path, digest_seed: bytes) -> str:
    """A model folder as the train stage publishes it (the MLflow source is a plain folder)."""
    source = tmp_path / f"mlmodel-{ctx.run.owner_uid}-{ctx.run_id}"
    source.mkdir()
    uri = ctx.stage_uri("train")
    storage.publish(
        uri,
        {"model.safetensors": digest_seed},
        {"kind": "nmm.model", "mlflow_model_uri": source.as_uri(), "cache_key": "k"},
    )
    return uri


def _rollout(ctx, tmp_path, metrics: dict, seed: bytes) -> str:
    uri = _published_model(ctx, tmp_path, seed)
    rollout.run(ctx, uri, json.dumps(metrics), "pass")
    return (ctx.outputs / "decision").read_text()


def test_an_mlflow_failure_while_reading_the_champion_promotes_nothing(clean_env, tmp_path, monkeypatch):
    first = _context(tmp_path, "qs-aaaaa")
    assert _rollout(first, tmp_path, GOOD, b"good") == "promoted"
    champion = lineage.alias_version(MODEL, "champion").version

    # The registry fails (as an outage or a permission error does) when asked for the champion.
    from mlflow.tracking import MlflowClient

    def broken(self, name):
        raise MlflowException("connection reset by peer", error_code=INTERNAL_ERROR)

    monkeypatch.setattr(MlflowClient, "get_registered_model", broken)
    second = _context(tmp_path, "qs-bbbbb")
    with pytest.raises(lineage.TrackingError) as exc:
        _rollout(second, tmp_path, POOR, b"poor")
    assert exc.value.exit_code == exitcodes.TRACKING_UNAVAILABLE and exitcodes.is_retryable(exc.value.exit_code)
    monkeypatch.undo()
    assert lineage.alias_version(MODEL, "champion").version == champion  # the 0.05 model was not promoted


def test_reading_the_champion_through_an_outage_is_an_error_never_none(clean_env, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    def down(*args, **kwargs):
        raise MlflowException("API request failed: connection refused", error_code=INTERNAL_ERROR)

    def denied(*args, **kwargs):
        raise MlflowException("not allowed", error_code=PERMISSION_DENIED)

    for method in ("get_registered_model", "get_model_version_by_alias"):
        monkeypatch.setattr(MlflowClient, method, down)
    with pytest.raises(lineage.TrackingError) as exc:
        lineage.alias_version(MODEL, "champion")
    assert exc.value.retryable
    for method in ("get_registered_model", "get_model_version_by_alias"):
        monkeypatch.setattr(MlflowClient, method, denied)
    with pytest.raises(lineage.TrackingError) as exc:
        lineage.alias_version(MODEL, "champion")
    assert not exc.value.retryable and not exitcodes.is_retryable(exc.value.exit_code)


def test_no_champion_is_only_what_mlflow_says_does_not_exist(clean_env, tmp_path):
    assert lineage.alias_version("never-registered", "champion") is None
    ctx = _context(tmp_path, "qs-ccccc")
    _published_model(ctx, tmp_path, b"x")
    assert lineage.alias_version(MODEL, "champion") is None  # model registered by nobody yet


def test_a_retried_rollout_reuses_its_version_but_never_one_of_another_model(clean_env, tmp_path):
    ctx = _context(tmp_path, "qs-ddddd")
    uri = _published_model(ctx, tmp_path, b"v1")
    rollout.run(ctx, uri, json.dumps(GOOD), "pass")
    rollout.run(ctx, uri, json.dumps(GOOD), "pass")  # a retry: the same version, no duplicate
    versions = [v for v in _versions() if v.tags.get("nmm.run_id") == "qs-ddddd"]
    assert len(versions) == 1
    # Same run identity, another model (digest): a conflict, not a silent reuse.
    storage.publish(
        uri,
        {"model.safetensors": b"v2"},
        {"kind": "nmm.model", "mlflow_model_uri": (tmp_path / "mlmodel-uid-1-qs-ddddd").as_uri(), "cache_key": "k"},
    )
    with pytest.raises(lineage.RegistryConflict):
        rollout.run(ctx, uri, json.dumps(GOOD), "pass")


def test_the_same_run_name_of_a_recreated_pipeline_registers_its_own_version(clean_env, tmp_path):
    old = _context(tmp_path, "qs-g1", owner="uid-old")
    _rollout(old, tmp_path, GOOD, b"old")
    new = _context(tmp_path, "qs-g1", owner="uid-new")  # deleted and recreated: same name, generation 1
    _rollout(new, tmp_path, GOOD, b"new")
    owners = sorted(v.tags["nmm.run_key"] for v in _versions() if v.tags.get("nmm.run_id") == "qs-g1")
    assert owners == ["default/quickstart/uid-new/qs-g1", "default/quickstart/uid-old/qs-g1"]


def test_a_registered_model_belongs_to_its_namespace_and_another_s_pipeline_is_refused(clean_env, tmp_path):
    """Issue 27 item 8: on main two namespaces using one registeredModelName moved each other's champion."""
    from mlflow.tracking import MlflowClient

    assert _rollout(_context(tmp_path, "qs-a1", namespace="team-a"), tmp_path, GOOD, b"a1") == "promoted"
    client = MlflowClient(lineage.tracking_uri())
    assert client.get_registered_model(MODEL).tags["nmm.namespace"] == "team-a"
    with pytest.raises(lineage.ForeignModel, match="belongs to namespace 'team-a', not 'team-b'"):
        _rollout(_context(tmp_path, "qs-b1", owner="uid-b", namespace="team-b"), tmp_path, GOOD, b"b1")
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"  # team-b moved nothing
    assert [str(v.version) for v in _versions()] == ["1"]  # and registered nothing
    assert _rollout(_context(tmp_path, "qs-a2", namespace="team-a"), tmp_path, GOOD, b"a2") == "promoted"


def test_a_model_registered_before_owners_were_recorded_is_claimed_by_its_first_writer(clean_env, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(lineage.tracking_uri())
    client.create_registered_model(MODEL)  # as an older nmm left it: no owner
    lineage.check_owner(MODEL, "team-a")
    assert client.get_registered_model(MODEL).tags["nmm.namespace"] == "team-a"
    with pytest.raises(lineage.ForeignModel):
        lineage.check_owner(MODEL, "team-b")


def _versions():
    from mlflow.tracking import MlflowClient

    return MlflowClient(lineage.tracking_uri()).search_model_versions(f"name='{MODEL}'")


def test_mlflow_down_during_rollout_exits_retryable_with_no_traceback(clean_env, tmp_path):
    ctx = _context(tmp_path, "qs-eeeee")
    uri = _published_model(ctx, tmp_path, b"m")
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    spec = spec_json(ctx.spec)
    r = subprocess.run(
        [
            NMM,
            "stage",
            "rollout",
            "--spec",
            spec,
            "--namespace",
            "default",
            "--owner-uid",
            "uid-1",
            "--run-id",
            "qs-eeeee",
            "--store",
            ctx.store,
            "--outputs",
            str(tmp_path / "o"),
            "--model-uri",
            uri,
            "--metrics",
            json.dumps(GOOD),
            "--gate",
            "pass",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == exitcodes.TRACKING_UNAVAILABLE, r.stdout + r.stderr
    assert "MLflow: cannot" in r.stderr and "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "o" / "decision").exists()
