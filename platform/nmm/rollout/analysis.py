"""A canary step's analysis, pure: what two scrapes of a version's `/metrics` — every pod of it —
say about the traffic between them (requests by status, p95 latency and time to first token read
from the histograms the way Prometheus' `histogram_quantile` does), and the verdict against the
policy's limits.

The same code judges a local rollout (nmm.rollout.local_canary) and one on a cluster (the operator).
It fails closed: a version that could not be scraped, a page with NaN or a negative counter, a pod
that vanished mid-step (its requests unknown), a request received and never counted, counts that
disagree with the router's, too few requests to judge, or a quality probe that did not run is a
failed step with its reason, never a pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

SERVED = ("/v1/chat/completions", "/v1/images/generations")
CLIENT_CLOSED = "499"


@dataclass(frozen=True)
class Snapshot:
    """Cumulative counters of one server's scrape."""

    by_status: dict[str, float]  # served routes' requests by the status their client got
    latency: tuple[tuple[float, float], ...]  # served routes' (le, cumulative count), ascending
    ttft: tuple[tuple[float, float], ...]  # time to first token (le, cumulative count)
    received: float = 0.0  # served routes' requests counted as they arrived
    in_flight: float = 0.0  # received and not yet answered


EMPTY = Snapshot({}, (), ())
Scrape = dict[str, Snapshot]  # every endpoint of a version (a pod's name or a URL) → its snapshot


@dataclass(frozen=True)
class Observation:
    requests: int
    errors: int  # 5xx and 429: what a client could not get
    p95_latency_ms: float
    p95_ttft_ms: float
    client_errors: int = 0  # 4xx but 429 and 499: requests the version refused
    disconnects: int = 0  # 499: the client left before the answer's end
    uncounted: int = 0  # received, not answered, not in flight: a request the server lost track of
    by_status: dict[str, int] = field(default_factory=dict)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else math.nan

    @property
    def client_error_rate(self) -> float:
        return self.client_errors / self.requests if self.requests else math.nan


@dataclass(frozen=True)
class Limits:
    max_error_rate: float
    max_p95_latency_ms: float
    max_time_to_first_token_ms: float
    min_requests: int
    max_quality_drop: float | None  # None: no quality probe

    @classmethod
    def of(cls, policy) -> Limits:
        """From a canary policy's analysis (nmm.spec.serving.Analysis, a pipeline's or an NMMService's)."""
        probe = policy.quality_probe
        return cls(
            policy.max_error_rate,
            policy.max_p95_latency_ms,
            policy.max_time_to_first_token_ms,
            policy.min_requests,
            probe.max_quality_drop if probe else None,
        )


@dataclass
class Verdict:
    ok: bool
    reasons: list[str] = field(default_factory=list)
    measured: dict[str, float] = field(default_factory=dict)


Quality = dict[str, tuple[float, float]]  # task → (candidate score, stable score)


def to_dict(scrape: Scrape) -> dict:
    """A scrape as JSON (an NMMService's status keeps its step's baseline there)."""
    return {
        "pods": {
            k: {
                "byStatus": s.by_status,
                "latency": [list(b) for b in s.latency],
                "ttft": [list(b) for b in s.ttft],
                "received": s.received,
                "inFlight": s.in_flight,
            }
            for k, s in sorted(scrape.items())
        }
    }


def from_dict(d: dict) -> Scrape:
    pairs = lambda xs: tuple((float(le), float(c)) for le, c in xs)
    one = lambda p: Snapshot(
        {str(k): float(v) for k, v in p.get("byStatus", {}).items()},
        pairs(p.get("latency", [])),
        pairs(p.get("ttft", [])),
        float(p.get("received", 0.0)),
        float(p.get("inFlight", 0.0)),
    )
    if "pods" not in d:  # written by an nmm that scraped one endpoint
        return {"": one(d)}
    return {str(k): one(p) for k, p in d["pods"].items()}


class MetricsError(ValueError):
    """A /metrics page that is not Prometheus text, lacks nmm's metrics, or holds NaN, Inf or a negative count."""


