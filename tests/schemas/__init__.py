"""Validators for custom resources, built from the upstream CRD schemas copied into this folder.

The API server prunes fields a structural schema does not list (silently dropping them), so a
compiler bug that emits a misspelt field would go unnoticed on a cluster. These validators close
every object that lists `properties` and does not set `x-kubernetes-preserve-unknown-fields`, so
unknown fields fail here instead.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import jsonschema
import yaml

HERE = Path(__file__).parent
ARGO_WORKFLOW = HERE / "argo-workflows-v4.1.2-workflows.yaml"
PYTORCHJOB = HERE / "kubeflow-training-v1.9.4-pytorchjobs.yaml"
RAYJOB = HERE / "kuberay-v1.7.0-rayjobs.yaml"


def _close(schema):
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            schema["additionalProperties"] = False
        if schema.get("x-kubernetes-int-or-string"):
            schema.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        for v in schema.values():
            _close(v)
    elif isinstance(schema, list):
        for v in schema:
            _close(v)
    return schema


@lru_cache(maxsize=None)
def crd_validator(path: Path, version: str) -> jsonschema.Draft7Validator:
    crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
    ver = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = _close(copy.deepcopy(ver["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft7Validator(schema)


def crd_errors(path: Path, version: str, obj: dict) -> list[str]:
    v = crd_validator(path, version)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(obj)]


INFERENCE_SERVICE = HERE / "kserve-v0.20.0-inferenceservices.yaml"
CLUSTER_SERVING_RUNTIME = HERE / "kserve-v0.20.0-clusterservingruntimes.yaml"
HTTP_ROUTE = HERE / "gateway-api-v1.6.1-httproutes.yaml"
SERVICE_MONITOR = HERE / "prometheus-operator-v0.93.0-servicemonitors.yaml"
KUEUE_CLUSTER_QUEUE = HERE / "kueue-v0.19.2-clusterqueues.yaml"
KUEUE_LOCAL_QUEUE = HERE / "kueue-v0.19.2-localqueues.yaml"
KUEUE_RESOURCE_FLAVOR = HERE / "kueue-v0.19.2-resourceflavors.yaml"
KUEUE_PRIORITY_CLASS = HERE / "kueue-v0.19.2-workloadpriorityclasses.yaml"
