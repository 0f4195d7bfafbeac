"""One tick of an NMMService's rollout, with its I/O behind `World`, so that the order of its
writes is one function's and a crash at any line can be replayed (tests/unit/test_service_tick.py
crashes it at each write; the integration test kills the real operator at each failpoint).

The order of writes, every tick that changes anything:

    1. the status, with the decision and what is still to do (`pending`: the registry's intents
       and the nmm.dev/promote annotation to consume)           ← the intent, before any child
    2. the children (Deployments/Services/HTTPRoute, or the InferenceService) for that status
    3. the registry: `champion` := the new stable; a rolled-back version tagged with its reason
    4. the annotation removed (only if it still holds the value this tick honoured)
    5. the status again, `pending` cleared (the handler's patch)

A tick that finds `pending` does 2–5 again and decides nothing new: every write is idempotent,
so replaying a tick that died after any of them converges on the same state — the registry's
champion and the served stable agree at rest. A canary's planning or analysis that raises is a
failed step (traffic back to stable), never a stuck canary.
"""

from __future__ import annotations

import os
import re
from typing import Protocol

from nmm.rollout import analysis
from nmm.spec.serving import ServiceSpec
from nmm.timestamps import epoch, rfc3339
from nmm_operator import rollout_state

FAILPOINT_ENV = "NMM_OPERATOR_FAILPOINT"  # tests: the operator dies (exit 137) at this point of a tick
VERSION = re.compile(r"^[1-9][0-9]{0,9}$")  # an annotation's version: ASCII digits ("²" is a digit to isdigit)


class World(Protocol):
    """The I/O one tick may do (nmm_operator.service_handlers gives the real one)."""

    def resolve(self) -> int | str: ...  # the version the spec asks for, or why the registry cannot say
    def champion(self) -> int | None: ...  # the registry's champion (raises when it cannot say)
    def read(self, stable: int | None, canary: int | None) -> dict: ...  # {"candidate"|"stable": Scrape | str}
    def judge(self, before: dict, after: dict, stable_quality: dict | None) -> tuple[analysis.Verdict, dict | None]: ...
    def write_status(self, status: dict) -> None: ...
    def apply(self, stable: int, canary: int | None, weight: int) -> None: ...
    def promote(self, version: int) -> None: ...
    def tag_rolled_back(self, version: int, reason: str) -> None: ...
    def consume(self, annotation: str) -> None: ...


class Retry(Exception):
    """Nothing can be decided now (the registry cannot say); the status is unchanged."""


def failpoint(name: str) -> None:
    if os.environ.get(FAILPOINT_ENV) == name:
        os._exit(137)


def asked_version(annotation: str | None) -> tuple[int | None, str | None]:
    """(the version nmm.dev/promote asks for, or why its value is not one)."""
    if not annotation:
        return None, None
    if VERSION.match(annotation):
        return int(annotation), None
    return None, f"nmm.dev/promote={annotation[:20]!r} is not a version number: ignored"


def tick(
    spec: ServiceSpec,
    status: dict | None,
    annotation: str | None,
    world: World,
    now: float,
    *,
    ready_timeout: float,
    recheck_seconds: float,
    generation=None,
) -> rollout_state.Tick:
    """Decide, record, act. Returns the tick (its status is what the handler patches last)."""
    status = dict(status or {})
    if status.get("pending"):  # an earlier tick recorded its intent and did not finish: finish it, decide nothing
        decision = rollout_state.Tick(status)
        settle(world, decision, generation, now)
        return decision
    promote_now, bad = asked_version(annotation)
    decision = decide(spec, status, promote_now, world, now, ready_timeout)
    if bad:
        decision.events.append(("Warning", "PromoteIgnored", bad))
    elif annotation and promote_now not in (decision.versions[0], None) and not decision.promote:
        decision.events.append(
            ("Warning", "PromoteIgnored", f"nmm.dev/promote={annotation} is not the version the spec asks for")
        )
    stable, canary_v, weight = decision.versions
    state = _state(decision, generation)
    changed = (
        state != (status.get("applied") or {}).get("state")
        or decision.promote is not None
        or decision.rolled_back is not None
        or annotation
    )
    if changed and stable is not None:
        rolled = (
            {"version": decision.rolled_back[0], "reason": decision.rolled_back[1]} if decision.rolled_back else None
        )
        # Never empty: a merge patch drops null members, and an empty `pending` would read as "nothing to do".
        decision.status["pending"] = {"state": state} | {
            k: v
            for k, v in (("champion", decision.promote), ("rolledBack", rolled), ("annotation", annotation))
            if v is not None
        }
        world.write_status(decision.status)  # 1: the intent, before anything it decides is done
        failpoint("after-intent")
        settle(world, decision, generation, now)
    elif stable is not None and now - (epoch((status.get("applied") or {}).get("at")) or 0) >= recheck_seconds:
        # Unchanged children are re-asserted (recreated if deleted, taken back if edited) every recheckSeconds.
        world.apply(stable, canary_v, weight)
        decision.status["applied"] = {"state": state, "at": rfc3339(now)}
    return decision


