"""The local traffic splitter of a canary: one loopback port in front of the stable and the
candidate `nmm serve`, sending `weight` percent of requests to the candidate — what KServe's
`canaryTrafficPercent` or a Gateway API HTTPRoute's weighted backends do on a cluster.

Smooth weighted round robin (nginx's), so 10 % means exactly one request in ten, not a coin
flip: short local steps see the share they asked for. Each response carries `x-nmm-track`
(stable | candidate). Every request that ends is counted per track with what its client got:
the upstream's status (a 500 is a 500), 502 when no backend could take it (a crashed server),
`cut` when the backend broke off an answer it had begun (the client's is cut too), 499 when the
client left first. `hold(track)` makes a track's new requests wait and returns once none is in
flight, so a step's analysis reads the router's counts and the server's at the same moment.
"""

from __future__ import annotations

import asyncio
import threading
import time

from nmm.rollout.analysis import CLIENT_CLOSED, SERVED

TRACKS = ("stable", "candidate")
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}
UNDELIVERED, CUT = "502", "cut"


class Router:
    def __init__(self, stable_url: str, candidate_url: str, port: int, host: str = "127.0.0.1"):
        self.urls = {"stable": stable_url.rstrip("/"), "candidate": candidate_url.rstrip("/")}
        self.host, self.port = host, port
        self._weight = 0
        self._current = {t: 0 for t in TRACKS}
        self._lock = threading.Lock()
        self.sent = {t: 0 for t in TRACKS}
        self.failed = {t: 0 for t in TRACKS}  # not delivered (502) or cut off by the backend
        self.finished = {t: 0 for t in TRACKS}  # answered to the end, or failed: no longer in flight
        self.statuses: dict[str, dict[str, int]] = {t: {} for t in TRACKS}  # served routes: what each client got
        self._held = {t: False for t in TRACKS}
        self._in_flight = {t: 0 for t in TRACKS}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._runner = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def set_weight(self, weight: int) -> None:
        with self._lock:
            self._weight = max(0, min(100, int(weight)))
            self._current = {t: 0 for t in TRACKS}

    def split(self) -> dict[str, int]:
        """The traffic split now, percent per track (the serving backends' contract:
        nmm.compile.backends)."""
        with self._lock:
            return {"stable": 100 - self._weight, "candidate": self._weight}

    def pick(self) -> str:
        with self._lock:
            weights = {"candidate": self._weight, "stable": 100 - self._weight}
            for t in TRACKS:
                self._current[t] += weights[t]
            best = max(TRACKS, key=lambda t: self._current[t])
            self._current[best] -= 100
            return best

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        with self._lock:
            return dict(self.sent), dict(self.failed)

    def finished_counts(self) -> dict[str, int]:
        """Requests per track that are no longer in flight (answered to the end, or failed)."""
        with self._lock:
            return dict(self.finished)

    def status_counts(self, track: str) -> dict[str, int]:
        """What the clients of `track`'s served routes got so far, by status (`502`, `cut`, `499` included)."""
        with self._lock:
            return dict(self.statuses[track])

    def hold(self, track: str, timeout: float) -> bool:
        """Hold `track`'s new requests (they wait, unsent) and wait until none is in flight;
        False when some still were after `timeout` seconds. `release` lets them go."""
        with self._lock:
            self._held[track] = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._in_flight[track]:
                    return True
            time.sleep(0.01)
        return False

    def release(self, track: str) -> None:
        with self._lock:
            self._held[track] = False

    async def _admit(self, track: str) -> None:
        while True:
            with self._lock:
                if not self._held[track]:
                    self._in_flight[track] += 1
                    self.sent[track] += 1
                    return
            await asyncio.sleep(0.005)

    def _count(self, track: str, path: str, status: str) -> None:
        with self._lock:
            if path in SERVED:
                self.statuses[track][status] = self.statuses[track].get(status, 0) + 1
            if status in (UNDELIVERED, CUT):
                self.failed[track] += 1
            self.finished[track] += 1
            self._in_flight[track] -= 1

    async def _handle(self, request):
        from aiohttp import ClientError, web

        track = self.pick()
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        await self._admit(track)
        out, status = None, CLIENT_CLOSED  # a handler cancelled by aiohttp: the client left
        try:
            async with self._session.request(
                request.method, self.urls[track] + request.rel_url.path_qs, data=body, headers=headers
            ) as upstream:
                out = web.StreamResponse(
                    status=upstream.status,
                    headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
                    | {"x-nmm-track": track},
                )
                await out.prepare(request)
                chunks = upstream.content.iter_any().__aiter__()
                while True:
                    try:
                        chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                    except (TimeoutError, ClientError) as exc:  # the backend broke off: cut ours too
                        raise _Cut() from exc
                    await out.write(chunk)  # a client that left raises here: counted as 499
                await out.write_eof()
                status = str(upstream.status)
                return out
        except _Cut:
            status = CUT
            if request.transport is not None:
                request.transport.close()
            return out
        except (TimeoutError, ClientError, ConnectionError) as exc:
            if out is not None:  # our client is gone while we wrote to it
                return out
            status = UNDELIVERED
            body = {
                "error": {
                    "message": f"{track} backend unavailable: {type(exc).__name__}",
                    "type": "server_error",
                    "param": None,
                    "code": "backend_unavailable",
                }
            }
            return web.json_response(body, status=502, headers={"x-nmm-track": track})
        finally:
            self._count(track, request.path, status)

    async def _serve(self) -> None:
        import aiohttp
        from aiohttp import web

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
        app = web.Application(client_max_size=16 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self._ready.set()

    def start(self) -> Router:
        self._loop = asyncio.new_event_loop()

        def main():
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=main, name="nmm-router", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"the canary router did not start on {self.url}")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def close():
            await self._runner.cleanup()
            await self._session.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()
        self._loop = None


class _Cut(Exception):
    """The backend broke off an answer it had begun."""
