"""kopf handlers: decorators only, each a few lines with an explicit id (R8); the work is done by
`builders` (pure), `status` (pure) and `kube` (API calls).

    kopf run --standalone --all-namespaces -m nmm_operator.handlers

Settings (the chart's ConfigMap, `NMM_OPERATOR_SETTINGS`) are read once, when kopf imports this
module: the recheck timer's interval is fixed when its decorator runs.
"""

from __future__ import annotations

import importlib
import logging
import os

import kopf
from kubernetes.client.exceptions import ApiException

from nmm.gpu.pools import PlacementError
from nmm.spec import SpecError
from nmm.spec.crd import ANNOTATION_RETRY
from nmm.timestamps import rfc3339
from nmm_operator import builders, kube, status
from nmm_operator import settings as operator_settings

GROUP, VERSION, PLURAL = kube.GROUP, kube.VERSION, kube.PLURAL
SETTINGS = operator_settings.load()


def _now() -> str:
    return rfc3339()


@kopf.on.startup(id="nmm-configure")
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    memo.settings = SETTINGS
    logging.getLogger().setLevel(SETTINGS.operator.log_level)
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="nmm.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="nmm.dev", key="last-handled-configuration"
    )
    settings.persistence.finalizer = "nmm.dev/finalizer"
    settings.posting.level = logging.INFO  # events from INFO up


@kopf.on.login(id="nmm-login")
def login(**kwargs) -> kopf.ConnectionInfo | None:
    server = os.environ.get("NMM_KUBE_SERVER")
    if server:
        return kopf.ConnectionInfo(server=server)
    return kopf.login_via_client(**kwargs)


@kopf.on.create(GROUP, VERSION, PLURAL, id="nmm-reconcile-create")
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", id="nmm-reconcile-update")
@kopf.on.resume(GROUP, VERSION, PLURAL, id="nmm-reconcile-resume")
def reconcile(body, meta, memo: kopf.Memo, patch: kopf.Patch, **_) -> None:
    """One function for create, update and resume: this generation's Workflow exists (ours, never
    adopted), and older generations' Workflows are stopped."""
    try:
        wf = builders.build_workflow(body, memo.settings.compile)
    except (SpecError, PlacementError) as exc:
        problems = exc.problems if isinstance(exc, SpecError) else [str(exc)]
        patch.status.update(status.invalid_spec(problems, _now()))
        raise kopf.PermanentError("invalid pipeline: " + "; ".join(problems)) from None
    name = wf["metadata"]["name"]
    try:
        created, stopped = kube.ensure_current(wf, body)
    except kube.NotOwned as exc:
        patch.status.update(status.not_owned(name, _now()))
        raise kopf.TemporaryError(str(exc), delay=30) from None
    except ApiException as exc:
        raise kopf.TemporaryError(f"cannot create workflow {name}: {exc.status} {exc.reason}", delay=10) from None
    patch.status.update({"workflow": name, "observedGeneration": meta.get("generation", 1)})
    if created:
        kopf.info(body, reason="WorkflowCreated", message=f"created workflow {name}")
    if stopped:
        kopf.info(body, reason="WorkflowSuperseded", message=f"stopped superseded workflow(s) {', '.join(stopped)}")


@kopf.on.event(
    kube.WF_GROUP,
    kube.WF_VERSION,
    kube.WF_PLURAL,
    labels={builders.LABEL_OWNER: kopf.PRESENT},
    id="nmm-mirror-workflow",
)
def mirror(body, type, **_) -> None:
    """A Workflow of ours changed: mirror it into its pipeline's status (current generation only)."""
    ns, owner = body["metadata"]["namespace"], body["metadata"]["labels"][builders.LABEL_OWNER]
    pipeline = kube.get_pipeline(ns, owner)
    if pipeline is None or type == "DELETED" or not builders.owned_by(body, pipeline["metadata"]["uid"]):
        return  # pipeline gone (GC in progress), a deletion the recheck timer handles, or not ours
    if body["metadata"]["name"] != builders.workflow_name(owner, pipeline["metadata"].get("generation", 1)):
        return  # a Workflow of an older generation
    new = _observed(body)
    change = status.transition(pipeline.get("status"), new)
    kube.patch_pipeline_status(ns, owner, new)
    if change:
        kopf.info(pipeline, reason=change[0], message=change[1])


