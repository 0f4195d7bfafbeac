"""The one judge of a canary step, of the local canary (nmm.rollout.local_canary) and of the
operator: both versions' /metrics read at each end of the step (every pod of each), the quality
probe against both, the router's counts when a router split the traffic, decided by
nmm.rollout.analysis. Any exception on the way is a failed step with its reason, never a stuck one.
"""

from __future__ import annotations

from nmm.rollout import analysis, client, probe
from nmm.rollout.router import UNDELIVERED


def scrape(url: str) -> analysis.Snapshot | str:
    """One server's metrics now, or why they could not be read."""
    try:
        answer = client.get(url + "/metrics", timeout=10)
        if answer.status != 200:
            return f"{url}/metrics: HTTP {answer.status}"
        return analysis.parse(answer.body.decode())
    except (client.Unreachable, UnicodeDecodeError, analysis.MetricsError) as exc:
        return f"{url}/metrics: {exc}"


def read(endpoints: dict[str, str]) -> analysis.Scrape | str:
    """Every endpoint of a version now (name → URL: a pod each), or why one could not be read."""
    if not endpoints:
        return "no endpoint serves it"
    out: analysis.Scrape = {}
    for name, url in sorted(endpoints.items()):
        snap = scrape(url)
        if isinstance(snap, str):
            return snap
        out[name] = snap
    return out


Reading = dict[str, "analysis.Scrape | str"]  # track → its scrape, or why it could not be read


def probe_quality(
    urls: dict[str, str], cases: probe.Cases | None, stable: dict[str, float] | None
) -> tuple[analysis.Quality | str, dict[str, float] | None]:
    """The probe against the candidate (every step) and the stable (once: pass its scores back
    in): (per task (candidate, stable), or why it could not run; the stable's scores)."""
    try:
        if cases is None or not len(cases):
            raise probe.ProbeError("no probe cases (qualityProbe.casesUri)")
        if not isinstance(stable, dict) or set(stable) != set(cases.tasks):  # not measured yet, or by an older nmm
            stable = None
        if stable is None:
            stable = probe.score(urls["stable"], cases)
        candidate = probe.score(urls["candidate"], cases)
        return {t: (candidate[t], stable[t]) for t in candidate}, stable
    except probe.ProbeError as exc:
        return str(exc), stable


def judge_step(
    limits: analysis.Limits,
    before: Reading,
    after: Reading,
    urls: dict[str, str],
    cases: probe.Cases | None,
    stable_quality: dict[str, float] | None,
    router: dict[str, int] | None = None,
) -> tuple[analysis.Verdict, dict[str, float] | None]:
    """The one step judge, of the local canary and of the operator: the candidate's (and the
    stable's) traffic between two readings, the quality probe against both (the stable measured
    once: pass its scores back in), the router's counts when a router split the traffic. Any
    exception on the way is a failed step with its reason, never a stuck one."""
    try:
        observed = {
            t: (
                before[t]
                if isinstance(before[t], str)
                else after[t]
                if isinstance(after[t], str)
                else analysis.window(before[t], after[t])
            )
            for t in ("candidate", "stable")
        }
        if router is not None and isinstance(observed["candidate"], analysis.Observation):
            observed["candidate"] = analysis.with_undelivered(observed["candidate"], router.get(UNDELIVERED, 0))
        quality = None
        if limits.max_quality_drop is not None:
            quality, stable_quality = probe_quality(urls, cases, stable_quality)
        return analysis.judge(
            limits, observed["candidate"], quality, stable=observed["stable"], router=router
        ), stable_quality
    except Exception as exc:  # a bug or a surprise in the analysis: the step fails, traffic goes back to stable
        return analysis.Verdict(False, [f"analysis failed: {type(exc).__name__}: {exc}"]), stable_quality
