"""The NMMPipeline CRD: generated from the spec, checked in, structural, and accepting the examples."""

import json
import os

import jsonschema
import kubernetes_validate
import pytest
import yaml

from nmm.spec.crd import crd
from tests.conftest import ROOT, WORKFLOWS

CHECKED_IN = ROOT / "charts" / "nmm-platform" / "crds" / "nmmpipelines.nmm.dev.yaml"


def test_checked_in_crd_matches_the_spec_models():
    text = yaml.safe_dump(crd(), sort_keys=False, width=100)
    if os.environ.get("NMM_UPDATE_GOLDEN"):
        CHECKED_IN.write_text(text)
    assert CHECKED_IN.read_text() == text, "the CRD drifted from nmm.spec; run `make golden` (or `nmm crd > charts/…`)"


def test_crd_is_a_valid_apiextensions_v1_object():
    kubernetes_validate.validate(crd(), "1.33", strict=True)


def test_schema_is_structural():
    text = json.dumps(crd()["spec"]["versions"][0]["schema"])
    for banned in ('"$ref"', '"const"', '"$defs"', '"type": "null"', '"title"'):
        assert banned not in text, banned


def test_names_columns_and_status_subresource():
    spec = crd()["spec"]
    assert spec["names"]["shortNames"] == ["nmmp"] and spec["names"]["categories"] == ["nmm"]
    v = spec["versions"][0]
    assert [c["name"] for c in v["additionalPrinterColumns"]] == ["Phase", "Stage", "Champion", "Age"]
    assert v["subresources"] == {"status": {}}


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_pipelines_validate_against_the_crd_schema(path):
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.Draft4Validator(schema).validate(yaml.safe_load(path.read_text()))


def test_crd_schema_rejects_a_wrong_type():
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    doc = yaml.safe_load((WORKFLOWS / "quickstart.yaml").read_text())
    doc["spec"]["training"]["phases"][0]["steps"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(schema).validate(doc)


SERVICE_CHECKED_IN = ROOT / "charts" / "nmm-platform" / "crds" / "nmmservices.nmm.dev.yaml"
SERVICE = {
    "apiVersion": "nmm.dev/v1alpha1",
    "kind": "NMMService",
    "metadata": {"name": "digits"},
    "spec": {
        "model": {"name": "nmm-quickstart", "alias": "candidate"},
        "replicas": 2,
        "canary": {
            "steps": [{"weight": 10, "pauseSeconds": 60}, {"weight": 100}],
            "analysis": {
                "maxErrorRate": 0.01,
                "qualityProbe": {"cases": 50, "maxQualityDrop": 0.02, "casesUri": "s3://bucket/probe.jsonl"},
            },
        },
    },
}


def test_the_service_crd_is_checked_in_valid_and_accepts_a_service():
    from nmm.spec.crd import service_crd

    text = yaml.safe_dump(service_crd(), sort_keys=False, width=100)
    if os.environ.get("NMM_UPDATE_GOLDEN"):
        SERVICE_CHECKED_IN.write_text(text)
    assert SERVICE_CHECKED_IN.read_text() == text, "the NMMService CRD drifted from nmm.spec.serving; run `make golden`"
    kubernetes_validate.validate(service_crd(), "1.33", strict=True)
    v = service_crd()["spec"]["versions"][0]
    assert service_crd()["spec"]["names"]["shortNames"] == ["nmms"]
    assert [c["name"] for c in v["additionalPrinterColumns"]] == ["Model", "Stable", "Canary", "Weight", "Phase", "Age"]
    schema = v["schema"]["openAPIV3Schema"]
    jsonschema.Draft4Validator(schema).validate(SERVICE)
    bad = json.loads(json.dumps(SERVICE))
    bad["spec"]["canary"]["steps"][0]["weight"] = 150
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(schema).validate(bad)