def _observed(wf: dict) -> dict:
    """The pipeline's status from its Workflow, and, while it trains, whether Kueue still holds
    the training job (phase Queued: the recheck timer sees an admission within recheckSeconds)."""
    new = status.from_workflow(wf, _now())
    if status.training(new):
        new = status.queued(new, kube.suspended_jobs(wf["metadata"]["namespace"], wf["metadata"]["name"]), _now())
    return new


@kopf.timer(
    GROUP,
    VERSION,
    PLURAL,
    interval=SETTINGS.operator.recheck_seconds,
    initial_delay=SETTINGS.operator.recheck_seconds,
    id="nmm-recheck-child",
)
def recheck(body, memo: kopf.Memo, patch: kopf.Patch, **_) -> None:
    """Level-triggered: the child still exists and is ours (else recreate or report, R9), and
    status is true."""
    try:
        body = kube.one_version(body)  # a live view otherwise: spec and status could be two versions'
    except kube.Changing as exc:
        raise kopf.TemporaryError(str(exc), delay=5) from None
    meta = body["metadata"]
    name = (body.get("status") or {}).get("workflow")
    if not name or (body.get("status") or {}).get("conditions", [{}])[-1].get("reason") in (
        "InvalidSpec",
        "WorkflowMissing",
    ):
        return
    wf = kube.get_workflow(meta["namespace"], name)
    if wf is not None and builders.owned_by(wf, meta["uid"]):
        patch.status.update(_observed(wf))
        return
    if wf is not None:
        patch.status.update(status.not_owned(name, _now()))
        return
    recreate = (body["spec"].get("onWorkflowDeleted") or memo.settings.operator.on_child_deleted) == "recreate"
    try:
        if recreate:
            kube.create_workflow(builders.build_workflow(body, memo.settings.compile), meta["uid"])
    except kube.NotOwned:  # taken meanwhile by a Workflow that is not ours
        patch.status.update(status.not_owned(name, _now()))
        return
    patch.status.update(status.child_missing(name, recreate, _now()))
    kopf.warn(body, reason="WorkflowMissing", message=patch.status["message"])


@kopf.on.event(GROUP, VERSION, PLURAL, annotations={ANNOTATION_RETRY: kopf.PRESENT}, id="nmm-retry")
def retry(body, meta, type, **_) -> None:
    """`nmm retry NAME` (a new value of the nmm.dev/retry annotation): the current generation's
    Workflow, if it failed, is retried the way `argo retry` does it: its succeeded steps are
    kept, the failed ones run again (training resumes from its checkpoint: the run's identity is
    unchanged). Level-triggered and replay-safe: the value handled is kept in status.retryRequest
    (kopf leaves annotations under its own nmm.dev/ prefix out of its diffs, so this is an event
    handler). Counted in status.retries, told in an event; a Workflow that has not failed is not
    retried, and the event says why."""
    value, st = meta["annotations"][ANNOTATION_RETRY], body.get("status") or {}
    if type == "DELETED" or value == st.get("retryRequest"):
        return
    ns, name = meta["namespace"], builders.workflow_name(meta["name"], meta.get("generation", 1))
    wf = kube.get_workflow(ns, name)
    phase = (wf.get("status") or {}).get("phase") if wf is not None else None
    update = {"retryRequest": value}
    if wf is None or not builders.owned_by(wf, meta["uid"]):
        kopf.warn(body, reason="RetryRefused", message=f"no workflow {name} of this pipeline to retry")
    elif phase not in ("Failed", "Error"):
        kopf.info(
            body,
            reason="RetryIgnored",
            message=f"workflow {name} is {phase or 'Pending'}: only a failed one is retried",
        )
    else:
        deleted = kube.delete_failed_jobs(
            ns, wf
        )  # first: a failure here leaves the Workflow failed, retried next event
        kube.retry_workflow(ns, name, status.retry_patch(wf))
        update["retries"] = int(st.get("retries") or 0) + 1
        gone = f" (deleted the failed {', '.join(deleted)})" if deleted else ""
        kopf.info(body, reason="WorkflowRetried", message=f"retrying workflow {name}: its failed steps run again{gone}")
    kube.patch_pipeline_status(ns, meta["name"], update)


# NMMService's handlers register with kopf when this module (the one `kopf run -m` names) loads.
importlib.import_module("nmm_operator.service_handlers")
