"""A canary rollout on this machine, for real: the stable and the candidate version each run as an
`nmm serve` process on loopback, a router (nmm.serve.router) splits traffic between them by the
step's weight, traffic flows through it for the step's pause, and the analysis
(nmm.serve.analysis: SLOs from the candidate's /metrics, the quality probe against both) judges
each step. A failed step sends all traffic back to stable (weight 0) and ends the rollout.

Locally there are no users, so the traffic is synthetic: the probe's cases, one in four
streamed, sent by a few client threads through the router for as long as each step lasts.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nmm.serve import analysis, probe
from nmm.serve.router import Router


@dataclass(frozen=True)
class Step:
    weight: int
    pause_seconds: float


@dataclass
class StepResult:
    index: int
    weight: int
    ok: bool
    reasons: list[str]
    measured: dict[str, float]
    stable_requests: int
    seconds: float


@dataclass
class Outcome:
    promoted: bool
    reason: str
    steps: list[StepResult] = field(default_factory=list)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server:
    """One `nmm serve` process on loopback; its output goes to `log`."""

    def __init__(self, track: str, source: str, log: Path, store: str | None, batching: dict, env: dict | None = None):
        self.track, self.source, self.log_path = track, source, log
        self.port = free_port()
        argv = [sys.executable, "-m", "nmm", "serve", source, "--port", str(self.port)]
        argv += [f"--{k.replace('_', '-')}={v}" for k, v in batching.items()]
        if store:
            argv += ["--store", store]
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env if env is not None else dict(os.environ), start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 600) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> str | None:
        """None when ready, else why not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"{self.track} server ({self.source}) exited with {self.proc.returncode}: {self.log_tail()}"
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        return None
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.2)
        return f"{self.track} server ({self.source}) not ready after {timeout:.0f} s"

    def stop(self) -> None:
        """SIGTERM (in-flight requests finish), then SIGKILL after 30 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def scrape(url: str) -> analysis.Snapshot | str:
    """The server's metrics now, or why they could not be read."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            return analysis.parse(r.read().decode())
    except (OSError, http.client.HTTPException, analysis.MetricsError) as exc:
        return f"{url}/metrics: {exc}"


def judge_step(limits: analysis.Limits, baseline: analysis.Snapshot, urls: dict[str, str], cases: list[dict],
               stable_quality: float | None) -> tuple[analysis.Verdict, analysis.Snapshot | None, float | None]:
    """One step of a canary whose servers run elsewhere (the operator's): the candidate's traffic
    since `baseline`, and the quality probe against both tracks (the stable score measured once:
    pass it back in). Returns (verdict, the next step's baseline — scraped after the probe, whose
    requests are not traffic —, the stable score)."""
    after = scrape(urls["candidate"])
    observed = after if isinstance(after, str) else analysis.window(baseline, after)
    quality: tuple[float, float] | str | None = None
    if limits.max_quality_drop is not None:
        try:
            if not cases:
                raise probe.ProbeError("no probe cases (qualityProbe.casesUri)")
            if stable_quality is None:
                stable_quality = probe.score(urls["stable"], cases)
            quality = (probe.score(urls["candidate"], cases), stable_quality)
        except probe.ProbeError as exc:
            quality = str(exc)
    if quality is not None and not isinstance(after, str):
        after = scrape(urls["candidate"])
    return analysis.judge(limits, observed, quality), (None if isinstance(after, str) else after), stable_quality


class Traffic:
    """Client threads sending requests through the router until stopped: the probe's cases as chat
    requests (one in four streamed, sampled with a seed), and captions as image generations."""

    def __init__(self, url: str, cases: list[dict], prompts: list[str] = (), threads: int = 2):
        self.url, self.cases, self.prompts, self.threads = url, cases, list(prompts), threads
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]

    def _request(self, n: int) -> tuple[str, dict]:
        if self.cases and (not self.prompts or n % 4):
            body = probe.chat_body(self.cases[n % len(self.cases)], self.model, temperature=0.7, seed=n, stream=n % 4 == 1)
            return "/v1/chat/completions", body
        return "/v1/images/generations", {"model": self.model, "prompt": self.prompts[n % len(self.prompts)], "n": 1,
                                          "response_format": "b64_json", "seed": n}

    def _loop(self, worker: int) -> None:
        n = worker
        while not self._stop.is_set():
            path, body = self._request(n)
            req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    r.read()
            except (OSError, http.client.HTTPException):  # URLError is an OSError; a cut stream an HTTPException
                time.sleep(0.05)  # the router answered an error (counted there): keep the pace sane
            n += self.threads

    def start(self) -> Traffic:
        if not self.cases and not self.prompts:
            raise probe.ProbeError("nothing to send: no probe cases and no prompts")
        self.model = probe.served_model(self.url)
        for w in self._workers:
            w.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(90)


