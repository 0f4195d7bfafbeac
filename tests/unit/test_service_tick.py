"""An NMMService's rollout tick against a world in memory (registry, children, the status the API
server keeps, the nmm.dev/promote annotation), so that the operator can be "killed" between any two
of its writes and replayed (issue 27 items 3–6, R25):

- a crash after any write of a promotion, a rollback or a by-hand promotion converges on the same
  state: the registry's champion is the served stable, nothing tagged rolled_back that was
  promoted, the annotation consumed exactly once;
- a service created (or one that lost its status) while a champion exists serves the champion
  and rolls the asked version out as a canary; only a model with no champion starts at 100 %;
- shrinking the steps mid-canary, a registry version deleted mid-canary, an annotation "²", an
  exception while reading or judging: each is a failed step with its reason, traffic to stable;
- `nmm promote` and `nmm rollback` racing, in both orders: champion and what is served agree.
"""

from __future__ import annotations

import copy

import pytest

from nmm.rollout import analysis
from nmm.spec.serving import ServiceSpec
from nmm_operator import service_tick
from tests import merge_patch

T0 = 1_800_000_000.0
STEPS = [{"weight": 20, "pauseSeconds": 10}, {"weight": 100, "pauseSeconds": 10}]


class Crash(Exception):
    """The operator process died here."""


def merge(old: dict, new: dict) -> dict:
    """A status patch as the API server applies it (RFC 7386: null removes a member, at any
    depth), into a copy of its own."""
    return copy.deepcopy(merge_patch.apply(old, new))


class World:
    """Registry, children and the API server's copy of the service, in memory. `crash_at`: the
    write (1-based, over every write of the run) at which the operator dies."""

    def __init__(self, versions=(1, 2, 3), champion: int | None = None, spec_version: int = 1):
        self.versions = set(versions)
        self.aliases = {"champion": champion} if champion else {}
        self.tags: dict[int, dict] = {}
        self.children: tuple | None = None
        self.stored: dict = {}
        self.annotation: str | None = None
        self.spec = {"model": {"name": "m", "version": spec_version}, "canary": {"steps": STEPS}}
        self.writes = 0
        self.crash_at: int | None = None
        self.verdict = True
        self.fail_read: Exception | None = None

    def _write(self) -> None:
        self.writes += 1
        if self.crash_at == self.writes:
            raise Crash(self.writes)

    # service_tick.World
    def resolve(self):
        v = self.spec["model"]["version"]
        return v if v in self.versions else f"models:/m/{v}: no such registered model version or alias"

    def champion(self):
        return self.aliases.get("champion")

    def read(self, stable, canary):
        if self.fail_read:
            raise self.fail_read
        snap = {"pod": analysis.Snapshot({"200": 100.0}, ((0.1, 100.0),), ((0.1, 100.0),), 100.0, 0.0)}
        return {"candidate": snap if canary else "no endpoint serves it", "stable": snap}

    def judge(self, before, after, stable_quality):
        return analysis.Verdict(self.verdict, [] if self.verdict else ["error rate 0.5 > maxErrorRate 0.02"]), {
            "m2t": 0.9
        }

    def write_status(self, status):
        self._write()
        self.stored = merge(self.stored, status)
        assert self.stored.get("pending"), "an intent that the API server's merge leaves reading as nothing to do"

    def apply(self, stable, canary, weight):
        self._write()
        self.children = (stable, canary, weight)

    def promote(self, version):
        self._write()
        self.aliases["champion"] = version

    def tag_rolled_back(self, version, reason):
        self._write()
        self.tags.setdefault(version, {})["decision"] = "rolled_back"

    def consume(self, annotation):
        self._write()
        if self.annotation == annotation:
            self.annotation = None

    # the kopf handler around the tick, and the clock
    def tick(self, now: float):
        spec = ServiceSpec.model_validate(self.spec)
        try:
            t = service_tick.tick(
                spec,
                copy.deepcopy(self.stored),
                self.annotation,
                self,
                now,
                ready_timeout=600,
                recheck_seconds=3600,
                generation=1,
            )
            self._write()  # the handler's status patch
        except (Crash, service_tick.Retry):  # the process died; or kopf's TemporaryError: the next tick tries again
            return None
        self.stored = merge(self.stored, t.status)
        return t

    def settle(self, now: float, ticks: int = 12) -> float:
        for _ in range(ticks):
            now += 11
            self.tick(now)
        return now

    def served(self) -> tuple:
        return self.stored.get("stableVersion"), self.stored.get("canaryVersion"), self.stored.get("weight")


def promotion(world: World, verdict: bool = True, crash_at: int | None = None) -> World:
    world.tick(T0)  # serving version 1, champion 1
    world.crash_at = None if crash_at is None else world.writes + crash_at
    world.spec["model"]["version"] = 2
    world.verdict = verdict
    world.settle(T0)
    return world


def at_rest(w: World) -> None:
    assert "pending" not in w.stored and w.annotation is None
    assert w.children == (w.stored["stableVersion"], None, 0) == (w.served()[0], None, 0)
    assert w.aliases["champion"] == w.stored["stableVersion"]


