"""With replicas ≥ 2 the operator's analysis reads every ready pod of a version, not whichever
one a Service picked (issue 27 item 5): two pods on loopback addresses, listed as the API server
lists them, each scraped, their traffic summed."""

from __future__ import annotations

import http.server
import threading
from types import SimpleNamespace

import pytest

from nmm.rollout import analysis

pytestmark = pytest.mark.integration

PAGE = """# TYPE nmm_requests_total counter
nmm_requests_total{{route="/v1/chat/completions",status="200"}} {n}
# TYPE nmm_requests_received_total counter
nmm_requests_received_total{{route="/v1/chat/completions"}} {n}
# TYPE nmm_requests_in_flight gauge
nmm_requests_in_flight 0
# TYPE nmm_queue_depth gauge
nmm_queue_depth 0
"""


def metrics_server(host: str, port: int, counts: dict):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = PAGE.format(n=float(counts[host])).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def pod(name: str, ip: str, ready: bool = True, deleting: bool = False):
    return SimpleNamespace(
        metadata=SimpleNamespace(name=name, deletion_timestamp="now" if deleting else None),
        status=SimpleNamespace(pod_ip=ip, conditions=[SimpleNamespace(type="Ready", status=str(ready))]),
    )


def test_the_operator_reads_every_ready_pod_of_a_version_and_sums_them(monkeypatch):
    from nmm import kubeclient
    from nmm.compile import serving as build
    from nmm.ports import free_port
    from nmm_operator import service_handlers

    port, counts, asked = free_port(), {"127.0.0.2": 10, "127.0.0.3": 20}, []
    servers = [metrics_server(h, port, counts) for h in counts]
    pods = [
        pod("digits-canary-a", "127.0.0.2"),
        pod("digits-canary-b", "127.0.0.3"),
        pod("digits-canary-c", "127.0.0.4", ready=False),
        pod("digits-canary-d", "127.0.0.5", deleting=True),
    ]
    core = SimpleNamespace(
        list_namespaced_pod=lambda ns, label_selector: asked.append((ns, label_selector)) or SimpleNamespace(items=pods)
    )
    monkeypatch.setattr(kubeclient, "core", lambda: core)
    monkeypatch.setattr(build, "PORT", port)
    try:
        body = {"metadata": {"namespace": "team-a", "name": "digits", "uid": "u"}}
        spec = SimpleNamespace(model=SimpleNamespace(name="m"))
        world = service_handlers.KubeWorld(body, spec)
        before = world.read(1, 2)["candidate"]
        assert asked[0] == ("team-a", "nmm.dev/service=digits,nmm.dev/model-version=2")
        assert sorted(before) == [
            "digits-canary-a",
            "digits-canary-b",
        ]  # the unready and the terminating pods are not read
        counts["127.0.0.2"], counts["127.0.0.3"] = 15, 29
        after = world.read(1, 2)["candidate"]
        assert analysis.window(before, after).requests == 5 + 9  # both pods' traffic, not one of them
    finally:
        for s in servers:
            s.shutdown()
