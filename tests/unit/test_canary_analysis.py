"""The canary's pure parts: reading Prometheus text (NaN, Inf and negative counts refused), windows
between scrapes summed over every pod (a restarted pod read from zero, a vanished one unknowable),
requests received and never counted, counts that disagree with the router's, quantiles as
Prometheus computes them, the verdict failing closed, the router's exact split, the policy's
validation."""

import math

import pytest

from nmm.rollout import analysis
from nmm.rollout.router import Router

PAGE = """\
# HELP nmm_requests_total HTTP requests by route and status
# TYPE nmm_requests_total counter
nmm_requests_total{route="/v1/chat/completions",status="200"} %(ok)s
nmm_requests_total{route="/v1/chat/completions",status="503"} %(bad)s
nmm_requests_total{route="/v1/chat/completions",status="400"} 7.0
nmm_requests_total{route="/v1/models",status="200"} 99.0
# HELP nmm_request_seconds Request latency by route
# TYPE nmm_request_seconds histogram
nmm_request_seconds_bucket{le="0.1",route="/v1/chat/completions"} %(fast)s
nmm_request_seconds_bucket{le="0.5",route="/v1/chat/completions"} %(ok)s
nmm_request_seconds_bucket{le="+Inf",route="/v1/chat/completions"} %(ok)s
nmm_request_seconds_count{route="/v1/chat/completions"} %(ok)s
nmm_request_seconds_sum{route="/v1/chat/completions"} 1.0
# HELP nmm_time_to_first_token_seconds Time until the first answer token
# TYPE nmm_time_to_first_token_seconds histogram
nmm_time_to_first_token_seconds_bucket{le="0.1"} %(fast)s
nmm_time_to_first_token_seconds_bucket{le="0.5"} %(ok)s
nmm_time_to_first_token_seconds_bucket{le="+Inf"} %(ok)s
nmm_time_to_first_token_seconds_count %(ok)s
nmm_time_to_first_token_seconds_sum 1.0
# HELP nmm_queue_depth Requests waiting or running
# TYPE nmm_queue_depth gauge
nmm_queue_depth 0.0
# HELP nmm_requests_received_total HTTP requests by route, counted as they arrive
# TYPE nmm_requests_received_total counter
nmm_requests_received_total{route="/v1/chat/completions"} %(received)s
nmm_requests_received_total{route="/v1/models"} 99.0
# HELP nmm_requests_in_flight Requests received and not yet answered
# TYPE nmm_requests_in_flight gauge
nmm_requests_in_flight %(in_flight)s
"""

LIMITS = analysis.Limits(
    max_error_rate=0.05, max_p95_latency_ms=400, max_time_to_first_token_ms=400, min_requests=10, max_quality_drop=0.05
)


def page(ok, bad, fast, received=None, in_flight=0):
    received = ok + bad + 7 + in_flight if received is None else received
    return analysis.parse(
        PAGE
        % {
            "ok": float(ok),
            "bad": float(bad),
            "fast": float(fast),
            "received": float(received),
            "in_flight": float(in_flight),
        }
    )


def test_a_window_counts_only_the_traffic_between_two_scrapes_and_reads_p95_like_prometheus():
    before, after = page(10, 0, 10), page(110, 5, 60)  # 100 new 200s (50 under 0.1 s), 5 new 503s
    o = analysis.window(before, after)
    assert (o.requests, o.errors) == (105, 5)  # /v1/models is not served traffic; 4xx are the client's, not errors
    # rank 95 of 100: in the (0.1, 0.5] bucket holding 50..100 → 0.1 + 0.4 * 45/50
    assert o.p95_latency_ms == pytest.approx(460.0)
    assert o.p95_ttft_ms == pytest.approx(460.0)


def test_a_restarted_server_is_read_from_zero():
    o = analysis.window(page(500, 0, 500), page(20, 0, 20))
    assert o.requests == 27 and o.p95_latency_ms == pytest.approx(95.0)  # 4xx answers count as served


def test_quantile_edge_cases():
    assert math.isnan(analysis.quantile(0.95, ()))
    assert math.isnan(analysis.quantile(0.95, ((0.1, 0.0), (math.inf, 0.0))))
    assert analysis.quantile(0.95, ((0.1, 0.0), (1.0, 0.0), (math.inf, 4.0))) == 1.0  # all in +Inf: the last bound


def test_a_page_without_nmm_metrics_is_refused():
    with pytest.raises(analysis.MetricsError):
        analysis.parse("# TYPE up gauge\nup 1\n")
    with pytest.raises(analysis.MetricsError):
        analysis.parse("nmm_queue_depth{ not prometheus")


