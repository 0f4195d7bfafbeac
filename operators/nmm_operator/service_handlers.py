"""kopf handlers of `NMMService`: one timer, level-triggered. Each tick is
nmm_operator.service_tick's, with the real I/O (`KubeWorld`): the version the spec asks for (an
alias through the registry, in the namespace that owns the model), every pod of each version's
metrics, the step judge the local rollout runs too (nmm.rollout.judge.judge_step), the children,
the registry, the status. Loaded by nmm_operator.handlers.
"""

from __future__ import annotations

import time

import kopf
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter, Gauge, start_http_server
from pydantic import ValidationError

from nmm import kubeclient, lineage, storage
from nmm.compile import backends
from nmm.compile import serving as build
from nmm.gpu.pools import PlacementError
from nmm.rollout import analysis, judge, probe
from nmm.spec.serving import ANNOTATION_PROMOTE, ServiceSpec
from nmm_operator import kube, rollout_state, service_tick, serving_kube
from nmm_operator import settings as operator_settings

SETTINGS = operator_settings.load()
LABELS = ["namespace", "service"]
WEIGHT = Gauge("nmm_canary_weight", "Percent of an NMMService's traffic on its canary", LABELS)
QUALITY = Gauge(
    "nmm_canary_quality", "Quality probe score of a version (canary analysis)", LABELS + ["track", "version"]
)
STEPS = Counter("nmm_canary_steps", "Canary steps analysed, by result", LABELS + ["result"])


@kopf.on.startup(id="nmm-operator-metrics")
def serve_metrics(**_) -> None:
    if SETTINGS.operator.metrics_port:
        start_http_server(SETTINGS.operator.metrics_port)


def _export(meta: dict, decision: rollout_state.Tick) -> None:
    ids = (meta["namespace"], meta["name"])
    WEIGHT.labels(*ids).set(decision.versions[2] if decision.versions[1] else 0)
    results = decision.status.get("analysis") or []
    if decision.analyse and results:
        last = results[-1]
        STEPS.labels(*ids, "passed" if last["ok"] else "failed").inc()
        for track, key, version in (
            ("candidate", "quality_candidate", last["version"]),
            (
                "stable",
                "quality_stable",
                decision.status.get("previousStableVersion")
                if decision.promote
                else decision.status.get("stableVersion"),
            ),
        ):
            if key in last["measured"] and version is not None:
                QUALITY.labels(*ids, track, str(version)).set(last["measured"][key])


def _spec_problems(exc: ValidationError) -> str:
    return "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def ready_pods(namespace: str, service: str, version: int) -> dict[str, str]:
    """Every ready pod serving `version` of the service, by name → its metrics URL: an analysis
    reads each of them (a Service would answer from whichever pod it picked)."""
    selector = f"{build.LABEL_SERVICE}={service},{build.LABEL_VERSION}={version}"
    out = {}
    for pod in kubeclient.core().list_namespaced_pod(namespace, label_selector=selector).items:
        conditions = {c.type: c.status for c in (pod.status.conditions or [])}
        if pod.status.pod_ip and conditions.get("Ready") == "True" and not pod.metadata.deletion_timestamp:
            out[pod.metadata.name] = f"http://{pod.status.pod_ip}:{build.PORT}"
    return out


class Unservable(RuntimeError):
    """A version the registry cannot tell a server how to read."""


def served_version(info: lineage.ModelVersionInfo) -> build.ServedVersion | None:
    return build.ServedVersion(int(info.version), info.folder, info.digest) if info.folder and info.digest else None