def decide(
    spec: ServiceSpec, status: dict, promote_now: int | None, world: World, now: float, ready_timeout: float
) -> rollout_state.Tick:
    """The plan and the I/O it asks for. A raise on a canary in progress is its failed step."""
    try:
        desired = world.resolve()
        champion = world.champion() if status.get("stableVersion") is None else None
        decision = rollout_state.plan(spec, status, desired, now, promote_now, champion)
        if decision.retry:
            raise Retry(decision.retry)
        if decision.need_baseline:
            reading = world.read(*decision.versions[:2])
            baseline = reading["candidate"] if isinstance(reading["candidate"], str) else _baseline(reading)
            decision = rollout_state.after_baseline(decision, baseline, spec, now, ready_timeout)
        elif decision.analyse:
            decision = _analyse(decision, spec, world, now)
        return decision
    except Retry:
        raise
    except Exception as exc:
        decision = rollout_state.failed(spec, status, f"planning failed: {type(exc).__name__}: {exc}", now)
        if decision is None:
            raise Retry(f"{type(exc).__name__}: {exc}") from exc
        return decision


def _baseline(reading: dict) -> dict:
    return {track: (analysis.to_dict(s) if isinstance(s, dict) else {"error": s}) for track, s in reading.items()}


def _from_baseline(b: dict) -> dict:
    if "candidate" not in b:  # a status written by an nmm that kept the candidate's alone
        return {"candidate": analysis.from_dict(b), "stable": "no baseline of the stable version"}
    return {track: (s["error"] if "error" in s else analysis.from_dict(s)) for track, s in b.items()}


def _analyse(decision: rollout_state.Tick, spec: ServiceSpec, world: World, now: float) -> rollout_state.Tick:
    status = decision.status
    after = world.read(*decision.versions[:2])
    verdict, stable_q = world.judge(_from_baseline(status["baseline"]), after, status.get("stableQuality"))
    status["stableQuality"] = stable_q
    nxt = world.read(
        *decision.versions[:2]
    )  # the next step's baseline: after the probe, whose requests are not traffic
    return rollout_state.after_analysis(
        decision,
        spec,
        verdict.ok,
        verdict.reasons,
        verdict.measured,
        None if isinstance(nxt["candidate"], str) else _baseline(nxt),
        now,
    )


def _state(decision: rollout_state.Tick, generation) -> str:
    stable, canary_v, weight = decision.versions
    return f"{stable}/{canary_v}/{weight}/{generation}"


def settle(world: World, decision: rollout_state.Tick, generation, now: float) -> None:
    """Writes 2–4 for the status's state and intents, then `pending` cleared (write 5 is the
    handler's status patch). Each is idempotent: a replay after a crash does them again."""
    status = decision.status
    pending = status.get("pending") or {}
    stable, canary_v, weight = decision.versions
    world.apply(stable, canary_v, weight)
    failpoint("after-children")
    if pending.get("champion") is not None:
        world.promote(int(pending["champion"]))
    if pending.get("rolledBack"):
        world.tag_rolled_back(int(pending["rolledBack"]["version"]), pending["rolledBack"]["reason"])
    failpoint("after-registry")
    if pending.get("annotation"):
        world.consume(pending["annotation"])
    failpoint("after-annotation")
    if pending.get("champion") is not None:
        decision.promote = int(pending["champion"])
    status["pending"] = None
    status["applied"] = {"state": _state(decision, generation), "at": rfc3339(now)}
