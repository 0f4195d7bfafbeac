"""The operator's Kubernetes API calls beyond kopf's own (kubernetes client, synchronous: kopf runs
sync handlers in its thread pool). Connection: nmm.kubeclient (one bootstrap for all of nmm)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

from kubernetes.client.exceptions import ApiException

from nmm import kubeclient
from nmm.compile import WF_GROUP, WF_PLURAL, WF_VERSION
from nmm.spec.crd import GROUP, PLURAL, VERSION
from nmm_operator import builders

__all__ = ["GROUP", "PLURAL", "VERSION", "WF_GROUP", "WF_PLURAL", "WF_VERSION"]


class NotOwned(RuntimeError):
    """A child's name is taken by an object this pipeline does not own."""


def create_workflow(wf: dict, owner_uid: str) -> bool:
    """Create the Workflow; False when it already exists AND is ours (409 means done: replay-safe).
    A Workflow of that name owned by someone else (a pre-created one, or the previous
    incarnation's awaiting garbage collection) is NotOwned: never adopted."""
    ns, name = wf["metadata"]["namespace"], wf["metadata"]["name"]
    try:
        kubeclient.custom_objects().create_namespaced_custom_object(WF_GROUP, WF_VERSION, ns, WF_PLURAL, wf)
        return True
    except ApiException as exc:
        if exc.status != 409:
            raise
    existing = get_workflow(ns, name)
    if existing is None:  # deleted between our create and our read: let the retry create it
        raise ApiException(status=409, reason=f"workflow {name} vanished after a conflict")
    if not builders.owned_by(existing, owner_uid):
        raise NotOwned(f"workflow {ns}/{name} exists and is not owned by this pipeline (uid {owner_uid})")
    return False


class Changing(RuntimeError):
    """The object changed during every copy a timer took of it."""


def one_version(body: Mapping, tries: int = 50) -> dict:
    """A copy of a timer's `body` that is one version of the object. kopf gives timers a live
    view that its event loop replaces whenever a watch event arrives, while the handler runs in
    kopf's thread pool: reading `spec`, then (after a registry call) `metadata`, could pair the
    spec before `nmm promote` with the annotation it wrote. Copied until the resourceVersion read
    before and after the copy agree (each version has its own)."""
    for _ in range(tries):
        before = body["metadata"].get("resourceVersion")
        snap = copy.deepcopy(dict(body))
        if before == snap["metadata"].get("resourceVersion") == body["metadata"].get("resourceVersion"):
            return snap
    raise Changing(f"{body['metadata'].get('name')}: the object changed during each of {tries} copies")


def _get(group: str, version: str, plural: str, namespace: str, name: str) -> dict | None:
    """The object, or None when it does not exist (404)."""
    try:
        return kubeclient.custom_objects().get_namespaced_custom_object(group, version, namespace, plural, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def get_workflow(namespace: str, name: str) -> dict | None:
    return _get(WF_GROUP, WF_VERSION, WF_PLURAL, namespace, name)


def get_pipeline(namespace: str, name: str) -> dict | None:
    return _get(GROUP, VERSION, PLURAL, namespace, name)


def pipeline_workflows(namespace: str, pipeline: str) -> list[dict]:
    """The Workflows labelled as the pipeline's (ownership is checked by the caller)."""
    found = kubeclient.custom_objects().list_namespaced_custom_object(
        WF_GROUP, WF_VERSION, namespace, WF_PLURAL, label_selector=f"{builders.LABEL_OWNER}={pipeline}"
    )
    return found.get("items", [])


def stop_workflow(namespace: str, name: str) -> None:
    """What `argo stop` does (the patch argo-server makes): spec.shutdown=Stop ends every running
    step and starts no new one, but runs the exit handler, which closes the run's MLflow run."""
    kubeclient.custom_objects().patch_namespaced_custom_object(
        WF_GROUP, WF_VERSION, namespace, WF_PLURAL, name, {"spec": {"shutdown": "Stop"}}
    )


def ensure_current(wf: dict, pipeline: dict) -> tuple[bool, list[str]]:
    """The pipeline's current Workflow exists (created now: True) and every older generation of
    its own still running is stopped (their names). Replay-safe: a second call creates and stops
    nothing."""
    meta = pipeline["metadata"]
    created = create_workflow(wf, meta["uid"])
    stopped = [
        w["metadata"]["name"]
        for w in builders.superseded(pipeline_workflows(meta["namespace"], meta["name"]), pipeline)
    ]
    for name in stopped:
        stop_workflow(meta["namespace"], name)
    return created, stopped


def patch_pipeline_status(namespace: str, name: str, status: dict) -> None:
    kubeclient.custom_objects().patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": status}
    )