def test_the_verdict_passes_a_healthy_step_and_fails_each_limit_by_name():
    healthy = analysis.Observation(100, 1, 300.0, 200.0)
    assert analysis.judge(LIMITS, healthy, {"m2t": (0.80, 0.82)}).ok
    v = analysis.judge(LIMITS, analysis.Observation(100, 10, 900.0, 800.0), {"m2t": (0.5, 0.8)})
    assert not v.ok and len(v.reasons) == 4
    assert any("maxErrorRate" in r for r in v.reasons) and any("maxP95LatencyMs" in r for r in v.reasons)
    assert any("maxTimeToFirstTokenMs" in r for r in v.reasons) and any("maxQualityDrop" in r for r in v.reasons)


@pytest.mark.parametrize(
    "candidate, quality, why",
    [
        ("http://x/metrics: connection refused", {"m2t": (0.9, 0.8)}, "not observable"),
        (analysis.Observation(3, 0, 10.0, 10.0), {"m2t": (0.9, 0.8)}, "no evidence"),
        (analysis.Observation(100, 0, math.nan, math.nan), {"m2t": (0.9, 0.8)}, "p95 latency nan"),
        (analysis.Observation(100, 0, 10.0, 10.0, uncounted=2), {"m2t": (0.9, 0.8)}, "received and never counted"),
        (analysis.Observation(100, 0, 10.0, 10.0), "candidate: answered 500", "quality probe did not run"),
        (analysis.Observation(100, 0, 10.0, 10.0), None, "quality probe did not run"),
    ],
)
def test_what_cannot_be_measured_fails_the_step(candidate, quality, why):
    v = analysis.judge(LIMITS, candidate, quality)
    assert not v.ok and any(why in r for r in v.reasons), v.reasons


@pytest.mark.parametrize("value", ["NaN", "+Inf", "-3.0"])
def test_a_page_with_nan_inf_or_a_negative_count_is_refused_not_read(value):
    text = PAGE % {"ok": value, "bad": 0.0, "fast": 0.0, "received": 0.0, "in_flight": 0.0}
    with pytest.raises(analysis.MetricsError, match="not a count"):
        analysis.parse(text)


def test_a_request_received_and_never_answered_nor_in_flight_is_uncounted():
    before = page(10, 0, 10)
    assert analysis.window(before, page(20, 0, 20, in_flight=3)).uncounted == 0  # three still running: in flight
    lost = analysis.window(before, page(20, 0, 20, received=10 + 7 + 10 + 4))
    assert lost.uncounted == 4 and not analysis.judge(LIMITS, lost, {"m2t": (0.9, 0.9)}).ok


def test_every_pod_is_read_a_restarted_one_from_zero_a_new_one_whole_and_a_vanished_one_fails_the_step():
    before = {"pod-a": page(100, 0, 100), "pod-b": page(50, 0, 50)}
    after = {"pod-a": page(130, 2, 130), "pod-b": page(5, 0, 5), "pod-c": page(10, 0, 10)}  # b restarted, c is new
    o = analysis.window(before, after)
    assert (o.requests, o.errors) == (30 + 2 + (5 + 7) + (10 + 7), 2)
    gone = analysis.window(before, {"pod-a": page(130, 2, 130)})
    assert isinstance(gone, str) and "pod-b" in gone and "never counted" in gone
    assert "not observable" in analysis.judge(LIMITS, gone, None).reasons[0]


def test_counts_that_disagree_with_the_router_fail_the_step():
    o = analysis.window(page(10, 0, 10), page(40, 1, 40))
    agree = {"200": 30, "503": 1}
    assert analysis.judge(LIMITS, o, {"m2t": (0.9, 0.9)}, router=agree | {"400": 0}).ok
    v = analysis.judge(LIMITS, o, {"m2t": (0.9, 0.9)}, router=agree | {"500": 3})
    assert not v.ok and "requests went uncounted" in v.reasons[0]
    cut = analysis.with_undelivered(o, 4)  # 502s the router answered itself: errors of the candidate
    assert cut.errors == 5 and analysis.judge(LIMITS, cut, {"m2t": (0.9, 0.9)}, router=agree | {"502": 4}).reasons == [
        f"error rate {5 / 35:.3f} > maxErrorRate 0.05"
    ]


