"""`nmm serve`: an OpenAI-compatible HTTP server for an nmm model (FastAPI + uvicorn).

    POST /v1/chat/completions    image (+ question) → text; `stream: true` as server-sent events
    POST /v1/images/generations  prompt → `n` base64 PNGs (`guidance`: classifier-free guidance)
    GET  /v1/models, /healthz, /readyz, /metrics (Prometheus)

Requests are batched dynamically on the model (nmm.serve.batcher); a full queue answers 429.
`stream: true` sends each token's text as it is generated (server-sent events), from inside the
batch it shares with other requests. Time to first token is measured for every request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
import uuid

import numpy as np
import torch
from fastapi import FastAPI, Request  # at module level: FastAPI reads the routes' annotations by name
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from nmm.model.generate import draw_images, generate
from nmm.serve import openai_api
from nmm.serve.batcher import Batcher, Draining, QueueFull
from nmm.serve.model_dir import LoadedModel
from nmm.tokenizers.vocab import EOS

ROUTES = ("/v1/chat/completions", "/v1/images/generations", "/v1/models")


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("nmm_requests_total", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("nmm_request_seconds", "Request latency by route", ["route"], registry=r)
        self.first_token = Histogram("nmm_time_to_first_token_seconds", "Time until the first answer token", registry=r)
        self.tokens = Counter("nmm_generated_tokens_total", "Tokens generated", ["kind"], registry=r)
        self.queue = Gauge("nmm_queue_depth", "Requests waiting or running", registry=r)
        self.batch = Histogram("nmm_batch_size", "Requests per model batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)


class Model:
    """The loaded model and what each batch of work does with it (runs on the batcher's thread)."""

    def __init__(self, m: LoadedModel, metrics: Metrics):
        self.m, self.metrics = m, metrics
        self.side, _, self.channels = m.vq.image_shape

    def chat(self, jobs) -> list[dict]:
        m, v = self.m, self.m.vocab
        _, max_tokens, temperature, seed = jobs[0].key
        codes = m.vq.encode(np.stack([j.payload.image for j in jobs]))
        prompts = [m.prompts.question(c, m.text.encode(j.payload.question)) if j.payload.question else m.prompts.caption(c)
                   for c, j in zip(codes, jobs)]
        patches = torch.from_numpy(m.vq.patches(np.stack([j.payload.image for j in jobs]))) if m.model.cfg.reads_pixels else None
        g = _generator(seed)
        outs = generate(m.model, prompts, max_tokens, v.text_range(), stop=EOS, extra_allowed=(EOS,),
                        temperature=temperature, generator=g, patches=patches, on_step=_on_step(jobs))
        self.metrics.tokens.labels("text").inc(sum(len(o) for o in outs))
        return [{"text": m.text.decode(v.text_local(t for t in o if t != EOS)).strip(), "prompt_tokens": len(p),
                 "completion_tokens": len(o), "finish_reason": "stop" if EOS in o else "length"}
                for o, p in zip(outs, prompts)]

    def text_of(self, tokens: list[int]) -> str:
        return self.m.text.decode(self.m.vocab.text_local(t for t in tokens if t != EOS)).strip()

    def images(self, jobs) -> list[list[str]]:
        from nmm.data.sequences import blank_text

        m, v = self.m, self.m.vocab
        _, guidance, temperature, seed = jobs[0].key
        asked = [m.prompts.draw(m.text.encode(j.payload.prompt)) for j in jobs for _ in range(j.payload.n)]
        g = _generator(seed)
        per_job = [j for j in jobs for _ in range(j.payload.n)]
        _, outs = draw_images(m.model, asked, m.vq.tokens_per_image, v.image_range(),
                              plan_range=v.text_range() if m.prompts.plans else None,
                              blank=lambda p: blank_text(p, v.text_range()), temperature=temperature, generator=g,
                              guidance=guidance, on_step=_on_step(per_job))
        self.metrics.tokens.labels("image").inc(sum(len(o) for o in outs))
        pixels = m.vq.decode(np.array([[t - v.image_offset for t in o] for o in outs], dtype=np.int64))
        pngs = [_png(p) for p in pixels]
        out, at = [], 0
        for j in jobs:
            out.append(pngs[at : at + j.payload.n])
            at += j.payload.n
        return out

    def run(self, jobs) -> list:
        return self.chat(jobs) if jobs[0].key[0] == "chat" else self.images(jobs)


def _on_step(jobs):
    """Per decoding step: stamp each job's first token, hand streamed jobs their new token."""
    def on_step(indices: list[int], tokens: list[int | None]) -> None:
        now = time.perf_counter()
        for i, tok in zip(indices, tokens):
            if tok is None:
                continue
            job = jobs[i]
            if job.first_token_at is None:
                job.first_token_at = now
            if job.stream is not None and tok != EOS:
                job.stream(tok)
    return on_step


def _generator(seed: int | None) -> torch.Generator:
    """The request's seed, or a fresh random one."""
    return torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little"))


def _png(pixels: np.ndarray) -> str:
    from PIL import Image

    px = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)
    img = Image.fromarray(px[..., 0], "L") if px.shape[-1] == 1 else Image.fromarray(px, "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _completion(name: str, out: dict) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]}, "finish_reason": out["finish_reason"]}],
        "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                  "total_tokens": out["prompt_tokens"] + out["completion_tokens"]},
    }