# The jobs a Workflow's resource steps create.
PYTORCHJOBS = ("kubeflow.org", "v1", "pytorchjobs")
JOBS = (PYTORCHJOBS, ("ray.io", "v1", "rayjobs"))


def run_jobs(namespace: str, workflow: str, kind: tuple[str, str, str]) -> list[dict]:
    """The jobs of one kind (group, version, plural) carrying the run's `nmm.dev/run` label;
    none when the kind's CRD is not installed (404)."""
    group, version, plural = kind
    try:
        found = kubeclient.custom_objects().list_namespaced_custom_object(
            group, version, namespace, plural, label_selector=f"nmm.dev/run={workflow}"
        )
    except ApiException as exc:
        if exc.status == 404:
            return []
        raise
    return found.get("items", [])


def suspended_jobs(namespace: str, workflow: str) -> list[str]:
    """The run's PyTorchJobs that are suspended: Kueue holds them until it admits their whole
    gang (`kueue.x-k8s.io/queue-name`). None when Kubeflow's CRD is not installed (404)."""
    out = []
    for job in run_jobs(namespace, workflow, PYTORCHJOBS):
        conditions = (job.get("status") or {}).get("conditions") or []
        suspended = any(c.get("type") == "Suspended" and c.get("status") == "True" for c in conditions)
        if suspended or ((job.get("spec") or {}).get("runPolicy") or {}).get("suspend"):
            out.append(job["metadata"]["name"])
    return sorted(out)


def _failed(job: dict) -> bool:
    """Whether a job failed for good: a PyTorchJob's Failed condition, a RayJob's status."""
    st = job.get("status") or {}
    if any(c.get("type") == "Failed" and c.get("status") == "True" for c in st.get("conditions") or []):
        return True  # PyTorchJob
    return st.get("jobStatus") in ("FAILED", "STOPPED") or st.get("jobDeploymentStatus") == "Failed"  # RayJob


def delete_failed_jobs(namespace: str, wf: dict) -> list[str]:
    """Delete the failed PyTorchJobs and RayJobs of this Workflow (its `nmm.dev/run` label AND
    an ownerReference to its UID: nothing else is touched), so that the retried step can create
    its job under the same name (a `create` of an existing name fails: argo-workflows#6150).
    A kind whose CRD is not installed has none (404). Returns "kind/name" of each deleted."""
    name, uid = wf["metadata"]["name"], wf["metadata"]["uid"]
    deleted = []
    for kind in JOBS:
        for job in run_jobs(namespace, name, kind):
            owners = job["metadata"].get("ownerReferences") or []
            if not _failed(job) or not any(o.get("uid") == uid for o in owners):
                continue
            group, version, plural = kind
            try:
                kubeclient.custom_objects().delete_namespaced_custom_object(
                    group, version, namespace, plural, job["metadata"]["name"], propagation_policy="Background"
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise
            deleted.append(f"{plural}/{job['metadata']['name']}")
    return deleted


def retry_workflow(namespace: str, name: str, patch: dict) -> None:
    """Apply `status.retry_patch` (what `argo retry` does) as a merge patch."""
    kubeclient.custom_objects().patch_namespaced_custom_object(WF_GROUP, WF_VERSION, namespace, WF_PLURAL, name, patch)
