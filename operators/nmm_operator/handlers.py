"""kopf handlers: decorators only, each a few lines with an explicit id (R8); the work is done by
`builders` (pure), `status` (pure) and `kube` (API calls).

    kopf run --standalone --all-namespaces -m nmm_operator.handlers
"""

from __future__ import annotations

import datetime
import os

import kopf
from kubernetes.client.exceptions import ApiException

from nmm.gpu.pools import PlacementError
from nmm.spec import SpecError
from nmm_operator import builders, kube, settings as operator_settings, status

GROUP, VERSION, PLURAL = kube.GROUP, kube.VERSION, kube.PLURAL
RECHECK_SECONDS = float(os.environ.get("NMM_RECHECK_SECONDS", "60"))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@kopf.on.startup(id="nmm-configure")
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    memo.settings = operator_settings.load()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="nmm.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="nmm.dev", key="last-handled-configuration")
    settings.persistence.finalizer = "nmm.dev/finalizer"
    settings.posting.level = 20  # events from INFO up


@kopf.on.login(id="nmm-login")
def login(**kwargs) -> kopf.ConnectionInfo | None:
    server = os.environ.get("NMM_KUBE_SERVER")
    if server:
        return kopf.ConnectionInfo(server=server, insecure=True)
    return kopf.login_via_client(**kwargs)


@kopf.on.create(GROUP, VERSION, PLURAL, id="nmm-reconcile-create")
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", id="nmm-reconcile-update")
@kopf.on.resume(GROUP, VERSION, PLURAL, id="nmm-reconcile-resume")
def reconcile(body, meta, memo: kopf.Memo, patch: kopf.Patch, **_) -> None:
    """One function for create, update and resume: ensure this generation's Workflow exists."""
    try:
        wf = builders.build_workflow(body, memo.settings.compile)
    except (SpecError, PlacementError) as exc:
        problems = exc.problems if isinstance(exc, SpecError) else [str(exc)]
        patch.status.update(status.invalid_spec(problems, _now()))
        raise kopf.PermanentError("invalid pipeline: " + "; ".join(problems))
    try:
        created = kube.create_workflow(wf)
    except ApiException as exc:
        raise kopf.TemporaryError(f"cannot create workflow {wf['metadata']['name']}: {exc.status} {exc.reason}", delay=10)
    patch.status.update({"workflow": wf["metadata"]["name"], "observedGeneration": meta.get("generation", 1)})
    if created:
        kopf.info(body, reason="WorkflowCreated", message=f"created workflow {wf['metadata']['name']}")


@kopf.on.event(kube.WF_GROUP, kube.WF_VERSION, kube.WF_PLURAL, labels={builders.LABEL_OWNER: kopf.PRESENT}, id="nmm-mirror-workflow")
def mirror(body, type, **_) -> None:
    """A Workflow we own changed: mirror it into its pipeline's status (current generation only)."""
    ns, owner = body["metadata"]["namespace"], body["metadata"]["labels"][builders.LABEL_OWNER]
    pipeline = kube.get_pipeline(ns, owner)
    if pipeline is None or type == "DELETED":
        return  # pipeline gone (GC in progress), or a deletion the recheck timer handles
    if body["metadata"]["name"] != builders.workflow_name(owner, pipeline["metadata"].get("generation", 1)):
        return  # a Workflow of an older generation
    new = status.from_workflow(body, _now())
    change = status.transition(pipeline.get("status"), new)
    kube.patch_pipeline_status(ns, owner, new)
    if change:
        kopf.info(pipeline, reason=change[0], message=change[1])


@kopf.timer(GROUP, VERSION, PLURAL, interval=RECHECK_SECONDS, initial_delay=RECHECK_SECONDS, id="nmm-recheck-child")
def recheck(body, meta, memo: kopf.Memo, patch: kopf.Patch, **_) -> None:
    """Level-triggered: the child still exists (else recreate or report, R9) and status is true."""
    name = (body.get("status") or {}).get("workflow")
    if not name or (body.get("status") or {}).get("conditions", [{}])[-1].get("reason") in ("InvalidSpec", "WorkflowMissing"):
        return
    wf = kube.get_workflow(meta["namespace"], name)
    if wf is not None:
        patch.status.update(status.from_workflow(wf, _now()))
        return
    recreate = (body["spec"].get("onWorkflowDeleted") or memo.settings.on_child_deleted) == "recreate"
    if recreate:
        kube.create_workflow(builders.build_workflow(body, memo.settings.compile))
    patch.status.update(status.child_missing(name, recreate, _now()))
    kopf.warn(body, reason="WorkflowMissing", message=patch.status["message"])
