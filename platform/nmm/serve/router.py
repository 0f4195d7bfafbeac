"""The local traffic splitter of a canary: one loopback port in front of the stable and the
candidate `nmm serve`, sending `weight` percent of requests to the candidate — what KServe's
`canaryTrafficPercent` or a Gateway API HTTPRoute's weighted backends do on a cluster.

Smooth weighted round robin (nginx's), so 10 % means exactly one request in ten, not a coin
flip: short local steps see the share they asked for. Each response carries `x-nmm-track`
(stable | candidate). Requests a backend could not take (connection refused: a crashed server)
answer 502 and are counted per track, so the analysis sees them; an answer the backend cuts
after it began (a stream when the server dies) is cut for the client too, and counted the same.
"""

from __future__ import annotations

import asyncio
import threading

TRACKS = ("stable", "candidate")
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class Router:
    def __init__(self, stable_url: str, candidate_url: str, port: int, host: str = "127.0.0.1"):
        self.urls = {"stable": stable_url.rstrip("/"), "candidate": candidate_url.rstrip("/")}
        self.host, self.port = host, port
        self._weight = 0
        self._current = {t: 0 for t in TRACKS}
        self._lock = threading.Lock()
        self.sent = {t: 0 for t in TRACKS}
        self.failed = {t: 0 for t in TRACKS}  # could not be delivered (502)
        self.finished = {t: 0 for t in TRACKS}  # answered to the end, or failed: no longer in flight
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

    async def _handle(self, request):
        from aiohttp import ClientError, web

        track = self.pick()
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        with self._lock:
            self.sent[track] += 1
        out = None
        try:
            async with self._session.request(request.method, self.urls[track] + request.rel_url.path_qs,
                                             data=body, headers=headers) as upstream:
                out = web.StreamResponse(status=upstream.status, headers={
                    k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS} | {"x-nmm-track": track})
                await out.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
                return out
        except (ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            with self._lock:
                self.failed[track] += 1
            if out is not None:  # the answer had begun (a stream cut by a dying server): cut ours too
                if request.transport is not None:
                    request.transport.close()
                return out
            body = {"error": {"message": f"{track} backend unavailable: {type(exc).__name__}", "type": "server_error",
                              "param": None, "code": "backend_unavailable"}}
            return web.json_response(body, status=502, headers={"x-nmm-track": track})
        finally:
            with self._lock:
                self.finished[track] += 1

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
