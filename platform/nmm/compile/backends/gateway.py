"""Backend `gateway` (no KServe): `<name>-stable` and `<name>-canary` Deployments and Services,
and a Gateway API HTTPRoute `<name>` on the chart's `serving.gateway` splitting traffic by weight
between them; the analysis reads each track's Service."""

from __future__ import annotations

from nmm.compile.serving import LABEL_SERVICE, LABEL_TRACK, LABEL_VERSION, PORT, ServedVersion, labels, pod_spec
from nmm.compile.settings import CompileSettings
from nmm.spec.names import serving_backend_name
from nmm.spec.serving import ServiceSpec

ROUTE_GROUP, ROUTE_VERSION, ROUTE_PLURAL = "gateway.networking.k8s.io", "v1", "httproutes"
DEFAULT_GATEWAY = {"name": "nmm-gateway"}


def deployment(
    name: str,
    namespace: str,
    track: str,
    spec: ServiceSpec,
    served: ServedVersion | None,
    s: CompileSettings,
    template: ServedVersion,
) -> dict:
    """A track's Deployment: `served` at `replicas`, or scaled to zero (the canary between
    rollouts, whose pod template then shows `template`'s container so that it stays valid)."""
    full = serving_backend_name(name, track)
    selector = {LABEL_SERVICE: name, LABEL_TRACK: track}
    version = served.version if served else None
    track_labels = labels(name, {LABEL_TRACK: track} | ({LABEL_VERSION: str(version)} if version else {}))
    shown = served or template
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": full, "namespace": namespace, "labels": track_labels},
        "spec": {
            "replicas": spec.replicas if version else 0,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": track_labels}, "spec": pod_spec(spec, shown, s, "nmm-serve")},
        },
    }


def service(name: str, namespace: str, track: str) -> dict:
    full = serving_backend_name(name, track)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": full, "namespace": namespace, "labels": labels(name, {LABEL_TRACK: track})},
        "spec": {
            "selector": {LABEL_SERVICE: name, LABEL_TRACK: track},
            "ports": [{"name": "http", "port": 80, "targetPort": PORT, "protocol": "TCP"}],
        },
    }


def http_route(name: str, namespace: str, weight: int, parent: dict) -> dict:
    """The route splitting traffic: `weight` percent to the canary, the rest to stable."""
    return {
        "apiVersion": f"{ROUTE_GROUP}/{ROUTE_VERSION}",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
        "spec": {
            "parentRefs": [parent],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [
                        {"name": serving_backend_name(name, "stable"), "port": 80, "weight": 100 - weight},
                        {"name": serving_backend_name(name, "canary"), "port": 80, "weight": weight},
                    ],
                }
            ],
        },
    }


def gateway_objects(
    name: str,
    namespace: str,
    spec: ServiceSpec,
    stable: ServedVersion,
    canary: ServedVersion | None,
    weight: int,
    s: CompileSettings,
    parent: dict,
) -> list[dict]:
    return [
        deployment(name, namespace, "stable", spec, stable, s, stable),
        deployment(name, namespace, "canary", spec, canary, s, stable),
        service(name, namespace, "stable"),
        service(name, namespace, "canary"),
        http_route(name, namespace, weight if canary else 0, parent),
    ]


class Gateway:
    name = "gateway"
    custom_kinds = {"HTTPRoute": (ROUTE_GROUP, ROUTE_VERSION, ROUTE_PLURAL)}
    rbac = (
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "create", "patch"]},
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "create", "patch"]},
        {"apiGroups": [ROUTE_GROUP], "resources": [ROUTE_PLURAL], "verbs": ["get", "create", "patch"]},
    )

    def children(
        self,
        name: str,
        namespace: str,
        spec: ServiceSpec,
        stable: ServedVersion,
        canary: ServedVersion | None,
        weight: int,
        s: CompileSettings,
        serving: dict,
    ) -> list[dict]:
        return gateway_objects(name, namespace, spec, stable, canary, weight, s, parent_ref(serving.get("gateway")))

    def split(self, children: list[dict]) -> dict[str, int]:
        """The HTTPRoute's backend weights, by track."""
        (route,) = [c for c in children if c["kind"] == "HTTPRoute"]
        refs = route["spec"]["rules"][0]["backendRefs"]
        track = {serving_backend_name(route["metadata"]["name"], t): t for t in ("stable", "canary")}
        weights = {track[r["name"]]: r["weight"] for r in refs}
        return {"stable": weights["stable"], "candidate": weights["canary"]}

    def endpoints(self, name: str, namespace: str) -> dict[str, str]:
        return {
            "stable": f"http://{serving_backend_name(name, 'stable')}.{namespace}.svc.cluster.local",
            "candidate": f"http://{serving_backend_name(name, 'canary')}.{namespace}.svc.cluster.local",
        }


def parent_ref(gateway: dict | None) -> dict:
    """The HTTPRoute's parentRef: the chart's `serving.gateway` ({name, namespace?, sectionName?})."""
    gateway = gateway or DEFAULT_GATEWAY
    if not isinstance(gateway, dict) or not gateway.get("name"):
        raise ValueError("serving.gateway must name the Gateway ({name, namespace?})")
    return {k: gateway[k] for k in ("name", "namespace", "sectionName") if gateway.get(k)}


GATEWAY = Gateway()