def parse(text: str) -> Snapshot:
    from prometheus_client.parser import text_string_to_metric_families

    by_status: dict[str, float] = {}
    latency: dict[float, float] = {}
    ttft: dict[float, float] = {}
    received = in_flight = 0.0
    families = set()
    try:
        for family in text_string_to_metric_families(text):
            families.add(family.name)
            for s in family.samples:
                if not math.isfinite(s.value) or s.value < 0:
                    raise MetricsError(f"{s.name}{s.labels or ''} is {s.value}: not a count")
                route = s.labels.get("route")
                if s.name == "nmm_requests_total" and route in SERVED:
                    by_status[s.labels["status"]] = by_status.get(s.labels["status"], 0.0) + s.value
                elif s.name == "nmm_requests_received_total" and route in SERVED:
                    received += s.value
                elif s.name == "nmm_requests_in_flight":
                    in_flight = s.value
                elif s.name == "nmm_request_seconds_bucket" and route in SERVED:
                    le = float(s.labels["le"])
                    latency[le] = latency.get(le, 0.0) + s.value
                elif s.name == "nmm_time_to_first_token_seconds_bucket":
                    ttft[float(s.labels["le"])] = s.value
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, MetricsError):
            raise
        raise MetricsError(f"not Prometheus text: {exc}") from None
    if "nmm_queue_depth" not in families:
        raise MetricsError("no nmm metrics on the page: is this an nmm serve endpoint?")
    if "nmm_requests_received" not in families:
        raise MetricsError("no nmm_requests_received_total: an nmm serve too old to prove every request was counted")
    return Snapshot(by_status, tuple(sorted(latency.items())), tuple(sorted(ttft.items())), received, in_flight)


def quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float:
    """Prometheus' histogram_quantile over cumulative (le, count) buckets: linear within the
    bucket holding the rank; NaN without observations; the last finite bound when the rank lies
    in +Inf."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def _delta(after, before) -> tuple[tuple[float, float], ...]:
    old = dict(before)
    return tuple((le, max(0.0, c - old.get(le, 0.0))) for le, c in after)


def _since(before: Snapshot, after: Snapshot) -> tuple[dict[str, float], tuple, tuple, float]:
    """One server's counts between two scrapes; a restarted server (counters went down) is read
    from zero: its counts since the restart are what it served. The last item: requests it lost
    track of (received, neither answered nor still in flight)."""
    if sum(after.by_status.values()) < sum(before.by_status.values()) or after.received < before.received:
        before = EMPTY
    counts = {k: v - before.by_status.get(k, 0.0) for k, v in after.by_status.items()}
    lost = (after.received - before.received) - sum(counts.values()) - (after.in_flight - before.in_flight)
    return counts, _delta(after.latency, before.latency), _delta(after.ttft, before.ttft), lost


def _add(a: tuple, b: tuple) -> tuple:
    total = dict(a)
    for le, c in b:
        total[le] = total.get(le, 0.0) + c
    return tuple(sorted(total.items()))


def window(before: Snapshot | Scrape, after: Snapshot | Scrape) -> Observation | str:
    """The traffic between two scrapes of a version, summed over its endpoints; why it cannot be
    known (a str) when an endpoint of `before` is gone from `after`: what it served meanwhile was
    never read. An endpoint new in `after` is read from zero."""
    before = before if isinstance(before, dict) else {"": before}
    after = after if isinstance(after, dict) else {"": after}
    gone = sorted(set(before) - set(after))
    if gone:
        return f"{len(gone)} endpoint(s) gone mid-step ({', '.join(gone)[:200]}): their requests were never counted"
    counts: dict[str, float] = {}
    lat: tuple = ()
    ttft: tuple = ()
    lost = 0.0
    for key, snap in after.items():
        c, la, tt, lo = _since(before.get(key, EMPTY), snap)
        for k, v in c.items():
            counts[k] = counts.get(k, 0.0) + v
        lat, ttft, lost = _add(lat, la), _add(ttft, tt), lost + lo
    statuses = {k: int(round(v)) for k, v in counts.items() if round(v)}
    errors = sum(v for k, v in statuses.items() if k.startswith("5") or k == "429")
    refused = sum(v for k, v in statuses.items() if k.startswith("4") and k not in ("429", CLIENT_CLOSED))
    return Observation(
        sum(statuses.values()),
        errors,
        quantile(0.95, lat) * 1000,
        quantile(0.95, ttft) * 1000,
        refused,
        statuses.get(CLIENT_CLOSED, 0),
        int(round(lost)),
        statuses,
    )


def with_undelivered(o: Observation, n: int) -> Observation:
    """`o` and `n` requests a router could not deliver to the version (502s it answered itself)."""
    if not n:
        return o
    statuses = o.by_status | {"502": o.by_status.get("502", 0) + n}
    return replace(o, requests=o.requests + n, errors=o.errors + n, by_status=statuses)


def _slos(v: Verdict, limits: Limits, c: Observation) -> None:
    if c.uncounted:
        v.reasons.append(f"{c.uncounted} candidate requests were received and never counted")
    if c.requests < limits.min_requests:
        v.reasons.append(f"only {c.requests} candidate requests (minRequests {limits.min_requests}): no evidence")
        return
    if c.error_rate > limits.max_error_rate:
        v.reasons.append(f"error rate {c.error_rate:.3f} > maxErrorRate {limits.max_error_rate}")
    if not c.p95_latency_ms <= limits.max_p95_latency_ms:
        v.reasons.append(f"p95 latency {c.p95_latency_ms:.0f} ms > maxP95LatencyMs {limits.max_p95_latency_ms:g}")
    if not c.p95_ttft_ms <= limits.max_time_to_first_token_ms:
        v.reasons.append(
            f"p95 time to first token {c.p95_ttft_ms:.0f} ms > maxTimeToFirstTokenMs "
            f"{limits.max_time_to_first_token_ms:g}"
        )


def _refusals(v: Verdict, limits: Limits, c: Observation, stable: Observation) -> None:
    """A candidate that refuses (4xx) what stable answers, beyond maxErrorRate, fails: the same
    traffic reaches both, so the difference is the candidate's."""
    v.measured["client_error_rate"] = c.client_error_rate
    if stable.requests >= limits.min_requests and c.requests >= limits.min_requests:
        v.measured["stable_client_error_rate"] = stable.client_error_rate
        if c.client_error_rate - stable.client_error_rate > limits.max_error_rate:
            v.reasons.append(
                f"the candidate refused {c.client_error_rate:.3f} of its requests (4xx), stable "
                f"{stable.client_error_rate:.3f}: over maxErrorRate {limits.max_error_rate}"
            )


