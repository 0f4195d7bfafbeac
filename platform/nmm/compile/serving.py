"""Pure: an NMMService's serving objects for the current state of its rollout (which version is
stable, which is the canary, at what weight).

- backend `kserve`: one `serving.kserve.io/v1beta1` InferenceService (serverless), its predictor a
  custom container running `nmm serve`; a canary is the new predictor with `canaryTrafficPercent`
  (KServe keeps the previous revision serving the rest). The chart's ClusterServingRuntime
  describes the same container for users who write InferenceServices by hand.
- backend `gateway` (no KServe): `<name>-stable` and `<name>-canary` Deployments and Services and
  a Gateway API HTTPRoute `<name>` splitting traffic by weight between them.
"""

from __future__ import annotations

from dataclasses import dataclass

from nmm.compile import pods
from nmm.compile.settings import CompileSettings
from nmm.gpu import pools
from nmm.spec.names import serving_backend_name
from nmm.spec.serving import ServiceSpec

PORT = 8080
ISVC_GROUP, ISVC_VERSION, ISVC_PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
ROUTE_GROUP, ROUTE_VERSION, ROUTE_PLURAL = "gateway.networking.k8s.io", "v1", "httproutes"
LABEL_SERVICE = "nmm.dev/service"
LABEL_TRACK = "nmm.dev/track"
LABEL_VERSION = "nmm.dev/model-version"


@dataclass(frozen=True)
class ServedVersion:
    """A registered version as a server needs it: its published folder and the digest it was
    registered with (the operator resolves both; a server never asks the registry)."""

    version: int
    folder: str
    digest: str


def model_uri(spec: ServiceSpec, version: int) -> str:
    return f"models:/{spec.model.name}/{version}"


def _labels(name: str, extra: dict | None = None) -> dict:
    return {"app.kubernetes.io/name": "nmm-serve", "app.kubernetes.io/managed-by": "nmm-operator",
            LABEL_SERVICE: name} | (extra or {})


def container(spec: ServiceSpec, served: ServedVersion, s: CompileSettings, name: str = "kserve-container") -> dict:
    """`nmm serve` of one registered version's folder, its manifest checked against the digest
    the version was registered with before anything is served."""
    b, r = spec.batching, spec.resources
    limits = {"cpu": r.cpu, "memory": r.memory} | ({"nvidia.com/gpu": str(r.gpus)} if r.gpus else {})
    probe = lambda path: {"httpGet": {"path": path, "port": PORT}, "periodSeconds": 10}  # noqa: E731
    return {
        "name": name,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "command": ["nmm"],
        "args": ["serve", served.folder, "--name", spec.model.name, "--digest", served.digest, "--host", "0.0.0.0",
                 "--port", str(PORT), f"--max-batch={b.max_batch}", f"--max-wait-ms={b.max_wait_ms:g}",
                 f"--max-queue={b.max_queue}"],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": pods.serving_env(s),
        "resources": {"requests": dict(limits), "limits": limits},
        "readinessProbe": probe("/readyz") | {"initialDelaySeconds": 5},
        "livenessProbe": probe("/healthz") | {"initialDelaySeconds": 30},
        "securityContext": pods.container_security_context(),
        "volumeMounts": [pods.tmp_mount()],
    }


def _placement(spec: ServiceSpec, s: CompileSettings) -> dict:
    """The same placement as training: the named GPU pool's affinity and tolerations."""
    r = spec.resources
    if not r.gpus or not s.gpu_pools:
        return {}
    chosen = [p for p in s.gpu_pools if p.name == r.gpu_pool] if r.gpu_pool else pools.choose(s.gpu_pools, r.gpus, None, None)
    if not chosen:
        raise pools.PlacementError(f"resources.gpuPool {r.gpu_pool!r} is not a declared pool: "
                                   + ", ".join(p.name for p in s.gpu_pools))
    pools.choose(tuple(chosen), r.gpus, None, None)  # it must hold the GPUs asked for
    return {"affinity": pools.affinity(chosen), "tolerations": pools.tolerations(chosen)}


def _pod_spec(spec: ServiceSpec, served: ServedVersion, s: CompileSettings, container_name: str) -> dict:
    return {
        "serviceAccountName": s.serving_service_account,
        "automountServiceAccountToken": False,
        "securityContext": pods.pod_security_context(s),
        "containers": [container(spec, served, s, container_name)],
        "volumes": [pods.tmp_volume()],
    } | _placement(spec, s)


