"""kopf handlers of `NMMService`: one timer, level-triggered. Each tick resolves the version the
spec asks for (an alias through the registry), plans the rollout from the status
(nmm_operator.canary), does the I/O the plan needs (the canary's metrics, the step's analysis —
the same code a local rollout runs, nmm.serve.canary), writes the children, moves the registry,
then the status. Loaded by nmm_operator.handlers.
"""

from __future__ import annotations

import time

import kopf
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter, Gauge, start_http_server
from pydantic import ValidationError

from nmm import lineage, storage
from nmm.compile import serving as build
from nmm.gpu.pools import PlacementError
from nmm.serve import analysis, canary as serve_canary, probe
from nmm.spec.serving import ANNOTATION_PROMOTE, ServiceSpec
from nmm_operator import canary, serving_kube, settings as operator_settings

SETTINGS = operator_settings.load()
LABELS = ["namespace", "service"]
WEIGHT = Gauge("nmm_canary_weight", "Percent of an NMMService's traffic on its canary", LABELS)
QUALITY = Gauge("nmm_canary_quality", "Quality probe score of a version (canary analysis)", LABELS + ["track", "version"])
STEPS = Counter("nmm_canary_steps", "Canary steps analysed, by result", LABELS + ["result"])


@kopf.on.startup(id="nmm-operator-metrics")
def serve_metrics(**_) -> None:
    if SETTINGS.metrics_port:
        start_http_server(SETTINGS.metrics_port)


def _export(meta: dict, t: canary.Tick) -> None:
    ids = (meta["namespace"], meta["name"])
    WEIGHT.labels(*ids).set(t.versions[2] if t.versions[1] else 0)
    results = t.status.get("analysis") or []
    if t.analyse and results:
        last = results[-1]
        STEPS.labels(*ids, "passed" if last["ok"] else "failed").inc()
        for track, key, version in (("candidate", "quality_candidate", last["version"]),
                                    ("stable", "quality_stable", t.status.get("previousStableVersion")
                                     if t.promote else t.status.get("stableVersion"))):
            if key in last["measured"] and version is not None:
                QUALITY.labels(*ids, track, str(version)).set(last["measured"][key])


def _spec_problems(exc: ValidationError) -> str:
    return "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def resolve(spec: ServiceSpec) -> int:
    """The version the spec asks for; a TemporaryError when the registry cannot say."""
    try:
        info = lineage.alias_version(spec.model.name, spec.model.alias) if spec.model.alias else \
            lineage.model_version(spec.model.name, str(spec.model.version))
    except lineage.TrackingError as exc:
        raise kopf.TemporaryError(f"model registry: {exc}", delay=SETTINGS.serving_tick_seconds) from None
    if info is None:
        raise kopf.TemporaryError(f"{spec.model.uri}: no such registered model version or alias", delay=30)
    return int(info.version)


def _cases(spec: ServiceSpec) -> list[dict]:
    qp = spec.canary.analysis.quality_probe
    if qp is None or not qp.cases_uri:
        return []
    try:
        return probe.loads(storage.read_bytes(storage.in_store(qp.cases_uri, SETTINGS.compile.store_uri)), qp.cases)
    except (storage.StorageError, probe.ProbeError) as exc:
        raise kopf.TemporaryError(f"quality probe cases {qp.cases_uri}: {exc}", delay=30) from None


def endpoints(meta: dict) -> dict[str, str]:
    key = f"{meta['namespace']}/{meta['name']}"
    return SETTINGS.endpoints.get(key) or build.endpoints(SETTINGS.serving_backend, meta["name"], meta["namespace"])


def _analyse(t: canary.Tick, spec: ServiceSpec, meta: dict, now: float) -> canary.Tick:
    st = t.status
    verdict, after, stable_q = serve_canary.judge_step(analysis.Limits.of(spec.canary.analysis), analysis.from_dict(st["baseline"]), endpoints(meta),
                                                       _cases(spec), st.get("stableQuality"))
    st["stableQuality"] = stable_q
    return canary.after_analysis(t, spec, verdict.ok, verdict.reasons, verdict.measured,
                                 analysis.to_dict(after) if after else None, now)


def _registry(t: canary.Tick, spec: ServiceSpec, meta: dict) -> None:
    try:
        if t.promote is not None:
            lineage.promote(spec.model.name, str(t.promote), "champion",
                            {"nmm.serving.decision": "promoted", "nmm.serving.service": f"{meta['namespace']}/{meta['name']}"})
        if t.rolled_back is not None:
            version, reason = t.rolled_back
            lineage.tag_version(spec.model.name, str(version), {"nmm.serving.decision": "rolled_back", "nmm.serving.reason": reason,
                                                                "nmm.serving.service": f"{meta['namespace']}/{meta['name']}"})
    except lineage.TrackingError as exc:
        raise kopf.TemporaryError(f"model registry: {exc}", delay=SETTINGS.serving_tick_seconds) from None


@kopf.timer(serving_kube.GROUP, serving_kube.VERSION, serving_kube.SERVICE_PLURAL, interval=SETTINGS.serving_tick_seconds,
            id="nmm-service-rollout")
def rollout(body, meta, spec, status, patch: kopf.Patch, **_) -> None:
    now = time.time()
    try:
        svc = ServiceSpec.model_validate(dict(spec))
    except ValidationError as exc:
        patch.status.update(phase="Failed", message=_spec_problems(exc)[:1000], observedGeneration=meta.get("generation"))
        return
    desired = resolve(svc)
    asked = (meta.get("annotations") or {}).get(ANNOTATION_PROMOTE, "")
    t = canary.plan(svc, dict(status or {}), desired, now, int(asked) if asked.isdigit() else None)
    if t.need_baseline:
        snap = serve_canary.scrape(endpoints(meta)["candidate"])
        t = canary.after_baseline(t, snap if isinstance(snap, str) else analysis.to_dict(snap), svc, now,
                                  SETTINGS.serving_ready_timeout)
    elif t.analyse:
        t = _analyse(t, svc, meta, now)
    stable, canary_version, weight = t.versions
    applied = f"{stable}/{canary_version}/{weight}/{meta.get('generation')}"
    last = t.status.get("applied") or {}
    try:
        # The children change with the rollout's state; unchanged, they are re-asserted (recreated if
        # deleted, taken back if edited) every recheckSeconds rather than on every tick.
        if last.get("state") != applied or now - (canary.epoch(last.get("at")) or 0) >= SETTINGS.recheck_seconds:
            serving_kube.apply(serving_kube.children(body, svc, stable, canary_version, weight, SETTINGS), meta["uid"])
            t.status["applied"] = {"state": applied, "at": canary.iso(now)}
    except serving_kube.NotOwned as exc:
        patch.status.update(phase="Failed", message=str(exc))
        raise kopf.TemporaryError(str(exc), delay=30)
    except PlacementError as exc:
        patch.status.update(phase="Failed", message=str(exc))
        return
    except ApiException as exc:
        raise kopf.TemporaryError(f"serving objects: {exc.status} {exc.reason}", delay=10) from None
    _registry(t, svc, meta)
    patch.status.update(t.status | {"observedGeneration": meta.get("generation")})
    if asked and any(reason == "PromotedByHand" for _, reason, _ in t.events):
        patch.metadata.annotations[ANNOTATION_PROMOTE] = None  # honoured once: a later return to it is a canary
    _export(meta, t)
    for kind, reason, message in t.events:
        kopf.event(body, type=kind, reason=reason, message=message)