def _quality(v: Verdict, limits: Limits, quality: Quality | str | None) -> None:
    if isinstance(quality, str) or not quality:
        v.reasons.append(f"quality probe did not run: {quality or 'no result'}")
        return
    for task, (cand, stable) in sorted(quality.items()):
        v.measured |= {f"quality_candidate.{task}": cand, f"quality_stable.{task}": stable}
        if stable - cand > limits.max_quality_drop:
            v.reasons.append(
                f"quality probe ({task}) {cand:.3f} vs stable {stable:.3f}: drop {stable - cand:.3f} > "
                f"maxQualityDrop {limits.max_quality_drop:g}"
            )
    cands, stables = [c for c, _ in quality.values()], [s for _, s in quality.values()]
    v.measured |= {
        "quality_candidate": sum(cands) / len(cands),
        "quality_stable": sum(stables) / len(stables),
        "quality_drop": max(s - c for c, s in quality.values()),
    }


def judge(
    limits: Limits,
    candidate: Observation | str,
    quality: Quality | str | None,
    *,
    stable: Observation | str | None = None,
    router: dict[str, int] | None = None,
) -> Verdict:
    """The step's verdict. `candidate`: its observation, or why it could not be observed.
    `quality`: per task (candidate score, stable score), why the probe could not run, or None
    when the policy has no probe. `stable`: the stable version's observation of the same window
    (its 4xx rate is the candidate's yardstick). `router`: the statuses the router that split the
    traffic saw the candidate answer in the window — they must be the candidate's own counts."""
    v = Verdict(ok=True)
    if isinstance(candidate, str):
        v.reasons.append(f"candidate not observable: {candidate}")
    else:
        v.measured |= {
            "requests": candidate.requests,
            "error_rate": candidate.error_rate,
            "p95_latency_ms": candidate.p95_latency_ms,
            "p95_ttft_ms": candidate.p95_ttft_ms,
            "disconnects": candidate.disconnects,
        }
        _slos(v, limits, candidate)
        if isinstance(stable, Observation):
            _refusals(v, limits, candidate, stable)
        if router is not None and {k: n for k, n in router.items() if n} != candidate.by_status:
            v.reasons.append(
                f"the router saw the candidate answer {dict(sorted(router.items()))}, the candidate counted "
                f"{dict(sorted(candidate.by_status.items()))}: requests went uncounted"
            )
    if limits.max_quality_drop is not None:
        _quality(v, limits, quality)
    v.ok = not v.reasons
    return v
