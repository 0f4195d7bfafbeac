"""`nmm serve` against clients that fail it, by accident or on purpose (issue 27, R22–R24):

- every response is counted with the status its client got: a 500, a stream that fails after it
  began, a stream the client cuts (499); nothing received goes uncounted;
- one request's fault fails that request only: an over-long prompt among 40 innocent drawings,
  a temperature of 1e-39, a 2,000,000-character text, a batch whose forward pass raises;
- memory and the event loop are bounded: a 256 MiB body is refused on its headers (or at the cap
  when chunked), 8000×8000 images and 690k content parts are refused while `/healthz` keeps
  answering within a second, half-sent requests are cut off at the header deadline.

Fault injection needs the server in this process (uvicorn in a thread); the memory and slow-client
tests run `nmm serve` as its own process, measured from outside.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from nmm.ports import free_port
from tests.conftest import NMM, wait_for, wait_http
from tests.serving_fixture import InProcess, counts, png_url, publish_small_model

pytestmark = pytest.mark.integration


def post(base: str, path: str, body, timeout: float = 60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def chat(text: str | None = "Describe the image.", **kw) -> dict:
    content = [{"type": "image_url", "image_url": {"url": png_url()}}]
    if text is not None:
        content.insert(0, {"type": "text", "text": text})
    return {"model": "nmm", "messages": [{"role": "user", "content": content}], "max_tokens": 4} | kw


def received(base: str) -> float:
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("nmm_requests_received_total{"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    publish_small_model(folder.as_uri())
    return folder


def test_a_500_is_counted_as_a_500_with_openai_s_error_body(model_dir, monkeypatch):
    import nmm.serve.server as server

    def broken(*a, **kw):
        raise RuntimeError("the model broke")

    monkeypatch.setattr(server, "generate", broken)
    with InProcess(model_dir) as s:
        status, body = post(s.url, "/v1/chat/completions", chat())
        assert status == 500 and body["error"]["type"] == "server_error", body
        assert post(s.url, "/v1/images/generations", {"prompt": "a handwritten digit 3"})[0] == 200
        c = counts(s.url)
        assert c[("/v1/chat/completions", "500")] == 1 and c[("/v1/images/generations", "200")] == 1
        assert sum(c.values()) == received(s.url) == 2


def test_a_stream_that_fails_after_it_began_is_counted_as_a_500(model_dir, monkeypatch):
    import nmm.serve.server as server

    def fails_midway(model, prompts, *a, on_step=None, **kw):
        on_step(list(range(len(prompts))), [100] * len(prompts))  # one token out to every stream
        raise RuntimeError("the model broke mid-answer")

    monkeypatch.setattr(server, "generate", fails_midway)
    with InProcess(model_dir) as s:
        req = urllib.request.Request(
            s.url + "/v1/chat/completions",
            data=json.dumps(chat(stream=True)).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
            events = [line for line in r.read().decode().splitlines() if line.startswith("data: ")]
        assert "generation failed" in events[-1]
        assert counts(s.url) == {("/v1/chat/completions", "500"): 1.0}


def test_a_stream_the_client_cuts_is_counted_as_499(model_dir, monkeypatch):
    import nmm.serve.server as server

    real = server.generate

    def slow(model, prompts, *a, on_step=None, **kw):
        def step(idx, toks):
            time.sleep(0.2)
            on_step(idx, toks)

        return real(model, prompts, *a, on_step=step, **kw)

    monkeypatch.setattr(server, "generate", slow)
    with InProcess(model_dir) as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(chat(stream=True, max_tokens=12)),
            {"Content-Type": "application/json"},
        )
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")  # the stream began
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        wait_for(
            lambda: counts(s.url).get(("/v1/chat/completions", "499")) == 1,
            30,
            lambda: f"the cut stream counted as 499: {counts(s.url)}",
        )
        assert counts(s.url) == {("/v1/chat/completions", "499"): 1.0} and received(s.url) == 1


def test_one_over_long_prompt_fails_alone_and_its_batch_mates_are_drawn(model_dir):
    with InProcess(model_dir) as s:
        long_prompt = "a handwritten digit three, " * 40  # ~1,000 characters: far past the model's context
        bodies = [{"prompt": long_prompt if i == 7 else f"a handwritten digit {i % 10}", "seed": i} for i in range(40)]
        with ThreadPoolExecutor(40) as pool:
            answers = list(pool.map(lambda b: post(s.url, "/v1/images/generations", b), bodies))
        assert [st for st, _ in answers].count(200) == 39, [st for st, _ in answers]
        status, err = answers[7]
        assert status == 400 and err["error"]["param"] == "prompt", err
        assert "draws after at most" in err["error"]["message"] and "tokens" in err["error"]["message"]


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/images/generations", {"prompt": "a handwritten digit 3", "temperature": 1e-39}),
        ("/v1/chat/completions", chat(temperature=1e-39, seed=1)),
    ],
    ids=["draw", "chat"],
)
def test_a_temperature_below_the_floor_is_greedy_not_a_500(model_dir, path, body):
    with InProcess(model_dir) as s:
        status, out = post(s.url, path, body)
        assert status == 200, out
        if path.endswith("completions"):
            greedy = post(s.url, path, chat(seed=1))[1]
            assert out["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "nmm", "messages": [{"role": "user", "content": "x" * 2_000_000}]}, "messages.0.content"),
        (chat("x" * 2_000_000), "messages.0.content.0.text"),
        ({"model": "nmm", "messages": [{"role": "user", "content": [{}] * 690_000}]}, "messages.0.content"),
        ({"model": "nmm", "messages": [{"role": "user", "content": "hi"}] * 100_000}, "messages"),
    ],
    ids=["2M-char-content", "2M-char-part", "690k-parts", "100k-messages"],
)
def test_huge_texts_and_part_bombs_are_a_fast_400_naming_the_field(model_dir, body, param):
    with InProcess(model_dir) as s:
        t0 = time.monotonic()
        status, err = post(s.url, "/v1/chat/completions", body)
        assert status == 400 and err["error"]["param"] == param, err
        assert "at most" in err["error"]["message"]
        assert time.monotonic() - t0 < 5  # seconds, not minutes: refused before the parts are read one by one


def test_a_batch_that_raises_is_rerun_job_by_job_so_only_the_bad_job_fails():
    from nmm.serve.batcher import Batcher

    ran = []

    def run(jobs):
        ran.append(len(jobs))
        if any(j.payload == "poison" for j in jobs):
            raise ValueError("poisoned batch")
        return [j.payload.upper() for j in jobs]

    b = Batcher(run, max_batch=8, max_wait_ms=200)
    jobs = [b.enqueue("k", p) for p in ("a", "b", "poison", "c")]
    assert [j.future.result(10) if j.payload != "poison" else None for j in jobs] == ["A", "B", None, "C"]
    with pytest.raises(ValueError, match="poisoned"):
        jobs[2].future.result(10)
    assert ran[0] == 4 and sorted(ran[1:]) == [1, 1, 1, 1]
    b.drain()


@pytest.fixture(scope="module")
def served(model_dir):
    """`nmm serve` as its own process (RSS measured from outside), short header and body deadlines."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NMM_S3", "MLFLOW"))}
    log = open(model_dir / "serve.log", "wb")
    proc = subprocess.Popen(
        [NMM, "serve", model_dir.as_uri(), "--port", str(port), "--header-timeout", "2", "--body-timeout", "3"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 60, proc)
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def raw(port: int, head: bytes, body_chunks=(), read: bool = True, timeout: float = 30) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading and closed: what the test wants
        if not read:
            return b""
        out = b""
        try:
            while len(out) < 1 << 16 and (data := sock.recv(1 << 16)):
                out += data
        except ConnectionResetError:
            pass
        return out


def test_a_256_mib_body_is_refused_on_its_headers_and_a_chunked_one_at_the_cap(served):
    proc, port = served
    before = rss_mib(proc.pid)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 268435456\r\n\r\n"
    )
    assert raw(port, head, [b" " * (1 << 20)] * 2).startswith(b"HTTP/1.1 413")
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    chunked = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = raw(port, chunked, (chunk for _ in range(256)))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"over 8388608 bytes" in answer
    assert rss_mib(proc.pid) - before < 64, (before, rss_mib(proc.pid))
    assert post(f"http://127.0.0.1:{port}", "/v1/chat/completions", chat())[0] == 200


