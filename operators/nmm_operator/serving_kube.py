"""The NMMService's children on the API server: create each one owned by the service, or patch
it when it is already ours; a name taken by an object the service does not own is NotOwned
(never adopted), as for the pipeline's Workflow."""

from __future__ import annotations

import kopf
from kubernetes.client.exceptions import ApiException

from nmm import kubeclient
from nmm.compile import backends
from nmm.compile import serving as build
from nmm.spec.crd import GROUP, SERVICE_PLURAL, VERSION
from nmm_operator.kube import NotOwned

__all__ = ["GROUP", "SERVICE_PLURAL", "VERSION", "NotOwned", "apply", "children"]

_CUSTOM = {kind: api for b in backends.BACKENDS.values() for kind, api in b.custom_kinds.items()}


def children(
    body: dict, spec, stable: build.ServedVersion, canary: build.ServedVersion | None, weight: int, settings
) -> list[dict]:
    """What the service's current state asks to exist, each owned by the service."""
    meta, s = body["metadata"], settings.compile
    objs = backends.backend(settings.serving.backend).children(
        meta["name"], meta["namespace"], spec, stable, canary, weight, s, settings.serving.model_dump(by_alias=True)
    )
    for obj in objs:
        kopf.append_owner_reference(obj, owner=body)
    return objs


def _ops(kind: str):
    """(create, get, patch) for a kind, each taking (namespace, name?, body?)."""
    if kind in _CUSTOM:
        g, v, p = _CUSTOM[kind]
        api = kubeclient.custom_objects()
        return (
            lambda ns, b: api.create_namespaced_custom_object(g, v, ns, p, b),
            lambda ns, n: api.get_namespaced_custom_object(g, v, ns, p, n),
            lambda ns, n, b: api.patch_namespaced_custom_object(g, v, ns, p, n, b),
        )
    if kind == "Deployment":
        from kubernetes import client

        apps = client.AppsV1Api(kubeclient.api_client())
        return (
            lambda ns, b: apps.create_namespaced_deployment(ns, b),
            lambda ns, n: apps.read_namespaced_deployment(n, ns).to_dict(),
            lambda ns, n, b: apps.patch_namespaced_deployment(n, ns, b),
        )
    core = kubeclient.core()
    return (
        lambda ns, b: core.create_namespaced_service(ns, b),
        lambda ns, n: core.read_namespaced_service(n, ns).to_dict(),
        lambda ns, n, b: core.patch_namespaced_service(n, ns, b),
    )


def _owned(obj: dict, uid: str) -> bool:
    meta = obj.get("metadata") or {}
    refs = meta.get("ownerReferences") or meta.get("owner_references") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


def _without_nulls(obj):
    """What to create of an object whose nulls are a merge patch's removals (a created object has
    nothing to remove)."""
    if isinstance(obj, dict):
        return {k: _without_nulls(v) for k, v in obj.items() if v is not None}
    return [_without_nulls(v) for v in obj] if isinstance(obj, list) else obj


def apply(objs: list[dict], owner_uid: str) -> list[str]:
    """Create or patch each object; the kinds/names created now."""
    created = []
    for obj in objs:
        ns, name, kind = obj["metadata"]["namespace"], obj["metadata"]["name"], obj["kind"]
        create, get, patch = _ops(kind)
        try:
            create(ns, _without_nulls(obj))
            created.append(f"{kind}/{name}")
            continue
        except ApiException as exc:
            if exc.status != 409:
                raise
        existing = get(ns, name)
        if not _owned(existing, owner_uid):
            raise NotOwned(f"{kind} {ns}/{name} exists and is not owned by this NMMService (uid {owner_uid})")
        patch(ns, name, {"metadata": {"labels": obj["metadata"]["labels"]}, "spec": obj["spec"]})
    return created
