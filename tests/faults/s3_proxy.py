"""A fault-injecting HTTP proxy in front of moto's S3 server (loopback): it forwards every request
unchanged, or answers the next N requests with a 5xx, or holds them for a while before
forwarding. What a flaky or overloaded MinIO looks like to the minio client."""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultyS3:
    def __init__(self, upstream: str):
        self.upstream = upstream  # host:port of moto
        self.lock = threading.Lock()
        self.errors: list[int] = []  # statuses to answer next, one per request
        self.always: int | None = None  # a status for every request
        self.hang_until = 0.0  # requests arriving before this moment wait until then
        self.seen = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_):
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    proxy.seen += 1
                    status = proxy.errors.pop(0) if proxy.errors else proxy.always
                    wait = proxy.hang_until - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if status:
                    msg = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                conn.request(self.command, self.path, body=body, headers={k: v for k, v in self.headers.items()})
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail_next(self, n: int, status: int = 503) -> None:
        with self.lock:
            self.errors = [status] * n

    def fail_always(self, status: int | None) -> None:
        with self.lock:
            self.always = status

    def hang_for(self, seconds: float) -> None:
        with self.lock:
            self.hang_until = time.monotonic() + seconds

    def close(self) -> None:
        self.server.shutdown()
