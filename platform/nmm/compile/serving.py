"""Pure: what every serving backend's pods run (nmm.compile.backends lays them out): the
`nmm serve` container of one registered version, its pod spec and its placement on the GPU pools,
and the labels the operator finds a service's pods by."""

from __future__ import annotations

from dataclasses import dataclass

from nmm.compile import pods
from nmm.compile.settings import CompileSettings
from nmm.gpu import pools
from nmm.serve.batcher import BATCHING
from nmm.spec.serving import ServiceSpec

PORT = 8080
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


def labels(name: str, extra: dict | None = None) -> dict:
    return {
        "app.kubernetes.io/name": "nmm-serve",
        "app.kubernetes.io/managed-by": "nmm-operator",
        LABEL_SERVICE: name,
    } | (extra or {})


def container(spec: ServiceSpec, served: ServedVersion, s: CompileSettings, name: str = "kserve-container") -> dict:
    """`nmm serve` of one registered version's folder, its manifest checked against the digest
    the version was registered with before anything is served."""
    b, r = spec.batching, spec.resources
    limits = {"cpu": r.cpu, "memory": r.memory} | ({"nvidia.com/gpu": str(r.gpus)} if r.gpus else {})
    probe = lambda path: {"httpGet": {"path": path, "port": PORT}, "periodSeconds": 10}
    return {
        "name": name,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "command": ["nmm"],
        "args": [
            "serve",
            served.folder,
            "--name",
            spec.model.name,
            "--digest",
            served.digest,
            "--host",
            "0.0.0.0",
            "--port",
            str(PORT),
            *(knob.arg(getattr(b, key)) for key, knob in BATCHING.items()),
        ],
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
    chosen = (
        [p for p in s.gpu_pools if p.name == r.gpu_pool]
        if r.gpu_pool
        else pools.choose(s.gpu_pools, r.gpus, None, None)
    )
    if not chosen:
        raise pools.PlacementError(
            f"resources.gpuPool {r.gpu_pool!r} is not a declared pool: " + ", ".join(p.name for p in s.gpu_pools)
        )
    pools.choose(tuple(chosen), r.gpus, None, None)  # it must hold the GPUs asked for
    return {"affinity": pools.affinity(chosen), "tolerations": pools.tolerations(chosen)}


def pod_spec(spec: ServiceSpec, served: ServedVersion, s: CompileSettings, container_name: str) -> dict:
    return {
        "serviceAccountName": s.serving_service_account,
        "automountServiceAccountToken": False,
        "securityContext": pods.pod_security_context(s),
        "containers": [container(spec, served, s, container_name)],
        "volumes": [pods.tmp_volume()],
    } | _placement(spec, s)
