"""Pure: an NMMPipeline custom resource → its child Argo Workflow (through nmm.compile)."""

from __future__ import annotations

from dataclasses import replace

from nmm.compile import CompileSettings, compile_pipeline
from nmm.spec import PipelineSpec, parse_pipeline_document

LABEL_OWNER = "nmm.dev/owner"
LABEL_GENERATION = "nmm.dev/generation"


def workflow_name(pipeline: str, generation: int) -> str:
    """Deterministic per spec generation: a replayed handler finds the same child (409)."""
    return f"{pipeline}-g{generation}"


def parse(body: dict) -> PipelineSpec:
    """The custom resource as a validated spec (raises nmm.spec.SpecError)."""
    meta = body.get("metadata", {})
    doc = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
        "spec": body.get("spec"),
    }
    return parse_pipeline_document(doc, f"{meta.get('namespace')}/{meta.get('name')}")


def build_workflow(body: dict, settings: CompileSettings) -> dict:
    """The Workflow for the pipeline's current generation, owned by the pipeline."""
    spec = parse(body)
    meta = body["metadata"]
    generation = int(meta.get("generation", 1))
    wf = compile_pipeline(spec, replace(settings, namespace=meta["namespace"]))
    name = workflow_name(meta["name"], generation)
    wf["metadata"].pop("generateName", None)
    wf["metadata"]["name"] = name
    wf["metadata"]["namespace"] = meta["namespace"]
    wf["metadata"]["labels"][LABEL_OWNER] = meta["name"]
    wf["metadata"]["labels"][LABEL_GENERATION] = str(generation)
    wf["metadata"]["ownerReferences"] = [{
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }]
    return wf
