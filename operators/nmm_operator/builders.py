"""Pure: an NMMPipeline custom resource → its child Argo Workflow (through nmm.compile), and the
questions the operator asks of observed Workflows (whose are they, which are superseded)."""

from __future__ import annotations

from dataclasses import replace

import kopf

from nmm.compile import CompileSettings, compile_pipeline
from nmm.spec import PipelineSpec, SpecError, parse_pipeline_document
from nmm.spec.names import run_name
from nmm_operator import status

LABEL_OWNER = "nmm.dev/owner"
LABEL_GENERATION = "nmm.dev/generation"


def workflow_name(pipeline: str, generation: int) -> str:
    """Deterministic per spec generation: a replayed handler finds the same child (409)."""
    return run_name(pipeline, generation)


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
    """The Workflow for the pipeline's current generation, owned (controller) by the pipeline,
    its run identity the pipeline's namespace and UID."""
    spec = parse(body)
    meta = body["metadata"]
    generation = int(meta.get("generation", 1))
    try:
        name = workflow_name(meta["name"], generation)
    except ValueError as exc:
        raise SpecError(f"{meta['namespace']}/{meta['name']}", [str(exc)]) from None
    wf = compile_pipeline(spec, replace(settings, namespace=meta["namespace"], owner_uid=meta["uid"]))
    wf["metadata"].pop("generateName", None)
    wf["metadata"]["name"] = name
    wf["metadata"]["labels"][LABEL_OWNER] = meta["name"]
    wf["metadata"]["labels"][LABEL_GENERATION] = str(generation)
    kopf.append_owner_reference(wf, owner=body)
    return wf


def owned_by(obj: dict, uid: str) -> bool:
    """Whether `uid` is the object's controller: a name and a label are not ownership."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


def generation_of(wf: dict) -> int:
    value = ((wf.get("metadata") or {}).get("labels") or {}).get(LABEL_GENERATION, "0")
    return int(value) if str(value).isdigit() else 0


def superseded(workflows: list[dict], pipeline: dict) -> list[dict]:
    """The pipeline's own Workflows of older generations that still run (and have not been told
    to stop): each would hold GPUs and could roll out an outdated model."""
    uid = pipeline["metadata"]["uid"]
    current = int(pipeline["metadata"].get("generation", 1))
    return [
        wf
        for wf in workflows
        if owned_by(wf, uid)
        and generation_of(wf) < current
        and (wf.get("status") or {}).get("phase") not in status.DONE
        and (wf.get("spec") or {}).get("shutdown") not in ("Stop", "Terminate")
    ]