def _chunk(base: dict, delta: dict, finish: str | None = None) -> str:
    return f"data: {json.dumps(base | {'choices': [{'index': 0, 'delta': delta, 'finish_reason': finish}]})}\n\n"


async def _stream(name: str, model: Model, job, tokens: asyncio.Queue, done):
    """Server-sent events: the role, then each token's text as it comes, then the finish reason.
    Text is sent once it is stable (decoded from all tokens so far, whitespace held back until a
    word follows), so the chunks add up to exactly the non-streamed answer. `done` runs however
    the stream ends (a client that hung up included)."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()), "model": name}
    fut = asyncio.wrap_future(job.future)
    try:
        yield _chunk(base, {"role": "assistant", "content": ""})
        got: list[int] = []
        sent = ""
        while True:
            nxt = asyncio.ensure_future(tokens.get())
            finished, _ = await asyncio.wait({nxt, fut}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in finished:
                nxt.cancel()
                break
            got.append(nxt.result())
            text = model.text_of(got)
            if text.startswith(sent) and len(text) > len(sent):
                yield _chunk(base, {"content": text[len(sent):]})
                sent = text
        try:
            out = fut.result()
        except Exception as exc:  # the batch failed after the stream began: say so in the stream
            yield f"data: {json.dumps({'error': {'message': f'generation failed: {type(exc).__name__}', 'type': 'server_error'}})}\n\n"
            return
        if out["text"].startswith(sent) and len(out["text"]) > len(sent):
            yield _chunk(base, {"content": out["text"][len(sent):]})
        yield _chunk(base, {}, out["finish_reason"])
        yield "data: [DONE]\n\n"
    finally:
        done()


def create_app(loaded: LoadedModel, name: str, *, max_batch: int = 16, max_wait_ms: float = 5.0, max_queue: int = 256):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    metrics = Metrics()
    model = Model(loaded, metrics)
    batcher = Batcher(model.run, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                      on_batch=metrics.batch.observe)
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.drain()  # uvicorn stopped taking requests on SIGTERM; the accepted ones finish

    app = FastAPI(title="nmm serve", openapi_url=None, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.batcher = batcher

    def error(route: str, exc: Exception) -> JSONResponse:
        if isinstance(exc, openai_api.APIError):
            status, body = exc.status, exc.body()
        elif isinstance(exc, QueueFull):
            status, body = 429, openai_api.APIError(429, f"busy: {exc}", kind="rate_limit_error").body()
        elif isinstance(exc, Draining):
            status, body = 503, openai_api.APIError(503, "shutting down", kind="server_error").body()
        else:
            raise exc
        metrics.requests.labels(route, str(status)).inc()
        return JSONResponse(body, status_code=status)

    async def body_of(request: Request):
        raw = await request.body()
        if len(raw) > 12 << 20:
            raise openai_api.APIError(413, "the request body is over 12 MiB")
        try:
            return json.loads(raw)
        except ValueError:
            raise openai_api.APIError(400, "the request body is not JSON") from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        route, t0 = "/v1/chat/completions", time.perf_counter()
        try:
            req = openai_api.parse_chat(await body_of(request), name, model.channels, model.side)
            key = ("chat", req.max_tokens, req.temperature, req.seed if req.temperature > 0 else None)
            metrics.queue.set(batcher.depth + 1)
            if req.stream:
                loop, tokens = asyncio.get_running_loop(), asyncio.Queue()
                job = batcher.enqueue(key, req, stream=lambda tok: loop.call_soon_threadsafe(tokens.put_nowait, tok))
            else:
                out, job = await batcher.submit(key, req)
        except Exception as exc:
            return error(route, exc)
        if req.stream:
            def done() -> None:
                finished(route, t0, job)
            return StreamingResponse(_stream(name, model, job, tokens, done), media_type="text/event-stream")
        finished(route, t0, job)
        return _completion(name, out)

    def finished(route: str, t0: float, job) -> None:
        if job.first_token_at is not None:
            metrics.first_token.observe(job.first_token_at - t0)
        metrics.latency.labels(route).observe(time.perf_counter() - t0)
        metrics.requests.labels(route, "200").inc()

    @app.post("/v1/images/generations")
    async def images(request: Request):
        route, t0 = "/v1/images/generations", time.perf_counter()
        try:
            req = openai_api.parse_images(await body_of(request))
            if req.model not in (None, name):
                raise openai_api.APIError(404, f"model {req.model!r} is not served here", "model", "not_found_error")
            key = ("image", req.guidance, req.temperature, req.seed)
            pngs, job = await batcher.submit(key, req)
        except Exception as exc:
            return error(route, exc)
        finished(route, t0, job)
        return {"created": int(time.time()), "data": [{"b64_json": p} for p in pngs]}

    @app.get("/v1/models")
    async def models():
        metrics.requests.labels("/v1/models", "200").inc()
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "nmm"}]}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        return {"status": "ready"}

    @app.get("/metrics")
    async def prometheus():
        metrics.queue.set(batcher.depth)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