def png(side: int) -> str:
    img = Image.new("L", (side, side), 128)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_huge_images_and_part_bombs_leave_healthz_answering_within_a_second(served):
    proc, port = served
    base = f"http://127.0.0.1:{port}"
    huge = chat(None) | {
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png(8000)}}]}]
    }
    bomb = {"model": "nmm", "messages": [{"role": "user", "content": [{}] * 690_000}]}
    slowest, stop = [0.0], threading.Event()

    def probe() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            urllib.request.urlopen(base + "/healthz", timeout=10).read()
            slowest[0] = max(slowest[0], time.monotonic() - t0)
            time.sleep(0.02)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda b: post(base, "/v1/chat/completions", b), [huge] * 8 + [bomb] * 2))
    stop.set()
    prober.join()
    assert all(st == 400 for st, _ in answers), answers
    assert "pixels is over" in answers[0][1]["error"]["message"], answers[0]
    assert slowest[0] < 1.0, f"/healthz took {slowest[0]:.2f} s under hostile requests"


@pytest.mark.parametrize(
    "url, why",
    [
        ("data:image/bmp;base64," + base64.b64encode(b"BM" + b"\0" * 64).decode(), "image/bmp is not accepted"),
        (png(8).replace("image/png", "image/jpeg"), "not a usable image"),
    ],
    ids=["bmp", "png-declared-as-jpeg"],
)
def test_only_the_declared_accepted_image_formats_are_decoded(served, url, why):
    _, port = served
    body = chat(None) | {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    status, err = post(f"http://127.0.0.1:{port}", "/v1/chat/completions", body)
    assert status == 400 and why in err["error"]["message"], err


def test_half_sent_requests_are_closed_at_the_header_deadline_and_slow_bodies_get_408(served):
    proc, port = served
    socks = []
    for _ in range(300):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest of the head
        socks.append(s)
    assert post(f"http://127.0.0.1:{port}", "/v1/chat/completions", chat())[0] == 200  # others are served meanwhile
    deadline = time.monotonic() + 20
    closed = 0
    for s in socks:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            closed += s.recv(1) == b""
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed += 1
        s.close()
    assert closed == 300, f"{closed} of 300 half-sent requests closed by the server"
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    t0 = time.monotonic()
    answer = raw(port, head + b"{", timeout=30)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert 2.5 < time.monotonic() - t0 < 20


def test_under_mixed_hostile_load_no_innocent_request_fails_and_memory_stays_bounded(served):
    """Concurrency 32, one request in ten hostile (over-long prompts, tiny temperatures, 256 MiB
    bodies, half-sent requests, 8000×8000 images): every innocent request 200, /healthz under a
    second throughout, RSS within 200 MiB of its idle value."""
    proc, port = served
    base = f"http://127.0.0.1:{port}"
    idle = rss_mib(proc.pid)
    huge_image = png(8000)

    def innocent(i: int) -> bool:
        if i % 2:
            return (
                post(base, "/v1/images/generations", {"prompt": f"a handwritten digit {i % 10}", "seed": i})[0] == 200
            )
        return post(base, "/v1/chat/completions", chat(stream=False, seed=i))[0] == 200

    def hostile(i: int) -> None:
        kind = i % 5
        if kind == 0:
            post(base, "/v1/images/generations", {"prompt": "a handwritten digit three, " * 40})
        elif kind == 1:
            post(base, "/v1/chat/completions", chat(temperature=1e-39))
        elif kind == 2:
            raw(
                port,
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 268435456\r\n\r\n",
                [b" " * (1 << 20)] * 4,
            )
        elif kind == 3:
            raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n", read=False)
        else:
            post(
                base,
                "/v1/chat/completions",
                chat(None)
                | {
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": huge_image}}]}]
                },
            )

    peak, slowest, stop = [idle], [0.0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            urllib.request.urlopen(base + "/healthz", timeout=10).read()
            slowest[0] = max(slowest[0], time.monotonic() - t0)
            peak[0] = max(peak[0], rss_mib(proc.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: hostile(i) if i % 10 == 3 else innocent(i), range(400)))
    stop.set()
    watcher.join()
    innocents = [r for i, r in enumerate(results) if i % 10 != 3]
    assert all(innocents), f"{innocents.count(False)} innocent requests failed"
    assert slowest[0] < 1.0, f"/healthz took {slowest[0]:.2f} s"
    assert peak[0] - idle < 200, f"RSS {idle:.0f} MiB idle, {peak[0]:.0f} MiB at peak"
    c = counts(base)
    assert not any(status.startswith("5") for _, status in c)
    print(f"mixed load: RSS {idle:.0f} MiB idle, {peak[0]:.0f} MiB peak; slowest /healthz {slowest[0] * 1000:.0f} ms")