def inference_service(name: str, namespace: str, spec: ServiceSpec, served: ServedVersion, canary_weight: int | None,
                      s: CompileSettings) -> dict:
    """The InferenceService serving `served`; with `canary_weight`, it is the canary and takes
    that percent (the previous revision the rest). Its pods carry the service and the version as
    labels: the analysis reads every one of them."""
    version = served.version
    predictor = {"minReplicas": spec.replicas, "maxReplicas": spec.replicas,
                 "labels": {LABEL_SERVICE: name, LABEL_VERSION: str(version)}} | _pod_spec(spec, served, s, "kserve-container")
    if canary_weight is not None:
        predictor["canaryTrafficPercent"] = canary_weight
    return {
        "apiVersion": f"{ISVC_GROUP}/{ISVC_VERSION}", "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace, "labels": _labels(name, {LABEL_VERSION: str(version)}),
                     # tag routing: the previous and latest revisions answer at prev-/latest- URLs (the analysis)
                     "annotations": {"serving.kserve.io/deploymentMode": "Serverless",
                                     "serving.kserve.io/enable-tag-routing": "true"}},
        "spec": {"predictor": predictor},
    }


def deployment(name: str, namespace: str, track: str, spec: ServiceSpec, served: ServedVersion | None,
               s: CompileSettings, template: ServedVersion) -> dict:
    """A track's Deployment: `served` at `replicas`, or scaled to zero (the canary between
    rollouts, whose pod template then shows `template`'s container so that it stays valid)."""
    full = serving_backend_name(name, track)
    selector = {LABEL_SERVICE: name, LABEL_TRACK: track}
    version = served.version if served else None
    labels = _labels(name, {LABEL_TRACK: track} | ({LABEL_VERSION: str(version)} if version else {}))
    shown = served or template
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": full, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": spec.replicas if version else 0,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": labels}, "spec": _pod_spec(spec, shown, s, "nmm-serve")},
        },
    }


def service(name: str, namespace: str, track: str) -> dict:
    full = serving_backend_name(name, track)
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": full, "namespace": namespace, "labels": _labels(name, {LABEL_TRACK: track})},
        "spec": {"selector": {LABEL_SERVICE: name, LABEL_TRACK: track},
                 "ports": [{"name": "http", "port": 80, "targetPort": PORT, "protocol": "TCP"}]},
    }


def http_route(name: str, namespace: str, weight: int, parent: dict) -> dict:
    """The route splitting traffic: `weight` percent to the canary, the rest to stable."""
    return {
        "apiVersion": f"{ROUTE_GROUP}/{ROUTE_VERSION}", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": namespace, "labels": _labels(name)},
        "spec": {
            "parentRefs": [parent],
            "rules": [{
                "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                "backendRefs": [
                    {"name": serving_backend_name(name, "stable"), "port": 80, "weight": 100 - weight},
                    {"name": serving_backend_name(name, "canary"), "port": 80, "weight": weight},
                ],
            }],
        },
    }


def gateway_objects(name: str, namespace: str, spec: ServiceSpec, stable: ServedVersion, canary: ServedVersion | None,
                    weight: int, s: CompileSettings, parent: dict) -> list[dict]:
    return [
        deployment(name, namespace, "stable", spec, stable, s, stable),
        deployment(name, namespace, "canary", spec, canary, s, stable),
        service(name, namespace, "stable"),
        service(name, namespace, "canary"),
        http_route(name, namespace, weight if canary else 0, parent),
    ]


def endpoints(backend: str, name: str, namespace: str) -> dict[str, str]:
    """In-cluster URLs of each track, for the analysis: KServe's tagged revisions (`prev`, `latest`)
    or the gateway backend's Services."""
    if backend == "kserve":
        return {"stable": f"http://prev-{name}-predictor.{namespace}.svc.cluster.local",
                "candidate": f"http://latest-{name}-predictor.{namespace}.svc.cluster.local"}
    return {"stable": f"http://{serving_backend_name(name, 'stable')}.{namespace}.svc.cluster.local",
            "candidate": f"http://{serving_backend_name(name, 'canary')}.{namespace}.svc.cluster.local"}
