"""`nmm serve` on loopback, called with the official `openai` client and with raw HTTP: chat with an
image part (plain and streamed), image generation, the model list, Prometheus metrics, dynamic
batching under concurrent requests, and a 4xx with OpenAI's error body for each malformed request
while the server keeps serving. The model is a small untrained one published like train publishes
(its words are noise; the protocol is what is tested)."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from nmm.ports import free_port
from tests.conftest import NMM, wait_http
from tests.serving_fixture import png_url, publish_small_model

pytestmark = pytest.mark.integration


SERVER_PID = [0]


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    publish_small_model(folder.as_uri())
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NMM_S3", "MLFLOW"))}
    log = open(folder / "serve.log", "wb")
    proc = subprocess.Popen(
        [NMM, "serve", folder.as_uri(), "--port", str(port), "--max-wait-ms", "20"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 60, proc)
        SERVER_PID[0] = proc.pid
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def post(base: str, path: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat_body(url: str | None = None, **kw) -> dict:
    content = [
        {"type": "text", "text": "Describe the image."},
        {"type": "image_url", "image_url": {"url": url or png_url()}},
    ]
    return {"model": "nmm", "messages": [{"role": "user", "content": content}], "max_tokens": 8} | kw


def test_the_openai_client_chats_with_an_image_streams_and_draws(server):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["nmm"]
    content = [{"type": "image_url", "image_url": {"url": png_url()}}]
    r = client.chat.completions.create(
        model="nmm", messages=[{"role": "user", "content": content}], max_tokens=6, seed=1
    )
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 16  # the image's 16 codes are in the prompt
    chunks = list(
        client.chat.completions.create(
            model="nmm", messages=[{"role": "user", "content": content}], max_tokens=6, stream=True
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    )  # greedy: same text
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) >= min(2, len(r.choices[0].message.content.split()))  # token by token, not one chunk
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    img = client.images.generate(model="nmm", prompt="a handwritten digit 3", n=2, response_format="b64_json")
    assert len(img.data) == 2
    for d in img.data:
        assert Image.open(io.BytesIO(base64.b64decode(d.b64_json))).size == (8, 8)


def test_concurrent_requests_are_batched_and_all_answered(server):
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: post(server, "/v1/chat/completions", chat_body(max_tokens=4)), range(32)))
    assert all(status == 200 for status, _ in results)
    text = urllib.request.urlopen(server + "/metrics", timeout=10).read().decode()
    count = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("nmm_batch_size_count")))
    total = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("nmm_batch_size_sum")))
    assert total / count > 1.5, (total, count)  # requests shared forward passes
    assert 'nmm_requests_total{route="/v1/chat/completions",status="200"}' in text


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        ([1, 2], 400, None),
        ({"model": "nmm"}, 400, "messages"),
        (chat_body(model="gpt-4o"), 404, "model"),
        (chat_body(max_tokens=100_000), 400, "max_tokens"),
        (chat_body(temperature="hot"), 400, "temperature"),
        (chat_body(url="https://example.com/cat.png"), 400, "image_url"),
        (chat_body(url="data:image/png;base64,!!!not-base64!!!"), 400, "image_url"),
        (chat_body(url="data:image/png;base64," + base64.b64encode(b"hello, world").decode()), 400, "image_url"),
        (chat_body(url="data:image/png;base64," + "A" * (6 << 20)), 413, "image_url"),
        ({"model": "nmm", "messages": [{"role": "user", "content": "no image here"}]}, 400, "messages"),
        ({"model": "nmm", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
        (
            chat_body()
            | {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what digit is this?"},
                            {"type": "image_url", "image_url": {"url": png_url()}},
                        ],
                    }
                ]
            },
            400,
            "messages",
        ),
        (chat_body() | {"messages": chat_body()["messages"] * 2}, 400, "messages"),
    ],
    ids=[
        "not-json",
        "not-an-object",
        "no-messages",
        "unknown-model",
        "too-many-tokens",
        "wrong-type",
        "http-url",
        "bad-base64",
        "not-an-image",
        "image-too-big",
        "no-image",
        "bad-role",
        "question-to-a-captioner",
        "two-turns",
    ],
)
def test_malformed_chat_requests_get_a_4xx_with_an_openai_error_and_the_server_keeps_serving(
    server, body, status, param
):
    got, err = post(server, "/v1/chat/completions", body)
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    if param:
        assert err["error"]["param"] == param
    assert post(server, "/v1/chat/completions", chat_body())[0] == 200


def test_malformed_image_requests_get_a_4xx(server):
    for body in ({"prompt": ""}, {"prompt": "a 3", "n": 100}, {"prompt": "a 3", "response_format": "url"}, {"n": 1}):
        status, err = post(server, "/v1/images/generations", body)
        assert status == 400 and err["error"]["param"], (body, err)


def test_serving_a_missing_or_tampered_model_exits_2(tmp_path):
    r = subprocess.run([NMM, "serve", (tmp_path / "nothing").as_uri()], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no published nmm model" in r.stderr and "Traceback" not in r.stderr
    publish_small_model(tmp_path.as_uri())
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    r = subprocess.run([NMM, "serve", tmp_path.as_uri()], capture_output=True, text=True, timeout=60)
    assert (
        r.returncode == 2
        and "refusing to serve" in r.stderr
        and "does not match its manifest" in " ".join(r.stderr.split())
    )


def test_streaming_sends_the_answer_token_by_token(server):
    """Raw SSE: the content arrives in several chunks (one per stable piece of text), the first
    carries the role, the last the finish reason, and they add up to the non-streamed answer."""
    body = chat_body(max_tokens=16) | {"temperature": 1.0, "seed": 7}
    status, whole = post(server, "/v1/chat/completions", body)
    assert status == 200 and whole["usage"]["completion_tokens"] >= 4
    req = urllib.request.Request(
        server + "/v1/chat/completions",
        data=json.dumps(body | {"stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert chunks[0]["delta"] == {"role": "assistant", "content": ""} and chunks[-1]["finish_reason"] in (
        "stop",
        "length",
    )
    pieces = [c["delta"]["content"] for c in chunks[1:-1]]
    assert "".join(pieces) == whole["choices"][0]["message"]["content"]
    words = len(whole["choices"][0]["message"]["content"].split())
    assert len(pieces) >= words >= 2, pieces  # at least one chunk per word: streamed as generated


MALFORMED = [
    b"{not json",
    b"[1, 2]",
    json.dumps({"model": "nmm"}).encode(),
    json.dumps(chat_body(model="gpt-4o")).encode(),
    json.dumps(chat_body(max_tokens=100_000)).encode(),
    json.dumps(chat_body(temperature="hot")).encode(),
    json.dumps(chat_body(url="data:image/png;base64,!!!")).encode(),
    json.dumps(chat_body(url="data:image/png;base64," + base64.b64encode(b"not a png").decode())).encode(),
    json.dumps(chat_body(url="https://example.com/cat.png")).encode(),
    json.dumps({"model": "nmm", "messages": [{"role": "wizard", "content": "hi"}]}).encode(),
]


def raw_post(base: str, data: bytes) -> int:
    req = urllib.request.Request(base + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def test_load_of_2000_requests_10_percent_malformed_at_concurrency_32(server):
    """Every valid request 200, every malformed one 4xx, no 5xx, and the server's memory bounded."""
    # Mostly greedy (they batch together), some sampled with their own seed, one in five streamed.
    valid = [
        json.dumps(
            chat_body(max_tokens=4, stream=i % 5 == 0) | ({"temperature": 0.7, "seed": i} if i % 10 == 7 else {})
        ).encode()
        for i in range(50)
    ]
    plan = [
        (True, MALFORMED[i % len(MALFORMED)]) if i % 10 == 3 else (False, valid[i % len(valid)]) for i in range(2000)
    ]
    for _, data in plan[:64]:  # warm up: allocator and caches settle before the baseline
        raw_post(server, data)
    before = rss_mib(SERVER_PID[0])
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            peak[0] = max(peak[0], rss_mib(SERVER_PID[0]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(lambda p: raw_post(server, p[1]), plan))
    stop.set()
    sampler.join()
    bad = [c for (malformed, _), c in zip(plan, codes) if malformed]
    good = [c for (malformed, _), c in zip(plan, codes) if not malformed]
    assert len(bad) == 200 and all(400 <= c < 500 for c in bad), sorted(set(bad))
    assert good.count(200) == 1800, sorted(set(good))
    assert not any(c >= 500 for c in codes)
    growth = peak[0] - before
    print(f"load: RSS {before:.0f} MiB before, peak {peak[0]:.0f} MiB")
    assert growth < 150, f"RSS grew {growth:.0f} MiB under load (from {before:.0f} MiB)"
    text = urllib.request.urlopen(server + "/metrics", timeout=10).read().decode()
    assert 'status="500"' not in text
