"""Pure: the NMMService rollout as a state machine over its status. Each tick of the operator's
timer calls `plan` with the version the spec asks for (or why it cannot be resolved) and the
registry's champion; the handler does the I/O the plan asks for (a baseline reading of both
versions, the step's analysis), then `after_baseline` or `after_analysis`. All state lives in
the status, so a restarted operator carries on where the last one stopped (nothing in memory);
what the registry must be told rides in the status too (`pending`, nmm_operator.service_tick).

    (none) ──no champion (or it is the version)──▶ Healthy ──new version──▶ Progressing
       └──a champion: it is stable, the version a canary─────────────────────▲   │   │
                                                   Healthy ◀─every step passed───┘   │ a step failed; the
                                                                                     ▼ steps or the registry
                          RolledBack ◀──next tick── Degraded (weight 0 applied) ◀────┘ changed under it

Only a service whose model has no champion at all starts at 100 %: a service created (or
recreated, or one that lost its status) while a champion exists serves the champion as stable and
the asked version as a canary.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from nmm.spec.serving import ServiceSpec
from nmm.timestamps import epoch, rfc3339

MAX_RESULTS = 50  # status.analysis keeps the latest results


@dataclass
class Tick:
    status: dict
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (Normal|Warning, reason, message)
    need_baseline: bool = False  # scrape the canary before its step's pause starts
    analyse: bool = False  # the step's pause is over: judge it
    promote: int | None = None  # move `champion` to this version
    rolled_back: tuple[int, str] | None = None  # (version, reason) for the registry
    retry: str | None = None  # nothing can be decided now (the registry cannot say): why

    @property
    def versions(self) -> tuple[int | None, int | None, int]:
        """(stable, canary, weight) the children must serve."""
        s = self.status
        return s.get("stableVersion"), s.get("canaryVersion"), int(s.get("weight") or 0)


def _condition(status: dict, ready: bool, reason: str, message: str, now: float) -> None:
    conds = [c for c in status.get("conditions", []) if c.get("type") != "Ready"]
    old = next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), {})
    value = "True" if ready else "False"
    since = old.get("lastTransitionTime") if old.get("status") == value else rfc3339(now)
    status["conditions"] = conds + [
        {"type": "Ready", "status": value, "reason": reason, "message": message[:1000], "lastTransitionTime": since}
    ]
    status["message"] = message[:1000]


def plan(
    spec: ServiceSpec,
    status: dict | None,
    desired: int | str,
    now: float,
    promote_now: int | None = None,
    champion: int | None = None,
) -> Tick:
    """`desired`: the version the spec asks for, or why the registry cannot say (a canary in
    progress then fails: nothing judges it). `promote_now`: a version `nmm promote`/`nmm rollback`
    asked to serve at once (no canary). `champion`: the registry's champion, the stable of a
    service that serves nothing yet."""
    status = copy.deepcopy(status or {})
    stable, canary, phase = status.get("stableVersion"), status.get("canaryVersion"), status.get("phase")
    decision = Tick(status)
    if (
        stable is not None and canary is not None and phase == "Degraded"
    ):  # the last tick sent every request back to stable
        status.update(canaryVersion=None, weight=0, phase="RolledBack", step=None, baseline=None)
        _condition(
            status,
            True,
            "RolledBack",
            f"version {canary} rolled back; serving version {stable}: {status.get('reason', '')}",
            now,
        )
        decision.events.append(
            ("Warning", "RolledBack", f"version {canary} rolled back, version {stable} serves all traffic")
        )
        return decision
    if isinstance(desired, str):
        if canary is not None and phase == "Progressing":
            return _fail(decision, spec, [f"the version it rolls out cannot be resolved any more: {desired}"], {}, now)
        decision.retry = desired
        return decision
    if stable is not None and promote_now == desired and desired != stable:
        status.update(
            stableVersion=desired,
            previousStableVersion=stable,
            canaryVersion=None,
            weight=0,
            phase="Healthy",
            step=None,
            baseline=None,
        )
        _condition(
            status, True, "PromotedByHand", f"version {desired} serves all traffic (promoted by hand, no canary)", now
        )
        decision.events.append(
            ("Normal", "PromotedByHand", f"version {desired} replaces version {stable} without a canary")
        )
        decision.promote = desired
        return decision
    if stable is None:
        if champion is None or champion == desired or promote_now == desired:
            status.update(stableVersion=desired, canaryVersion=None, weight=0, phase="Healthy")
            _condition(status, True, "Deployed", f"serving version {desired}", now)
            decision.events.append(("Normal", "Deployed", f"serving {spec.model.name} version {desired}"))
            decision.promote = desired  # the registry's champion is what is served
            return decision
        status.update(
            stableVersion=champion, weight=0, phase="Healthy"
        )  # the champion serves; the asked version is a canary
        decision.events.append(("Normal", "ChampionServed", f"serving champion version {champion} as stable"))
        stable = champion
    if desired == stable:
        if canary is not None:
            status.update(canaryVersion=None, weight=0, phase="Healthy", step=None, baseline=None)
            _condition(status, True, "CanaryAborted", f"the spec asks for the stable version {stable} again", now)
            decision.events.append(
                ("Normal", "CanaryAborted", f"canary {canary} stopped: the spec asks for version {stable}")
            )
        return decision
    if canary != desired:
        if canary is None and desired == status.get("rolledBackVersion"):
            return decision  # stays rolled back until the spec names another version (or nmm promote)
        first = spec.canary.steps[0]
        status.update(
            canaryVersion=desired,
            step=1,
            weight=first.weight,
            phase="Progressing",
            baseline=None,
            stepStartedAt=None,
            canaryStartedAt=rfc3339(now),
            stableQuality=None,
            reason=None,
        )
        _condition(status, False, "CanaryStarted", f"rolling version {desired} out: step 1 at {first.weight}%", now)
        decision.events.append(
            (
                "Normal",
                "CanaryStarted",
                f"version {desired} canary against version {stable}: {first.weight}% of traffic",
            )
        )
        decision.need_baseline = True
        return decision
    if not 1 <= int(status.get("step") or 0) <= len(spec.canary.steps):
        return _fail(
            decision,
            spec,
            [
                f"canary.steps changed mid-canary: it was at step {status.get('step')}, the spec now has "
                f"{len(spec.canary.steps)}"
            ],
            {},
            now,
        )
    if status.get("baseline") is None:
        decision.need_baseline = True
        return decision
    pause = spec.canary.steps[status["step"] - 1].pause_seconds
    decision.analyse = now - (epoch(status.get("stepStartedAt")) or now) >= pause
    return decision


def failed(spec: ServiceSpec, status: dict, reason: str, now: float) -> Tick | None:
    """The tick of a canary whose planning or analysis raised: a failed step (traffic back to
    stable), never a stuck canary. Without a canary in progress there is nothing to fail: None."""
    decision = Tick(copy.deepcopy(status or {}))
    if decision.status.get("canaryVersion") is None or decision.status.get("phase") != "Progressing":
        return None
    return _fail(decision, spec, [reason], {}, now)


def after_baseline(decision: Tick, baseline: dict | str, spec: ServiceSpec, now: float, ready_timeout: float) -> Tick:
    """The canary's metrics at the start of its step; a canary not reachable for `ready_timeout`
    fails the rollout."""
    status = decision.status
    if isinstance(baseline, dict):
        status.update(baseline=baseline, stepStartedAt=rfc3339(now))
        return decision
    waited = now - (epoch(status.get("canaryStartedAt")) or now)
    if waited < ready_timeout:
        _condition(
            status,
            False,
            "WaitingForCanary",
            f"waiting for version {status['canaryVersion']} to answer: {baseline}",
            now,
        )
        return decision
    return _fail(decision, spec, [f"canary not ready after {waited:.0f} s: {baseline}"], {}, now)


def after_analysis(
    decision: Tick, spec: ServiceSpec, ok: bool, reasons: list[str], measured: dict, after: dict | None, now: float
) -> Tick:
    status = decision.status
    step, weight = status["step"], status["weight"]
    status["analysis"] = (status.get("analysis") or [])[-(MAX_RESULTS - 1) :] + [
        {
            "version": status["canaryVersion"],
            "step": step,
            "weight": weight,
            "ok": ok,
            "reasons": reasons,
            "measured": {k: round(float(v), 6) for k, v in measured.items() if v == v},
            "at": rfc3339(now),
        }
    ]
    if not ok:
        return _fail(decision, spec, reasons, measured, now)
    if step == len(spec.canary.steps):
        version = status["canaryVersion"]
        decision.promote = version
        status.update(
            stableVersion=version,
            previousStableVersion=status["stableVersion"],
            canaryVersion=None,
            weight=0,
            phase="Healthy",
            step=None,
            baseline=None,
        )
        _condition(status, True, "Promoted", f"version {version} passed every step and serves all traffic", now)
        decision.events.append(("Normal", "Promoted", f"version {version} promoted: champion moved, stable replaced"))
        return decision
    nxt = spec.canary.steps[step]
    status.update(step=step + 1, weight=nxt.weight, baseline=after, stepStartedAt=rfc3339(now))
    _condition(status, False, "StepPassed", f"step {step} passed; step {step + 1} at {nxt.weight}%", now)
    decision.events.append(
        (
            "Normal",
            "StepPassed",
            f"step {step} ({weight}%) passed; now {nxt.weight}% to version {status['canaryVersion']}",
        )
    )
    return decision


def _fail(decision: Tick, spec: ServiceSpec, reasons: list[str], measured: dict, now: float) -> Tick:
    status = decision.status
    version, step = status["canaryVersion"], status.get("step")
    reason = f"step {step} ({status.get('weight')}%): " + "; ".join(reasons)
    status.update(weight=0, phase="Degraded", reason=reason, rolledBackVersion=version)
    _condition(status, False, "AnalysisFailed", reason, now)
    decision.events.append(
        (
            "Warning",
            "AnalysisFailed",
            f"version {version} {reason}; all traffic back to version {status['stableVersion']}",
        )
    )
    decision.rolled_back = (version, reason)
    return decision
