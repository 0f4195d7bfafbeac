"""A canary step's analysis, pure: what two scrapes of a version's `/metrics` say about the traffic
between them (requests, errors, p95 latency and time to first token, read from the histograms
the way Prometheus' `histogram_quantile` does), and the verdict against the policy's limits.

The same code judges a local rollout (nmm.serve.canary) and one on a cluster (the operator).
It fails closed: a version that could not be scraped, too few requests to judge, or a quality
probe that did not run is a failed step with its reason, never a pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SERVED = ("/v1/chat/completions", "/v1/images/generations")


@dataclass(frozen=True)
class Snapshot:
    """Cumulative counters of one scrape."""

    by_status: dict[str, float]  # served routes' requests by HTTP status
    latency: tuple[tuple[float, float], ...]  # served routes' (le, cumulative count), ascending
    ttft: tuple[tuple[float, float], ...]  # time to first token (le, cumulative count)


@dataclass(frozen=True)
class Observation:
    requests: int
    errors: int  # 5xx and 429: what a client could not get
    p95_latency_ms: float
    p95_ttft_ms: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else math.nan


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
        return cls(policy.max_error_rate, policy.max_p95_latency_ms, policy.max_time_to_first_token_ms,
                   policy.min_requests, probe.max_quality_drop if probe else None)


@dataclass
class Verdict:
    ok: bool
    reasons: list[str] = field(default_factory=list)
    measured: dict[str, float] = field(default_factory=dict)


def to_dict(s: Snapshot) -> dict:
    """A snapshot as JSON (an NMMService's status keeps its step's baseline there)."""
    return {"byStatus": s.by_status, "latency": [list(b) for b in s.latency], "ttft": [list(b) for b in s.ttft]}


def from_dict(d: dict) -> Snapshot:
    pairs = lambda xs: tuple((float(le), float(c)) for le, c in xs)  # noqa: E731
    return Snapshot({str(k): float(v) for k, v in d.get("byStatus", {}).items()}, pairs(d.get("latency", [])),
                    pairs(d.get("ttft", [])))


class MetricsError(ValueError):
    """A /metrics page that is not Prometheus text or lacks nmm's metrics."""


def parse(text: str) -> Snapshot:
    from prometheus_client.parser import text_string_to_metric_families

    by_status: dict[str, float] = {}
    latency: dict[float, float] = {}
    ttft: dict[float, float] = {}
    families = set()
    try:
        for family in text_string_to_metric_families(text):
            families.add(family.name)
            for s in family.samples:
                if s.name == "nmm_requests_total" and s.labels.get("route") in SERVED:
                    by_status[s.labels["status"]] = by_status.get(s.labels["status"], 0.0) + s.value
                elif s.name == "nmm_request_seconds_bucket" and s.labels.get("route") in SERVED:
                    le = float(s.labels["le"])
                    latency[le] = latency.get(le, 0.0) + s.value
                elif s.name == "nmm_time_to_first_token_seconds_bucket":
                    ttft[float(s.labels["le"])] = s.value
    except (ValueError, KeyError) as exc:
        raise MetricsError(f"not Prometheus text: {exc}") from None
    if "nmm_queue_depth" not in families:
        raise MetricsError("no nmm metrics on the page: is this an nmm serve endpoint?")
    return Snapshot(by_status, tuple(sorted(latency.items())), tuple(sorted(ttft.items())))


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


def window(before: Snapshot, after: Snapshot) -> Observation:
    """The traffic between two scrapes of one server. A restarted server (counters went down) is
    read from zero: its counts since the restart are what it served."""
    restarted = sum(after.by_status.values()) < sum(before.by_status.values())
    if restarted:
        before = Snapshot({}, (), ())
    counts = {k: v - before.by_status.get(k, 0.0) for k, v in after.by_status.items()}
    requests = int(round(sum(counts.values())))
    errors = int(round(sum(v for k, v in counts.items() if k.startswith("5") or k == "429")))
    lat, ttft = _delta(after.latency, before.latency), _delta(after.ttft, before.ttft)
    return Observation(requests, errors, quantile(0.95, lat) * 1000, quantile(0.95, ttft) * 1000)


def judge(limits: Limits, candidate: Observation | str, quality: tuple[float, float] | str | None) -> Verdict:
    """The step's verdict. `candidate`: its observation, or why it could not be observed.
    `quality`: (candidate score, stable score), why the probe could not run, or None when the
    policy has no probe."""
    v = Verdict(ok=True)
    if isinstance(candidate, str):
        v.reasons.append(f"candidate not observable: {candidate}")
    else:
        v.measured |= {"requests": candidate.requests, "error_rate": candidate.error_rate,
                       "p95_latency_ms": candidate.p95_latency_ms, "p95_ttft_ms": candidate.p95_ttft_ms}
        if candidate.requests < limits.min_requests:
            v.reasons.append(f"only {candidate.requests} candidate requests (minRequests {limits.min_requests}): no evidence")
        else:
            if candidate.error_rate > limits.max_error_rate:
                v.reasons.append(f"error rate {candidate.error_rate:.3f} > maxErrorRate {limits.max_error_rate}")
            if not candidate.p95_latency_ms <= limits.max_p95_latency_ms:
                v.reasons.append(f"p95 latency {candidate.p95_latency_ms:.0f} ms > maxP95LatencyMs {limits.max_p95_latency_ms:g}")
            if not candidate.p95_ttft_ms <= limits.max_time_to_first_token_ms:
                v.reasons.append(f"p95 time to first token {candidate.p95_ttft_ms:.0f} ms > maxTimeToFirstTokenMs "
                                 f"{limits.max_time_to_first_token_ms:g}")
    if limits.max_quality_drop is not None:
        if isinstance(quality, str) or quality is None:
            v.reasons.append(f"quality probe did not run: {quality or 'no result'}")
        else:
            cand, stable = quality
            v.measured |= {"quality_candidate": cand, "quality_stable": stable, "quality_drop": stable - cand}
            if stable - cand > limits.max_quality_drop:
                v.reasons.append(f"quality probe {cand:.3f} vs stable {stable:.3f}: drop {stable - cand:.3f} > "
                                 f"maxQualityDrop {limits.max_quality_drop:g}")
    v.ok = not v.reasons
    return v