class LocalCanary:
    """`run()` once: starts both servers and the router, steps through, stops everything."""

    def __init__(self, stable: str, candidate: str, steps: list[Step], limits: analysis.Limits, cases: list[dict],
                 workdir: Path, *, prompts: list[str] = (), store: str | None = None, batching: dict | None = None,
                 traffic_threads: int = 2, ready_timeout: float = 180.0, max_extra_wait: float = 60.0):
        self.sources = {"stable": stable, "candidate": candidate}
        self.steps, self.limits, self.cases, self.prompts = steps, limits, cases, list(prompts)
        self.workdir, self.store, self.batching = Path(workdir), store, batching or {}
        self.traffic_threads, self.ready_timeout, self.max_extra_wait = traffic_threads, ready_timeout, max_extra_wait
        self.servers: dict[str, Server] = {}
        self.router: Router | None = None

    def run(self, on_step: Callable[[StepResult], None] = lambda r: None, log: Callable[[str], None] = print) -> Outcome:
        self.workdir.mkdir(parents=True, exist_ok=True)
        traffic = None
        try:
            for track, source in self.sources.items():
                self.servers[track] = Server(track, source, self.workdir / f"{track}.log", self.store, self.batching)
            for s in self.servers.values():
                why = s.wait_ready(self.ready_timeout)
                if why:
                    return Outcome(False, why)
            stable_q = self._stable_quality()
            self.router = Router(self.servers["stable"].url, self.servers["candidate"].url, free_port()).start()
            log(f"canary router on {self.router.url}: stable {self.sources['stable']}, candidate {self.sources['candidate']}")
            try:
                traffic = Traffic(self.router.url, self.cases, self.prompts, self.traffic_threads).start()
            except probe.ProbeError as exc:
                return Outcome(False, f"no traffic through the router: {exc}")
            outcome = Outcome(True, "healthy at every step: " + ", ".join(f"{s.weight}%" for s in self.steps))
            for i, step in enumerate(self.steps):
                result = self._step(i, step, stable_q)
                outcome.steps.append(result)
                log(f"step {i + 1}/{len(self.steps)} weight {step.weight}%: {'ok' if result.ok else 'FAILED'} "
                    + json.dumps({k: round(v, 4) for k, v in result.measured.items()})
                    + ("" if result.ok else " — " + "; ".join(result.reasons)))
                on_step(result)
                if not result.ok:
                    self.router.set_weight(0)  # abort: every request to stable from now on
                    outcome.promoted = False
                    outcome.reason = f"step {i + 1} (weight {step.weight}%): " + "; ".join(result.reasons)
                    break
            return outcome
        finally:
            if traffic:
                traffic.stop()
            if self.router:
                self.router.stop()
            for s in self.servers.values():
                s.stop()

    def _stable_quality(self) -> float | str | None:
        """The stable version's probe score, measured once (greedy answers do not change)."""
        if self.limits.max_quality_drop is None:
            return None
        try:
            return probe.score(self.servers["stable"].url, self.cases)
        except probe.ProbeError as exc:
            return f"stable: {exc}"

    def _step(self, index: int, step: Step, stable_q: float | str | None) -> StepResult:
        t0 = time.monotonic()
        candidate = self.servers["candidate"]
        self.router.set_weight(step.weight)
        before, (sent0, failed0) = scrape(candidate.url), self.router.counts()
        done0 = self.router.finished_counts()["candidate"]
        deadline = t0 + step.pause_seconds
        # The step lasts its pause, and longer (bounded) until the candidate has answered
        # minRequests: requests still in flight are not in its metrics yet.
        while time.monotonic() < deadline or (
            self.router.finished_counts()["candidate"] - done0 < self.limits.min_requests
            and time.monotonic() < deadline + self.max_extra_wait and candidate.proc.poll() is None
        ):
            time.sleep(0.1)
        after, (sent1, failed1) = scrape(candidate.url), self.router.counts()
        undelivered = failed1["candidate"] - failed0["candidate"]
        if isinstance(before, str) or isinstance(after, str):
            observed: analysis.Observation | str = before if isinstance(before, str) else after
        else:
            o = analysis.window(before, after)
            observed = analysis.Observation(o.requests + undelivered, o.errors + undelivered, o.p95_latency_ms, o.p95_ttft_ms)
        if candidate.proc.poll() is not None:
            observed = f"candidate server exited with {candidate.proc.returncode}: {candidate.log_tail(300)}"
        quality = None
        if self.limits.max_quality_drop is not None:
            quality = stable_q if isinstance(stable_q, str) else self._candidate_quality(stable_q)
        verdict = analysis.judge(self.limits, observed, quality)
        return StepResult(index, step.weight, verdict.ok, verdict.reasons, verdict.measured,
                          sent1["stable"] - sent0["stable"], time.monotonic() - t0)

    def _candidate_quality(self, stable_q: float) -> tuple[float, float] | str:
        try:
            return probe.score(self.servers["candidate"].url, self.cases), stable_q
        except probe.ProbeError as exc:
            return f"candidate: {exc}"
