"""The NMMPipeline and NMMService CustomResourceDefinitions, generated from the pydantic models (no I/O).

Pydantic's JSON Schema becomes a Kubernetes *structural* schema: `$ref`s inlined, `X | None`
as `nullable`, `const` as a one-value `enum`, numeric `exclusiveMinimum/Maximum` as OpenAPI v3.0
booleans, titles and defaults dropped (the operator applies defaults by parsing with pydantic,
and reports unknown fields as a Failed condition — the API server would only prune them).
"""

from __future__ import annotations

from nmm.spec.models import API_VERSION, PipelineBody
from nmm.spec.serving import ServiceBody

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "nmmpipelines"
ANNOTATION_RETRY = (
    "nmm.dev/retry"  # `nmm retry NAME -n NS`: any new value asks the operator to retry the failed Workflow
)
SERVICE_PLURAL = "nmmservices"
# Not allowed in a structural schema. propertyNames (the allowed keys of a map such as
# lossWeights) is enforced by the operator's pydantic validation instead.
DROP = {"title", "default", "examples", "propertyNames"}


def _structural(node, defs: dict):
    if isinstance(node, list):
        return [_structural(x, defs) for x in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    variants = node.get("anyOf")
    if variants and any(v.get("type") == "null" for v in variants):
        rest = [v for v in variants if v.get("type") != "null"]
        base = {k: v for k, v in node.items() if k != "anyOf"}
        inner = rest[0] if len(rest) == 1 else {"anyOf": rest}
        out = _structural({**inner, **base}, defs)
        out["nullable"] = True
        return out
    out = {}
    for k, v in node.items():
        if k in DROP or k == "$defs":
            continue
        if k == "additionalProperties" and v is False:
            continue
        if k == "additionalProperties" and v is True:  # a free-form map (variant overrides)
            out["x-kubernetes-preserve-unknown-fields"] = True
            continue
        if k == "const":
            out["enum"] = [v]
            continue
        if k in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(v, bool):
            out["minimum" if k == "exclusiveMinimum" else "maximum"] = v
            out[k] = True
            continue
        out[k] = _structural(v, defs)
    if "properties" in out:
        out["properties"] = {name: _structural(s, defs) for name, s in out["properties"].items()}
        out.setdefault("type", "object")
    return out


def _schema_of(model) -> dict:
    raw = model.model_json_schema(by_alias=True)
    return _structural(raw, raw.get("$defs", {}))


def spec_schema() -> dict:
    return _schema_of(PipelineBody)


def status_schema() -> dict:
    return {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "phase": {"type": "string"},
            "stage": {"type": "string"},
            "champion": {"type": "string"},
            "workflow": {"type": "string"},
            "observedGeneration": {"type": "integer"},
            "retries": {"type": "integer", "description": "Times `nmm retry` retried the failed Workflow."},
        },
    }


def _definition(
    kind: str, plural: str, short: str, description: str, spec: dict, status: dict, columns: list[dict]
) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "nmm-platform"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["nmm"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns
                    + [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd() -> dict:
    """The NMMPipeline CRD."""
    return _definition(
        "NMMPipeline",
        PLURAL,
        "nmmp",
        "A native-multimodal-model pipeline: curate, train, evaluate, roll out.",
        spec_schema(),
        status_schema(),
        [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
            {"name": "Champion", "type": "string", "jsonPath": ".status.champion"},
        ],
    )


def service_status_schema() -> dict:
    return {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "phase": {"type": "string", "enum": ["Progressing", "Healthy", "Degraded", "RolledBack", "Failed"]},
            "stableVersion": {"type": "integer"},
            "canaryVersion": {"type": "integer"},
            "weight": {"type": "integer"},
            "step": {"type": "integer"},
            "message": {"type": "string"},
            "observedGeneration": {"type": "integer"},
            "pending": {
                "type": "object",
                "nullable": True,
                "x-kubernetes-preserve-unknown-fields": True,
                "description": "What the operator decided and has not finished doing (champion to move, a version to "
                "tag rolled back, the nmm.dev/promote annotation to consume): written before any child "
                "changes, cleared once done; a restarted operator finishes it first.",
            },
        },
    }


def service_crd() -> dict:
    """The NMMService CRD: a served model and its canary rollouts."""
    return _definition(
        "NMMService",
        SERVICE_PLURAL,
        "nmms",
        "A served native multimodal model, rolled out progressively.",
        _schema_of(ServiceBody)["properties"]["spec"],
        service_status_schema(),
        [
            {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
            {"name": "Stable", "type": "integer", "jsonPath": ".status.stableVersion"},
            {"name": "Canary", "type": "integer", "jsonPath": ".status.canaryVersion"},
            {"name": "Weight", "type": "integer", "jsonPath": ".status.weight"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        ],
    )
