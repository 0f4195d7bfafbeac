"""Run identity (issue 10, defect 1): outputs are keyed by namespace, owner UID and run, and reused
only when their cache key matches. On main a pipeline deleted and recreated with another spec (same
name, so the same run name `<name>-g1`), or the same name in another namespace, found the earlier
model under `runs/<pipeline>/<run>/train`, skipped training and evaluated the old model."""

from __future__ import annotations

import pytest
import yaml

from nmm import storage
from nmm.compile import CompileSettings
from nmm.identity import RunIdentity
from nmm.stages import train
from nmm.stages.context import OutputsConflict, StageContext
from nmm.storage import layout
from nmm_operator import builders
from tests.conftest import WORKFLOWS

QUICKSTART = yaml.safe_load((WORKFLOWS / "quickstart.yaml").read_text())


def _body(namespace: str, uid: str, seed: int = 0) -> dict:
    spec = yaml.safe_load(yaml.safe_dump(QUICKSTART["spec"]))
    spec["training"]["seed"] = seed
    return {
        "apiVersion": "nmm.dev/v1alpha1",
        "kind": "NMMPipeline",
        "metadata": {"name": "qs", "namespace": namespace, "uid": uid, "generation": 1},
        "spec": spec,
    }


def _identity_args(wf: dict) -> dict[str, str]:
    curate = next(t for t in wf["spec"]["templates"] if t["name"] == "curate")["container"]["args"]
    model_uri = next(t for t in wf["spec"]["templates"][0]["dag"]["tasks"] if t["name"] == "evaluate")
    return {
        "namespace": curate[curate.index("--namespace") + 1],
        "owner": curate[curate.index("--owner-uid") + 1],
        "model_uri": next(p["value"] for p in model_uri["arguments"]["parameters"] if p["name"] == "model_uri"),
    }


def test_a_recreated_pipeline_gets_its_own_outputs_though_its_run_has_the_same_name():
    old = builders.build_workflow(_body("team-a", "uid-old"), CompileSettings())
    new = builders.build_workflow(_body("team-a", "uid-new", seed=7), CompileSettings())
    assert old["metadata"]["name"] == new["metadata"]["name"] == "qs-g1"
    a, b = _identity_args(old), _identity_args(new)
    assert (a["owner"], b["owner"]) == ("uid-old", "uid-new")
    assert a["model_uri"] != b["model_uri"] and "uid-new" in b["model_uri"]


def test_two_namespaces_never_share_outputs_or_cache_entries():
    wa = builders.build_workflow(_body("team-a", "u1"), CompileSettings())
    wb = builders.build_workflow(_body("team-b", "u1"), CompileSettings())
    assert (wa["metadata"]["namespace"], wb["metadata"]["namespace"]) == ("team-a", "team-b")
    # Stages read the namespace the Workflow actually runs in.
    assert _identity_args(wa)["namespace"] == _identity_args(wb)["namespace"] == "{{workflow.namespace}}"
    ra, rb = RunIdentity("team-a", "qs", "u1", "qs-g1"), RunIdentity("team-b", "qs", "u1", "qs-g1")
    assert layout.stage_uri("s3://nmm", ra, "train") != layout.stage_uri("s3://nmm", rb, "train")
    assert layout.cache_index_uri("s3://nmm", "team-a", "curate", "k") != layout.cache_index_uri(
        "s3://nmm", "team-b", "curate", "k"
    )
    assert ra.key != rb.key and ra.experiment != rb.experiment


def test_a_workflow_without_an_owning_pipeline_is_its_own_owner():
    from nmm.compile import compile_pipeline
    from nmm.spec import parse_pipeline_document

    spec = parse_pipeline_document({**QUICKSTART, "metadata": {"name": "qs"}})
    assert _identity_args(compile_pipeline(spec, CompileSettings()))["owner"] == "{{workflow.uid}}"


@pytest.mark.parametrize("bad", ["", "a/b", "..", "x y", "q'uote"])
def test_an_identity_part_must_be_a_plain_name(bad):
    with pytest.raises(ValueError, match="expected a name"):
        RunIdentity("ns", "qs", bad, "qs-g1")


def _context(tmp_path, spec_seed: int) -> StageContext:
    from nmm.compile import spec_json
    from nmm.spec import parse_pipeline_document

    doc = {**QUICKSTART, "spec": _body("ns", "u", spec_seed)["spec"]}
    spec = parse_pipeline_document(doc)
    return StageContext.create(
        spec_json(spec), "ns", "u", "qs-g1", (tmp_path / "store").as_uri(), str(tmp_path / "out")
    )


def test_train_reuses_its_published_model_only_under_the_same_cache_key(tmp_path):
    dataset = (tmp_path / "store" / "dataset").as_uri()
    storage.publish(dataset, {"x": b"1"}, {"kind": "nmm.dataset", "vocab": {"text_size": 1, "image_size": 1}})
    ctx = _context(tmp_path, spec_seed=0)
    out = ctx.stage_uri("train")
    # What an earlier spec published under this identity (main returned early on any manifest).
    storage.publish(out, {"model.safetensors": b"old"}, {"kind": "nmm.model", "cache_key": "made-from-another-spec"})
    with pytest.raises(OutputsConflict, match="refusing to reuse or overwrite"):
        train.run(ctx, dataset)
    assert storage.read_bytes(storage.join(out, "model.safetensors")) == b"old"  # nothing overwritten
    # The same spec and dataset: a retry after publishing reuses the model and trains nothing.
    from nmm.data.dataset import Dataset

    storage.publish(
        out,
        {"model.safetensors": b"mine"},
        {"kind": "nmm.model", "cache_key": train.train_key(ctx, Dataset.open(dataset))},
    )
    assert train.run(ctx, dataset) == 0
    assert (tmp_path / "out" / "model_uri").read_text() == out


def test_another_spec_gets_another_train_key_and_so_checkpoints_of_its_own(tmp_path):
    from nmm.data.dataset import Dataset

    dataset = (tmp_path / "store" / "dataset").as_uri()
    storage.publish(dataset, {"x": b"1"}, {"kind": "nmm.dataset"})
    ds = Dataset.open(dataset)
    assert train.train_key(_context(tmp_path, 0), ds) != train.train_key(_context(tmp_path, 7), ds)
