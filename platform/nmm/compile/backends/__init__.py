"""Serving backends: how an NMMService's rollout state (a stable version, a canary and its
weight) becomes objects on the cluster, registered by name (the chart's `serving.backend`).

A backend is an object with
- `name`;
- `custom_kinds`: the custom resources it emits, `kind → (group, version, plural)` (the operator
  creates and patches them through the custom-objects API; core and apps kinds it knows);
- `rbac`: the ClusterRole rules the operator needs for them (`make golden` writes them into the
  chart, which grants exactly the chosen backend's);
- `children(name, namespace, spec, stable, canary, weight, settings, serving)`: the objects for the
  current state, pure (`serving`: the chart's `serving` values, for a backend's own settings);
- `endpoints(name, namespace)`: the in-cluster URL of each track (`stable`, `candidate`), what the
  canary analysis reads;
- `split(children)`: the traffic split those objects ask for, percent per track.

The local rollout's router (nmm.rollout.router.Router) meets the same traffic-split contract on
loopback: the same two tracks, `split()` the same percentages for a weight (a test holds the
three to one another). Adding a backend: its module here, its entry in `BACKENDS`, and a test that what it emits
validates against the upstream CRD schemas.
"""

from __future__ import annotations

from typing import Protocol

from nmm.compile.backends.gateway import GATEWAY
from nmm.compile.backends.kserve import KSERVE
from nmm.compile.serving import ServedVersion
from nmm.compile.settings import CompileSettings
from nmm.plugins import entry
from nmm.spec.serving import ServiceSpec


class Backend(Protocol):
    name: str
    custom_kinds: dict[str, tuple[str, str, str]]
    rbac: tuple[dict, ...]

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
    ) -> list[dict]: ...

    def endpoints(self, name: str, namespace: str) -> dict[str, str]: ...

    def split(self, children: list[dict]) -> dict[str, int]: ...


BACKENDS: dict[str, Backend] = {b.name: b for b in (KSERVE, GATEWAY)}


def backend(name: str) -> Backend:
    return entry(BACKENDS, name, "serving.backend")


def rbac_by_backend() -> dict[str, list[dict]]:
    """What the chart grants the operator for each backend (charts/nmm-platform/files/serving-backends.yaml)."""
    return {name: [dict(rule) for rule in b.rbac] for name, b in sorted(BACKENDS.items())}
