"""The one HTTP client of rollout control: aiohttp, the router's own. The probe's requests, the
/metrics scrapes, readiness checks and the local canary's traffic run from plain threads, so they
go through one event loop of this process (a daemon thread, started on first use); each request
answers with its status and body, or raises `Unreachable` (refused, timed out, cut off)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from typing import NamedTuple

_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


class Unreachable(OSError):
    """No whole answer: the connection was refused, timed out or broken off."""


class Answer(NamedTuple):
    status: int
    body: bytes

    def json(self):
        return json.loads(self.body)


def _running_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="nmm-http-client", daemon=True).start()
            _loop = loop
        return _loop


async def _request(method: str, url: str, body: bytes | None, timeout: float) -> Answer:
    import aiohttp

    headers = {"Content-Type": "application/json"} if body is not None else None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.request(method, url, data=body, headers=headers) as r:
            return Answer(r.status, await r.read())


def request(method: str, url: str, *, json_body: dict | None = None, timeout: float = 10.0) -> Answer:
    """One request, its whole answer (a streamed one read to its end)."""
    import aiohttp

    body = json.dumps(json_body).encode() if json_body is not None else None
    future = asyncio.run_coroutine_threadsafe(_request(method, url, body, timeout), _running_loop())
    try:
        return future.result(timeout + 5)
    except (TimeoutError, aiohttp.ClientError, concurrent.futures.TimeoutError, OSError) as exc:
        future.cancel()
        raise Unreachable(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None


def get(url: str, timeout: float = 10.0) -> Answer:
    return request("GET", url, timeout=timeout)


def post_json(url: str, body: dict, timeout: float = 60.0) -> Answer:
    return request("POST", url, json_body=body, timeout=timeout)
