"""Dynamic batching: concurrent requests wait in a bounded queue; one worker thread takes up to
`max_batch` of them that can share a forward pass (the same kind of work: `key`), waiting at most
`max_wait_ms` for company, and runs them together. A full queue refuses at once (`QueueFull`, a
429), so memory stays bounded; `drain` stops taking work and lets what was accepted finish.

One job's failure fails that job only (vLLM's per-request errors): `run` may answer an exception
in a job's place, and a batch that raises as a whole is run again one job at a time, so the job
that cannot run fails alone. A streamed job whose tokens already went out cannot be run again
(its client has them): it fails with the batch's error.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Knob(NamedTuple):
    """One batching setting: its default, its bounds, and its `nmm serve` flag."""

    default: float
    lo: float
    hi: float
    flag: str
    help: str

    def arg(self, value: float) -> str:
        """The flag with `value`, as a pod's args carry it."""
        return f"{self.flag}={value:g}" if isinstance(value, float) else f"{self.flag}={value}"


# The one place batching's defaults, bounds and flag names live: the spec's `serving.batching`,
# `nmm serve`'s options and the serving pods' args all read them.
BATCHING = {
    "max_batch": Knob(16, 1, 256, "--max-batch", "Requests per model batch at most"),
    "max_wait_ms": Knob(5.0, 0, 1000, "--max-wait-ms", "How long a request waits for company (milliseconds)"),
    "max_queue": Knob(256, 1, 10_000, "--max-queue", "Waiting requests at most; more get 429"),
}


class QueueFull(Exception):
    """The queue is at its bound: try again later (HTTP 429)."""


class Draining(Exception):
    """The server is shutting down and takes no new work (HTTP 503)."""


@dataclass
class Job:
    key: Hashable  # jobs with equal keys can run in one batch
    payload: Any
    future: Future = field(default_factory=Future)
    stream: Callable[[int], None] | None = None  # called with each token as it is generated
    first_token_at: float | None = None  # perf_counter() when its first token came (set by the run)


class Batcher:
    def __init__(
        self,
        run: Callable[[list[Job]], list[Any]],
        *,
        max_batch: int = BATCHING["max_batch"].default,
        max_wait_ms: float = BATCHING["max_wait_ms"].default,
        max_queue: int = BATCHING["max_queue"].default,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.run, self.max_batch, self.max_wait = run, max(1, max_batch), max(0.0, max_wait_ms) / 1000.0
        self.max_queue, self.on_batch = max_queue, on_batch
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._draining = False
        self._busy = 0
        self._thread = threading.Thread(target=self._loop, name="nmm-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue) + self._busy

    def enqueue(self, key: Hashable, payload: Any, stream: Callable[[int], None] | None = None) -> Job:
        """Queue a job now (QueueFull or Draining at once, before any answer has started)."""
        job = Job(key, payload, stream=stream)
        with self._cv:
            if self._draining:
                raise Draining("the server is draining")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (the bound is {self.max_queue})")
            self._queue.append(job)
            self._cv.notify()
        return job

    async def submit(self, key: Hashable, payload: Any) -> tuple[Any, Job]:
        job = self.enqueue(key, payload)
        return await asyncio.wrap_future(job.future), job

    def _take(self) -> list[Job]:
        with self._cv:
            while not self._queue:
                if self._draining:
                    return []
                self._cv.wait()
            first = self._queue.popleft()
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                same = next((j for j in self._queue if j.key == first.key), None)
                if same is not None:
                    self._queue.remove(same)
                    batch.append(same)
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            self._busy = len(batch)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            if self.on_batch:
                self.on_batch(len(batch))
            try:
                self._answer(batch)
            finally:
                with self._cv:
                    self._busy = 0

    def _answer(self, batch: list[Job]) -> None:
        """Run the batch and settle every job's future; a batch that raises is run again job by job."""
        try:
            results = self.run(batch)
        except Exception as exc:  # any fault of the batch: find the job it belongs to
            if len(batch) == 1:
                _settle(batch[0], exc)
                return
            for job in batch:
                if job.stream is not None and job.first_token_at is not None:
                    _settle(job, exc)  # its tokens are out: it cannot be run again
                else:
                    job.first_token_at = None
                    self._answer([job])
            return
        for job, result in zip(batch, results):
            _settle(job, result)

    def drain(self, timeout: float = 30.0) -> None:
        """Refuse new work, finish what was accepted (SIGTERM's graceful shutdown)."""
        with self._cv:
            self._draining = True
            self._cv.notify_all()
        self._thread.join(timeout)


def _settle(job: Job, result: Any) -> None:
    if job.future.done():
        return
    if isinstance(result, BaseException):
        job.future.set_exception(result)
    else:
        job.future.set_result(result)
