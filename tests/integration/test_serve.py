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
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from tests.conftest import NMM, free_port, wait_http
from tests.serving_fixture import png_url, publish_small_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    publish_small_model(folder.as_uri())
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NMM_S3", "MLFLOW"))}
    log = open(folder / "serve.log", "wb")
    proc = subprocess.Popen([NMM, "serve", folder.as_uri(), "--port", str(port), "--max-wait-ms", "20"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 60, proc)
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
    content = [{"type": "text", "text": "what digit is this?"}, {"type": "image_url", "image_url": {"url": url or png_url()}}]
    return {"model": "nmm", "messages": [{"role": "user", "content": content}], "max_tokens": 8} | kw


def test_the_openai_client_chats_with_an_image_streams_and_draws(server):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["nmm"]
    content = [{"type": "image_url", "image_url": {"url": png_url()}}]
    r = client.chat.completions.create(model="nmm", messages=[{"role": "user", "content": content}], max_tokens=6, seed=1)
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 16  # the image's 16 codes are in the prompt
    chunks = list(client.chat.completions.create(model="nmm", messages=[{"role": "user", "content": content}],
                                                 max_tokens=6, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content  # greedy: same text
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


@pytest.mark.parametrize("body, status, param", [
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
], ids=["not-json", "not-an-object", "no-messages", "unknown-model", "too-many-tokens", "wrong-type", "http-url",
        "bad-base64", "not-an-image", "image-too-big", "no-image", "bad-role"])
def test_malformed_chat_requests_get_a_4xx_with_an_openai_error_and_the_server_keeps_serving(server, body, status, param):
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
    assert r.returncode == 2 and "refusing to serve" in r.stderr and "does not match its manifest" in " ".join(r.stderr.split())
