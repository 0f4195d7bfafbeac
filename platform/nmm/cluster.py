"""The CLI's side of a cluster: submit pipelines, read their status, fetch stage logs
(kubernetes client; the current kube context, or `NMM_KUBE_SERVER` e.g. `kubectl proxy`)."""

from __future__ import annotations

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from nmm import kubeclient
from nmm.compile import WF_GROUP, WF_PLURAL, WF_VERSION
from nmm.spec import PipelineSpec, split_step
from nmm.spec.crd import GROUP, PLURAL, SERVICE_PLURAL, VERSION
from nmm.spec.names import train_job_name
from nmm.spec.serving import ANNOTATION_PROMOTE


class ClusterError(RuntimeError):
    """The cluster could not be reached or refused the request."""


def current_namespace() -> str:
    try:
        _, ctx = config.list_kube_config_contexts()
        return ctx.get("context", {}).get("namespace") or "default"
    except Exception:
        return "default"


def _api(factory):
    """A Kubernetes API object; no configured cluster is a ClusterError (a message, not a traceback)."""
    try:
        return factory()
    except kubeclient.KubeConfigError as exc:
        raise ClusterError(str(exc)) from None


def _custom() -> client.CustomObjectsApi:
    return _api(kubeclient.custom_objects)


def submit(spec: PipelineSpec, namespace: str) -> tuple[str, int]:
    """Create the NMMPipeline, or update its spec; returns ("created"|"updated", generation)."""
    body = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    body["metadata"] = {
        "name": spec.metadata.name,
        "namespace": namespace,
        **({"labels": spec.metadata.labels} if spec.metadata.labels else {}),
    }
    api = _custom()
    try:
        obj = api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        return "created", int(obj["metadata"].get("generation", 1))
    except ApiException as exc:
        if exc.status != 409:
            raise ClusterError(f"cannot create {namespace}/{spec.metadata.name}: {exc.status} {exc.reason}") from None
    try:
        obj = api.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, spec.metadata.name, {"spec": body["spec"]}
        )
    except ApiException as exc:
        raise ClusterError(f"cannot update {namespace}/{spec.metadata.name}: {exc.status} {exc.reason}") from None
    return "updated", int(obj["metadata"].get("generation", 1))


def get_pipeline(name: str, namespace: str) -> dict:
    try:
        return _custom().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            raise ClusterError(f"no NMMPipeline {namespace}/{name}") from None
        raise ClusterError(f"cannot read {namespace}/{name}: {exc.status} {exc.reason}") from None


def _get_or_none(kind: str, group: str, version: str, plural: str, name: str, namespace: str) -> dict | None:
    """The object, or None when there is none (404); any other refusal is a ClusterError."""
    try:
        return _custom().get_namespaced_custom_object(group, version, namespace, plural, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise ClusterError(f"cannot read {kind} {namespace}/{name}: {exc.status} {exc.reason}") from None


def get_workflow(name: str, namespace: str) -> dict | None:
    return _get_or_none("workflow", WF_GROUP, WF_VERSION, WF_PLURAL, name, namespace)


def pod_logs(workflow: str, stage: str, namespace: str) -> list[tuple[str, str]]:
    """(pod, log) of the stage's pods that still exist: Argo step pods, or the PyTorchJob's."""
    core = _api(kubeclient.core)
    if split_step(stage)[0] == "train":  # train, or train-<variant> in an ablation
        selector, container = (
            f"training.kubeflow.org/job-name={train_job_name(workflow, split_step(stage)[1])}",
            "pytorch",
        )
    else:
        selector, container = f"workflows.argoproj.io/workflow={workflow}", "main"
    out = []
    try:
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    except ApiException:
        return []
    for pod in pods:
        node = (pod.metadata.annotations or {}).get("workflows.argoproj.io/node-name", "")
        if container == "main" and not node.endswith(f".{stage}") and f".{stage}(" not in node:
            continue
        try:
            out.append(
                (pod.metadata.name, core.read_namespaced_pod_log(pod.metadata.name, namespace, container=container))
            )
        except ApiException:
            continue
    return out


def store_of(workflow: dict) -> str | None:
    """The store URI a Workflow's steps publish to (their `--store` argument)."""
    for t in workflow.get("spec", {}).get("templates", []):
        args = t.get("container", {}).get("args", [])
        if "--store" in args:
            return args[args.index("--store") + 1]
    return None


def retry(name: str, namespace: str) -> str:
    """Ask the operator to retry the pipeline's failed Workflow (`argo retry`'s semantics): a new
    value of the nmm.dev/retry annotation. Returns the value set."""
    from nmm.spec.crd import ANNOTATION_RETRY
    from nmm.timestamps import rfc3339

    get_pipeline(name, namespace)  # a missing pipeline is a clear error, not a 404 patch
    value = rfc3339(micro=True)
    try:
        _custom().patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, {"metadata": {"annotations": {ANNOTATION_RETRY: value}}}
        )
    except ApiException as exc:
        raise ClusterError(f"cannot annotate nmmpipeline {namespace}/{name}: {exc.status} {exc.reason}") from None
    return value


def get_service(name: str, namespace: str) -> dict | None:
    return _get_or_none("NMMService", GROUP, VERSION, SERVICE_PLURAL, name, namespace)


def serve_version(name: str, namespace: str, version: int, at_once: bool) -> None:
    """Point the NMMService at `version`: as a canary, or (`at_once`) replacing stable directly."""
    model = (get_service(name, namespace) or {}).get("spec", {}).get("model", {})
    body: dict = {"spec": {"model": {"name": model.get("name"), "version": version, "alias": None}}}
    if at_once:
        body["metadata"] = {"annotations": {ANNOTATION_PROMOTE: str(version)}}
    try:
        _custom().patch_namespaced_custom_object(GROUP, VERSION, namespace, SERVICE_PLURAL, name, body)
    except ApiException as exc:
        raise ClusterError(f"cannot update NMMService {namespace}/{name}: {exc.status} {exc.reason}") from None
