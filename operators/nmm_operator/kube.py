"""The operator's Kubernetes API calls beyond kopf's own (kubernetes client, synchronous:
kopf runs sync handlers in its thread pool).

Connection: `NMM_KUBE_SERVER` (e.g. `kubectl proxy`'s http://127.0.0.1:8001), else the in-cluster
service account, else the local kubeconfig.
"""

from __future__ import annotations

import os
from functools import lru_cache

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

GROUP, VERSION, PLURAL = "nmm.dev", "v1alpha1", "nmmpipelines"
WF_GROUP, WF_VERSION, WF_PLURAL = "argoproj.io", "v1alpha1", "workflows"


@lru_cache(maxsize=1)
def api() -> client.CustomObjectsApi:
    server = os.environ.get("NMM_KUBE_SERVER")
    if server:
        cfg = client.Configuration()
        cfg.host = server
        cfg.verify_ssl = False
        return client.CustomObjectsApi(client.ApiClient(cfg))
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def create_workflow(wf: dict) -> bool:
    """Create the Workflow; False when it already exists (409 means done: replay-safe)."""
    try:
        api().create_namespaced_custom_object(WF_GROUP, WF_VERSION, wf["metadata"]["namespace"], WF_PLURAL, wf)
        return True
    except ApiException as exc:
        if exc.status == 409:
            return False
        raise


def _get(group: str, version: str, plural: str, namespace: str, name: str) -> dict | None:
    """The object, or None when it does not exist (404)."""
    try:
        return api().get_namespaced_custom_object(group, version, namespace, plural, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def get_workflow(namespace: str, name: str) -> dict | None:
    return _get(WF_GROUP, WF_VERSION, WF_PLURAL, namespace, name)


def get_pipeline(namespace: str, name: str) -> dict | None:
    return _get(GROUP, VERSION, PLURAL, namespace, name)


def patch_pipeline_status(namespace: str, name: str, status: dict) -> None:
    api().patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, {"status": status})
