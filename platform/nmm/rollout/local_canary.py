"""A canary rollout on this machine, for real: the stable and the candidate version each run as an
`nmm serve` process on loopback, a router (nmm.rollout.router) splits traffic between them by the
step's weight, traffic flows through it for the step's pause, and `judge_step`
(nmm.rollout.judge, which the operator drives too) reads both versions' /metrics and the router's counts at
each end of the step (the candidate's traffic held for that moment, so they must agree exactly),
runs the quality probe against both, and decides (nmm.rollout.analysis). A failed step sends all
traffic back to stable (weight 0) and ends the rollout.

Locally there are no users, so the traffic is synthetic: the probe's chat cases, one in four
streamed, and its prompts drawn, sent by a few client threads through the router for as long as
each step lasts.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nmm.ports import free_port
from nmm.rollout import analysis, client, probe
from nmm.rollout.judge import Reading, judge_step, scrape
from nmm.rollout.router import Router


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
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env if env is not None else dict(os.environ),
            start_new_session=True,
        )

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
                if client.get(self.url + "/readyz", timeout=2).status == 200:
                    return None
            except client.Unreachable:
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


class Traffic:
    """Client threads sending requests through the router until stopped: the probe's cases as chat
    requests (a quarter of all streamed, sampled with a seed), and captions as image generations."""

    def __init__(self, url: str, cases: list[dict], prompts: list[str] = (), threads: int = 2):
        self.url, self.cases, self.prompts, self.threads = url, cases, list(prompts), threads
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]

    def _request(self, n: int) -> tuple[str, dict]:
        """Request n: a drawing one time in four (when there are prompts), else a chat case, one in
        three of those streamed — drawn from n's own random number, not n's period: the router's
        round robin is periodic too, and a periodic mix would send every drawing to one track."""
        u = random.Random(n).random()
        if self.cases and (not self.prompts or u >= 0.25):
            body = probe.chat_body(
                self.cases[n % len(self.cases)], self.model, temperature=0.7, seed=n, stream=u >= 0.75
            )
            return "/v1/chat/completions", body
        return "/v1/images/generations", {
            "model": self.model,
            "prompt": self.prompts[n % len(self.prompts)],
            "n": 1,
            "response_format": "b64_json",
            "seed": n,
        }

    def _loop(self, worker: int) -> None:
        n = worker
        while not self._stop.is_set():
            path, body = self._request(n)
            try:
                failed = client.post_json(self.url + path, body, timeout=60).status >= 400
            except client.Unreachable:  # refused, or a stream cut off
                failed = True
            if failed:
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

    def __init__(
        self,
        stable: str,
        candidate: str,
        steps: list[Step],
        limits: analysis.Limits,
        cases: probe.Cases | None,
        workdir: Path,
        *,
        chat: list[dict] | None = None,
        prompts: list[str] = (),
        store: str | None = None,
        batching: dict | None = None,
        env: dict[str, dict[str, str]] | None = None,
        traffic_threads: int = 2,
        ready_timeout: float = 180.0,
        max_extra_wait: float = 60.0,
    ):
        self.sources = {"stable": stable, "candidate": candidate}
        self.steps, self.limits, self.cases, self.prompts = steps, limits, cases, list(prompts)
        self.chat = chat if chat is not None else (cases.chat if cases is not None else [])
        self.workdir, self.store, self.batching = Path(workdir), store, batching or {}
        self.traffic_threads, self.ready_timeout, self.max_extra_wait = traffic_threads, ready_timeout, max_extra_wait
        self.env = env or {}  # per track, variables added to the server's environment
        self.servers: dict[str, Server] = {}
        self.router: Router | None = None
        self.stable_quality: dict[str, float] | None = None

    @property
    def urls(self) -> dict[str, str]:
        return {t: s.url for t, s in self.servers.items()}

    def run(
        self, on_step: Callable[[StepResult], None] = lambda r: None, log: Callable[[str], None] = print
    ) -> Outcome:
        self.workdir.mkdir(parents=True, exist_ok=True)
        traffic = None
        try:
            for track, source in self.sources.items():
                self.servers[track] = Server(
                    track,
                    source,
                    self.workdir / f"{track}.log",
                    self.store,
                    self.batching,
                    dict(os.environ, **self.env.get(track, {})),
                )
            for s in self.servers.values():
                why = s.wait_ready(self.ready_timeout)
                if why:
                    return Outcome(False, why)
            self.router = Router(self.servers["stable"].url, self.servers["candidate"].url, free_port()).start()
            log(
                f"canary router on {self.router.url}: stable {self.sources['stable']}, "
                f"candidate {self.sources['candidate']}"
            )
            try:
                traffic = Traffic(self.router.url, self.chat, self.prompts, self.traffic_threads).start()
            except probe.ProbeError as exc:
                return Outcome(False, f"no traffic through the router: {exc}")
            outcome = Outcome(True, "healthy at every step: " + ", ".join(f"{s.weight}%" for s in self.steps))
            for i, step in enumerate(self.steps):
                result = self._step(i, step)
                outcome.steps.append(result)
                log(
                    f"step {i + 1}/{len(self.steps)} weight {step.weight}%: {'ok' if result.ok else 'FAILED'} "
                    + json.dumps({k: round(v, 4) for k, v in result.measured.items()})
                    + ("" if result.ok else " — " + "; ".join(result.reasons))
                )
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

    def _reading(self) -> tuple[Reading, dict[str, int]]:
        """Both versions' metrics and the router's candidate counts at one moment: the
        candidate's new requests held and its answers finished (at the router and in the
        server's own books) while they are read, then let go."""
        quiet = self.router.hold("candidate", self.max_extra_wait)
        try:
            candidate = scrape(self.servers["candidate"].url)
            for _ in range(100):  # the server counts an answer as it ends: until nothing is in flight there
                if not quiet or isinstance(candidate, str) or not candidate.in_flight:
                    break
                time.sleep(0.02)
                candidate = scrape(self.servers["candidate"].url)
            counts = self.router.status_counts("candidate")
        finally:
            self.router.release("candidate")
        stable = scrape(self.servers["stable"].url)
        return {
            "candidate": {"": candidate} if not isinstance(candidate, str) else candidate,
            "stable": {"": stable} if not isinstance(stable, str) else stable,
        }, counts

    def _step(self, index: int, step: Step) -> StepResult:
        t0 = time.monotonic()
        candidate = self.servers["candidate"]
        self.router.set_weight(step.weight)
        sent0 = self.router.counts()[0]
        before, routed0 = self._reading()
        done0 = self.router.finished_counts()["candidate"]
        deadline = t0 + step.pause_seconds
        # The step lasts its pause, and longer (bounded) until the candidate has answered
        # minRequests: requests still in flight are not in its metrics yet.
        while time.monotonic() < deadline or (
            self.router.finished_counts()["candidate"] - done0 < self.limits.min_requests
            and time.monotonic() < deadline + self.max_extra_wait
            and candidate.proc.poll() is None
        ):
            time.sleep(0.1)
        after, routed1 = self._reading()
        sent1 = self.router.counts()[0]
        if candidate.proc.poll() is not None:
            after["candidate"] = f"candidate server exited with {candidate.proc.returncode}: {candidate.log_tail(300)}"
        routed = {k: n - routed0.get(k, 0) for k, n in routed1.items() if n - routed0.get(k, 0)}
        verdict, self.stable_quality = judge_step(
            self.limits, before, after, self.urls, self.cases, self.stable_quality, router=routed
        )
        return StepResult(
            index,
            step.weight,
            verdict.ok,
            verdict.reasons,
            verdict.measured,
            sent1["stable"] - sent0["stable"],
            time.monotonic() - t0,
        )