@pytest.mark.parametrize("verdict", [True, False], ids=["promoted", "rolled-back"])
def test_a_crash_after_any_write_of_a_canary_replays_to_the_same_decision(verdict):
    clean = promotion(World(), verdict)
    at_rest(clean)
    assert clean.served()[0] == (2 if verdict else 1) and (2 in clean.tags) is not verdict
    for k in range(1, clean.writes + 1):
        w = promotion(World(), verdict, crash_at=k)
        w.crash_at = None
        w.settle(T0 + 1000)
        at_rest(w)
        assert w.served() == clean.served(), (k, w.stored)
        assert w.tags == clean.tags, (k, w.tags)  # never rolled_back after a promotion, whatever line it died on


def test_a_crash_after_any_write_of_a_promotion_by_hand_replays_and_consumes_the_annotation_once():
    def by_hand(w: World, crash_at: int | None = None) -> World:
        w.tick(T0)
        w.crash_at = None if crash_at is None else w.writes + crash_at
        w.spec["model"]["version"], w.annotation = 3, "3"
        w.settle(T0, 3)
        return w

    clean = by_hand(World())
    at_rest(clean)
    assert clean.served() == (3, None, 0) and clean.stored["previousStableVersion"] == 1
    for k in range(1, clean.writes + 1):
        w = by_hand(World(), crash_at=k)
        w.crash_at = None
        w.settle(T0 + 1000)
        at_rest(w)
        assert w.served() == (3, None, 0), (k, w.stored)
    w.spec["model"]["version"] = 1  # a later return to version 1 is a canary: the annotation did not linger
    w.tick(T0 + 2000)
    assert w.served() == (3, 1, 20)


def test_a_service_created_while_a_champion_exists_serves_it_and_rolls_the_version_out_as_a_canary():
    w = World(champion=1, spec_version=2)
    w.tick(T0)
    assert w.served() == (1, 2, 20) and w.children == (1, 2, 20) and w.stored["phase"] == "Progressing"
    w.settle(T0)
    at_rest(w)
    assert w.served() == (2, None, 0)
    lost = World(champion=2, spec_version=3)  # a service that lost its status (or was recreated) mid-life
    lost.tick(T0)
    assert lost.served() == (2, 3, 20)
    fresh = World(champion=None, spec_version=2)  # no champion at all: the only case that starts at 100 %
    fresh.tick(T0)
    assert fresh.served() == (2, None, 0) and fresh.aliases["champion"] == 2


def in_canary() -> World:
    w = World()
    w.tick(T0)
    w.spec["model"]["version"] = 2
    w.tick(T0 + 1)
    w.tick(T0 + 2)
    assert w.served() == (1, 2, 20) and w.stored.get("baseline")
    return w


@pytest.mark.parametrize(
    "break_it, why",
    [
        (
            lambda w: w.spec["canary"].update(steps=[{"weight": 100, "pauseSeconds": 1}]) or w.stored.update(step=2),
            "canary.steps changed mid-canary",
        ),
        (lambda w: w.versions.discard(2), "cannot be resolved any more"),
        (lambda w: setattr(w, "fail_read", ZeroDivisionError("a surprise")), "planning failed: ZeroDivisionError"),
    ],
    ids=["steps-shrunk", "version-deleted", "analysis-raised"],
)
def test_what_breaks_a_canary_mid_step_fails_it_and_sends_traffic_back_to_stable(break_it, why):
    w = in_canary()
    break_it(w)
    t = w.tick(T0 + 100)
    assert w.stored["phase"] == "Degraded" and w.children == (1, 2, 0), w.stored
    assert why in w.stored["reason"] and t.rolled_back[0] == 2
    w.settle(T0 + 100)
    at_rest(w)
    assert w.served() == (1, None, 0) and w.stored["phase"] == "RolledBack" and w.tags[2]["decision"] == "rolled_back"


def test_an_annotation_that_is_not_a_version_is_consumed_with_a_warning_and_changes_nothing():
    w = in_canary()
    w.annotation = "²"  # str.isdigit() says yes; int() raises
    t = w.tick(T0 + 3)
    assert ("Warning", "PromoteIgnored") == t.events[0][:2] and w.annotation is None
    assert w.served() == (1, 2, 20)


@pytest.mark.parametrize("order", [("promote", "rollback"), ("rollback", "promote")])
@pytest.mark.parametrize("tick_between", [False, True])
def test_promote_and_rollback_racing_leave_champion_on_what_is_served(order, tick_between):
    w = World(spec_version=1)
    w.tick(T0)
    w.spec["model"]["version"] = 2
    w.settle(T0)  # version 2 promoted through a canary; previous stable 1
    asks = {"promote": ("3", 3), "rollback": ("1", 1)}  # what the CLI writes: the spec's version and the annotation
    now = T0 + 500
    for cmd in order:
        w.annotation, w.spec["model"]["version"] = asks[cmd]
        if tick_between:
            now += 11
            w.tick(now)
    w.settle(now, 3)
    at_rest(w)
    assert w.served()[0] == asks[order[-1]][1]


def test_a_rollback_during_a_canary_and_a_promote_of_the_stable_version_leave_no_annotation_behind():
    w = in_canary()
    w.spec["model"]["version"], w.annotation = 1, "1"  # nmm rollback during the canary
    w.tick(T0 + 3)
    assert w.served() == (1, None, 0) and w.annotation is None
    w.spec["model"]["version"], w.annotation = 1, "1"  # nmm promote of the version already stable
    w.tick(T0 + 4)
    assert w.annotation is None
    w.spec["model"]["version"] = 2  # a later return to version 2 is a canary again (it was aborted, not rolled back)
    w.tick(T0 + 5)
    assert w.served() == (1, 2, 20)
