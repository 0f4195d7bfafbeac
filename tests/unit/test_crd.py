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