class KubeWorld:
    """service_tick.World against the API server, the registry and the served pods."""

    def __init__(self, body, spec: ServiceSpec):
        self.body, self.spec = body, spec
        self.meta = body["metadata"]
        self.ns, self.name = self.meta["namespace"], self.meta["name"]
        self.override = SETTINGS.serving.endpoints.get(f"{self.ns}/{self.name}")  # an operator outside the cluster

    def resolve(self) -> int | str:
        m = self.spec.model
        try:
            info = lineage.alias_version(m.name, m.alias) if m.alias else lineage.model_version(m.name, str(m.version))
        except lineage.TrackingError as exc:
            return f"model registry: {exc}"
        if info is None:
            return f"{m.uri}: no such registered model version or alias"
        return (
            int(info.version)
            if served_version(info)
            else f"{m.uri}: version {info.version} records no model folder and digest"
        )

    def served(self, version: int) -> build.ServedVersion:
        """What a server of `version` reads: its folder and digest, from the registry (servers never ask it)."""
        info = lineage.model_version(self.spec.model.name, str(version))
        out = served_version(info) if info is not None else None
        if out is None:
            raise Unservable(
                f"{self.spec.model.name} version {version}: not in the registry, or it records no model "
                "folder and digest (nmm.model_store_uri, nmm.model_digest)"
            )
        return out

    def champion(self) -> int | None:
        info = lineage.alias_version(self.spec.model.name, "champion")
        return int(info.version) if info is not None else None

    def _endpoints(self, track: str, version: int | None) -> dict[str, str]:
        if self.override:
            return {track: self.override[track]}
        return ready_pods(self.ns, self.name, version) if version is not None else {}

    def read(self, stable: int | None, canary_v: int | None) -> dict:
        return {
            "candidate": judge.read(self._endpoints("candidate", canary_v)),
            "stable": judge.read(self._endpoints("stable", stable)),
        }

    def _cases(self) -> probe.Cases | None:
        qp = self.spec.canary.analysis.quality_probe
        if qp is None or not qp.cases_uri:
            return None
        try:
            return probe.loads(storage.read_bytes(storage.in_store(qp.cases_uri, SETTINGS.compile.store_uri)), qp.cases)
        except storage.StorageError as exc:
            raise probe.ProbeError(f"quality probe cases {qp.cases_uri}: {exc}") from None

    def judge(self, before: dict, after: dict, stable_quality: dict | None):
        urls = self.override or backends.backend(SETTINGS.serving.backend).endpoints(self.name, self.ns)
        return judge.judge_step(
            analysis.Limits.of(self.spec.canary.analysis), before, after, urls, self._cases(), stable_quality
        )

    def write_status(self, status: dict) -> None:
        kubeclient.custom_objects().patch_namespaced_custom_object_status(
            serving_kube.GROUP,
            serving_kube.VERSION,
            self.ns,
            serving_kube.SERVICE_PLURAL,
            self.name,
            {"status": status},
        )

    def apply(self, stable: int, canary_v: int | None, weight: int) -> None:
        objs = serving_kube.children(
            self.body,
            self.spec,
            self.served(stable),
            self.served(canary_v) if canary_v is not None else None,
            weight,
            SETTINGS,
        )
        serving_kube.apply(objs, self.meta["uid"])

    def _decision(self) -> dict[str, str]:
        return {"nmm.serving.service": f"{self.ns}/{self.name}"}

    def promote(self, version: int) -> None:
        lineage.promote(
            self.spec.model.name, str(version), "champion", {"nmm.serving.decision": "promoted", **self._decision()}
        )

    def tag_rolled_back(self, version: int, reason: str) -> None:
        lineage.tag_version(
            self.spec.model.name,
            str(version),
            {"nmm.serving.decision": "rolled_back", "nmm.serving.reason": reason, **self._decision()},
        )

    def consume(self, annotation: str) -> None:
        """Remove nmm.dev/promote if it still holds `annotation` (a newer request is left alone)."""
        path = "/metadata/annotations/" + ANNOTATION_PROMOTE.replace("~", "~0").replace("/", "~1")
        try:
            kubeclient.custom_objects().patch_namespaced_custom_object(
                serving_kube.GROUP,
                serving_kube.VERSION,
                self.ns,
                serving_kube.SERVICE_PLURAL,
                self.name,
                [{"op": "test", "path": path, "value": annotation}, {"op": "remove", "path": path}],
            )
        except ApiException as exc:
            if exc.status not in (409, 422):  # the test failed: the annotation is gone or newer
                raise


@kopf.timer(
    serving_kube.GROUP,
    serving_kube.VERSION,
    serving_kube.SERVICE_PLURAL,
    interval=SETTINGS.serving.tick_seconds,
    id="nmm-service-rollout",
)
def rollout(body, patch: kopf.Patch, **_) -> None:
    now = time.time()
    try:
        body = kube.one_version(body)  # spec, annotations and status of one version, not a live view
    except kube.Changing as exc:
        raise kopf.TemporaryError(str(exc), delay=SETTINGS.serving.tick_seconds) from None
    meta, spec, status = body["metadata"], body.get("spec") or {}, body.get("status")
    try:
        svc = ServiceSpec.model_validate(dict(spec))
    except ValidationError as exc:
        patch.status.update(
            phase="Failed", message=_spec_problems(exc)[:1000], observedGeneration=meta.get("generation")
        )
        return
    delay = SETTINGS.serving.tick_seconds
    try:
        lineage.check_owner(svc.model.name, meta["namespace"])
        decision = service_tick.tick(
            svc,
            dict(status or {}),
            (meta.get("annotations") or {}).get(ANNOTATION_PROMOTE),
            KubeWorld(body, svc),
            now,
            ready_timeout=SETTINGS.serving.ready_timeout_seconds,
            recheck_seconds=SETTINGS.operator.recheck_seconds,
            generation=meta.get("generation"),
        )
    except lineage.ForeignModel as exc:
        patch.status.update(phase="Failed", message=str(exc)[:1000], observedGeneration=meta.get("generation"))
        return
    except (service_tick.Retry, lineage.TrackingError) as exc:  # what is recorded stays; the next tick retries
        raise kopf.TemporaryError(str(exc), delay=delay) from None
    except (serving_kube.NotOwned, Unservable) as exc:
        patch.status.update(phase="Failed", message=str(exc))
        raise kopf.TemporaryError(str(exc), delay=30) from None
    except PlacementError as exc:
        patch.status.update(phase="Failed", message=str(exc))
        return
    except ApiException as exc:
        raise kopf.TemporaryError(f"serving objects: {exc.status} {exc.reason}", delay=10) from None
    patch.status.update(decision.status | {"observedGeneration": meta.get("generation")})
    _export(meta, decision)
    for kind, reason, message in decision.events:
        kopf.event(body, type=kind, reason=reason, message=message)