def test_a_candidate_that_refuses_what_stable_answers_fails_and_each_task_s_quality_is_judged():
    stable = analysis.Observation(100, 0, 10.0, 10.0, client_errors=1)
    refuses = analysis.Observation(100, 0, 10.0, 10.0, client_errors=40)
    v = analysis.judge(LIMITS, refuses, {"m2t": (0.9, 0.9)}, stable=stable)
    assert not v.ok and "refused 0.400 of its requests (4xx), stable 0.010" in v.reasons[0]
    drawing_broke = analysis.judge(
        LIMITS, analysis.Observation(100, 0, 10.0, 10.0), {"m2t": (0.9, 0.9), "m2g": (0.0, 0.8)}
    )
    assert not drawing_broke.ok and drawing_broke.reasons == [
        "quality probe (m2g) 0.000 vs stable 0.800: drop 0.800 > maxQualityDrop 0.05"
    ]
    assert drawing_broke.measured["quality_drop"] == pytest.approx(0.8)


def test_without_a_probe_the_slos_alone_decide():
    limits = analysis.Limits(0.05, 400, 400, 10, None)
    assert analysis.judge(limits, analysis.Observation(50, 0, 100.0, 100.0), None).ok


@pytest.mark.parametrize("weight", [0, 10, 25, 50, 90, 100])
def test_the_router_sends_exactly_the_weight(weight):
    r = Router("http://s", "http://c", 0)
    r.set_weight(weight)
    picks = [r.pick() for _ in range(1000)]
    assert picks.count("candidate") == weight * 10
    first_ten = [r.pick() for _ in range(10)]
    assert first_ten.count("candidate") == weight // 10  # spread evenly, not in a burst


def test_the_policy_is_validated():
    from nmm.spec.serving import Canary, ServedModel, Serving

    with pytest.raises(ValueError, match="rise strictly"):
        Canary.model_validate({"steps": [{"weight": 50}, {"weight": 10}, {"weight": 100}]})
    with pytest.raises(ValueError, match="weight 100"):
        Canary.model_validate({"steps": [{"weight": 10}, {"weight": 50}]})
    with pytest.raises(ValueError, match="exactly one of alias and version"):
        ServedModel.model_validate({"name": "m", "alias": "champion", "version": 3})
    with pytest.raises(ValueError, match="gpus is 0"):
        Serving.model_validate({"resources": {"gpuPool": "a100"}})
    assert [s.weight for s in Canary().steps] == [10, 50, 100]
    from nmm.spec.serving import ServiceSpec

    model = {"name": "m", "alias": "candidate"}
    assert (
        ServiceSpec.model_validate({"model": model}).canary.analysis.quality_probe is None
    )  # an NMMService: off unless given
    with pytest.raises(ValueError, match="casesUri"):
        ServiceSpec.model_validate({"model": model, "canary": {"analysis": {"qualityProbe": {"cases": 10}}}})
    assert Serving().canary.analysis.quality_probe is not None  # a pipeline: on (it writes the cases)


def test_local_traffic_mixes_chat_and_image_requests_for_a_model_that_does_both():
    from nmm.rollout.local_canary import Traffic

    case = {"image": "data:image/png;base64,AAAA", "question": None, "expect": {"digit": 1}}
    t = Traffic("http://router", [case], ["a handwritten digit 3"])
    t.model = "m"
    asked = [t._request(n) for n in range(2000)]
    drawn = [n for n, (path, _) in enumerate(asked) if path == "/v1/images/generations"]
    streamed = [n for n, (_, body) in enumerate(asked) if body.get("stream")]
    assert 0.22 < len(drawn) / 2000 < 0.28 and 0.22 < len(streamed) / 2000 < 0.28
    # the mix is not periodic: a 50 % round robin (even n to one track, odd to the other) gets drawings on both
    assert 0.4 < sum(n % 2 for n in drawn) / len(drawn) < 0.6
    assert asked == [t._request(n) for n in range(2000)]  # and deterministic
    only_images = Traffic("http://router", [], ["a 3"])
    only_images.model = "m"
    assert {only_images._request(n)[0] for n in range(4)} == {"/v1/images/generations"}
    with pytest.raises(Exception, match="nothing to send"):
        Traffic("http://router", [], []).start()


def test_the_rollout_client_returns_every_status_and_names_an_unreachable_server():
    """One client for the probe, the scrapes and the traffic: a 4xx/5xx is an answer the caller
    judges (the probe refuses it, the traffic counts it), no answer at all is `Unreachable`."""
    import http.server
    import threading

    from nmm.ports import free_port
    from nmm.rollout import client

    class Busy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"busy")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert client.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5) == (503, b"busy")
    finally:
        server.shutdown()
    with pytest.raises(client.Unreachable):
        client.get(f"http://127.0.0.1:{free_port()}/metrics", timeout=2)
