"""What stands between a client and nmm's routes: every response counted with its real status,
bodies bounded before they are spent, slow clients cut off.

- `Counted` (ASGI middleware): each request to a served route is counted once when it ends, in
  `nmm_requests_total{route, status}` with the status the client really got: a handler that
  raised is a 500 (answered here when nothing was sent yet), a stream that failed after it began
  is a 500 (the handler marks it: `mark(scope, 500)`), a response the client hung up on before
  its end is a 499 (nginx's "client closed request"). `nmm_requests_received_total` and
  `nmm_requests_in_flight` let an analysis prove that nothing went uncounted.
- `read_body`: refuses a body over the limit on `Content-Length` before reading it, stops reading
  a chunked one at the limit, gives up on one that takes longer than its deadline (408), and
  reads only while the server's budget of body bytes in flight lasts (429 beyond it).
- `serve`: uvicorn with a header deadline (`HeaderDeadline`: a connection that has not sent a
  whole request head within `HEADER_TIMEOUT_S` is closed — uvicorn itself waits forever),
  keep-alive and concurrency bounds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from nmm.serve.openai_api import APIError

INTERNAL = APIError(500, "internal error (the server's log has it)", kind="server_error")

HEADER_TIMEOUT_S = 10.0  # a request head (line and headers) must arrive whole within this
BODY_TIMEOUT_S = 30.0  # a body must arrive whole within this
KEEP_ALIVE_S = 5.0
BODY_BUDGET_BYTES = 64 << 20  # bodies being read at once, all requests together
MAX_CONNECTIONS = 1024  # uvicorn answers 503 beyond (limit_concurrency)
CLIENT_CLOSED = 499
OUTCOME = "nmm.outcome"  # scope key: a handler's verdict on a response it already began

log = logging.getLogger("nmm.serve")


def mark(scope: dict, status: int) -> None:
    """Record the status a response really had when its headers already went out (a stream that failed)."""
    scope.setdefault(OUTCOME, {})["status"] = status


class Counted:
    """ASGI middleware counting every request to `routes` once, with its real status."""

    def __init__(self, app, metrics, routes: tuple[str, ...]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.routes:
            return await self.app(scope, receive, send)
        route, t0 = scope["path"], time.perf_counter()
        seen = {"status": None, "ended": False, "ending": False, "gone": False}
        watcher: asyncio.Task | None = None
        self.metrics.received.labels(route).inc()
        self.metrics.in_flight.inc()

        async def watch() -> None:  # after the body: a further message is the client leaving
            if (await receive())["type"] == "http.disconnect" and not seen["ending"]:
                seen["gone"] = True

        async def counted_receive():
            nonlocal watcher
            message = await receive()
            if message["type"] == "http.disconnect" and not seen["ending"]:
                seen["gone"] = True
            elif not message.get("more_body") and watcher is None:
                watcher = asyncio.ensure_future(watch())
            return message

        async def counted_send(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            final = message["type"] == "http.response.body" and not message.get("more_body")
            seen["ending"] |= final
            await send(message)
            seen["ended"] |= final

        try:
            await self.app(scope, counted_receive, counted_send)
        except Exception:
            log.exception("%s failed", route)
            mark(scope, 500)
            if seen["status"] is None:  # nothing was sent: the client gets a 500 with OpenAI's error body
                await _answer_500(send, route)
                seen["ended"] = True
        finally:
            if watcher is not None:
                watcher.cancel()
            status = scope.get(OUTCOME, {}).get("status") or (
                seen["status"] if seen["ended"] and not seen["gone"] else CLIENT_CLOSED if seen["gone"] else 500
            )
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
            self.metrics.in_flight.dec()


async def _answer_500(send, route: str) -> None:
    body = json.dumps(INTERNAL.body()).encode()
    try:
        await send(
            {
                "type": "http.response.start",
                "status": 500,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
    except OSError:  # the client is gone (ClientDisconnected is an OSError): it is counted as the 500 it was
        log.info("%s: the client left before its 500 was sent", route)


def unread(exc: APIError) -> APIError:
    """Mark a refusal given before the body was read to its end: its answer closes the
    connection (what is left of the body is never read)."""
    exc.close_connection = True
    return exc


class BodyBudget:
    """Bytes of request bodies being read at once (single event loop: no lock)."""

    def __init__(self, limit: int = BODY_BUDGET_BYTES):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise unread(
                APIError(429, "busy: too many request bodies are being read; retry shortly", kind="rate_limit_error")
            )
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


async def read_body(request, limit: int, budget: BodyBudget, deadline_s: float = BODY_TIMEOUT_S) -> bytes:
    """The whole body, or an APIError: 413 over `limit` (on Content-Length before reading), 408
    when it takes over `deadline_s`, 429 when the budget of bodies in flight is spent."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise unread(APIError(400, "Content-Length is not a number"))
        if int(declared) > limit:
            raise unread(APIError(413, f"the request body is {int(declared)} bytes; the limit is {limit}"))
    reserved = int(declared) if declared is not None else limit
    budget.take(reserved)
    try:
        chunks, size = [], 0
        async with asyncio.timeout(deadline_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise unread(APIError(413, f"the request body is over {limit} bytes"))
                chunks.append(chunk)
        return b"".join(chunks)
    except TimeoutError:
        raise unread(APIError(408, f"the request body did not arrive within {deadline_s:g} s")) from None
    finally:
        budget.give(reserved)


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head: a connection that is opened,
    or kept alive, and does not send a whole request line and headers within HEADER_TIMEOUT_S is
    closed (300 half-sent requests otherwise stay open for good)."""

    header_timeout = HEADER_TIMEOUT_S

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = None
        self._arm()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expired(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's head must come in time too (keep-alive closes idle ones first)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def config(app, host: str, port: int, header_timeout: float = HEADER_TIMEOUT_S):
    """uvicorn's configuration for `app`, bounded: request heads, idle keep-alive, connections."""
    import uvicorn

    protocol = type("HeaderDeadline", (HeaderDeadline,), {"header_timeout": header_timeout})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=30,
        http=protocol,
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=MAX_CONNECTIONS,
        h11_max_incomplete_event_size=16 << 10,
    )


def serve(app, host: str, port: int, header_timeout: float = HEADER_TIMEOUT_S) -> None:
    import uvicorn

    uvicorn.Server(config(app, host, port, header_timeout)).run()
