"""`nmm serve`: an OpenAI-compatible HTTP server for an nmm model (FastAPI + uvicorn).

    POST /v1/chat/completions    image (+ a caption ask or a question), or a recording → text;
                                 `stream: true` as server-sent events
    POST /v1/images/generations  prompt → `n` base64 PNGs (`guidance`: classifier-free guidance)
    POST /v1/audio/transcriptions  a recording (multipart upload) → its text
    POST /v1/audio/speech        text → a WAV (or FLAC) recording of the model's speech
    GET  /v1/models, /healthz, /readyz, /metrics (Prometheus)

A request is checked whole before it queues: its body bounded (nmm.serve.http), parsed, its image
decoded and its prompt laid out the way the model was trained and measured against the model's
context (nmm.serve.model_dir) — in a small worker pool, never on the event loop, so health probes
answer whatever a client sends. What the model cannot do is a 400 that says what it does.

Requests are batched dynamically on the model (nmm.serve.batcher); a full queue answers 429, and
one request's failure fails that request only. `stream: true` sends each token's text as it is
generated, from inside the batch it shares with other requests. Every response is counted with
the status its client got (nmm.serve.http.Counted).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from fastapi import FastAPI, Request  # at module level: FastAPI reads the routes' annotations by name
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from openai.types import Image, ImagesResponse, chat
from openai.types import Model as OpenAIModel
from openai.types.audio import Transcription
from openai.types.completion_usage import CompletionUsage

from nmm.data.audio import to_wav
from nmm.model.generate import draw, generate, speak
from nmm.serve import openai_api
from nmm.serve.batcher import BATCHING, Batcher, Draining, QueueFull
from nmm.serve.http import BODY_TIMEOUT_S, INTERNAL, BodyBudget, Counted, mark, read_body
from nmm.serve.model_dir import LoadedModel, Refused
from nmm.tokenizers.vocab import EOS

ROUTES = (
    "/v1/chat/completions",
    "/v1/images/generations",
    "/v1/audio/transcriptions",
    "/v1/audio/speech",
    "/v1/models",
)
PREPARE_WORKERS = 2  # parse, decode and tokenize off the event loop (Pillow's decoders release the GIL)
# Testing a rollout: NMM_SERVE_FAILPOINT=chat|draw|stream makes this server fail that kind of work
# (a stream after its first token), as a broken candidate would; the canary tests roll such servers out.
FAILPOINT = os.environ.get("NMM_SERVE_FAILPOINT", "")
IMAGE_BODY_BYTES = 64 << 10  # an image generation request is a prompt and a few numbers


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "nmm_requests_total",
            "HTTP requests by route and the status the client got",
            ["route", "status"],
            registry=r,
        )
        self.received = Counter(
            "nmm_requests_received_total", "HTTP requests by route, counted as they arrive", ["route"], registry=r
        )
        self.in_flight = Gauge("nmm_requests_in_flight", "Requests received and not yet answered", registry=r)
        self.latency = Histogram("nmm_request_seconds", "Request latency by route", ["route"], registry=r)
        self.first_token = Histogram("nmm_time_to_first_token_seconds", "Time until the first answer token", registry=r)
        self.tokens = Counter("nmm_generated_tokens_total", "Tokens generated", ["kind"], registry=r)
        self.queue = Gauge("nmm_queue_depth", "Requests waiting or running", registry=r)
        self.batch = Histogram(
            "nmm_batch_size", "Requests per model batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )


@dataclass(frozen=True)
class ChatJob:
    prompt: list[int]
    pixels: np.ndarray | None  # (H, W, C) in [0, 1], at the model's shape; None: a recording was read


@dataclass(frozen=True)
class DrawJob:
    prompt: list[int]
    n: int


@dataclass(frozen=True)
class SpeakJob:
    prompt: list[int]
    room: int  # the most codes its speech may have
    fmt: str  # soundfile's format of the answer


class Model:
    """The loaded model: what a request becomes before it queues (`chat_job`, `draw_job`: worker
    pool), and what each batch does with it (`run`: the batcher's thread)."""

    def __init__(self, loaded: LoadedModel, metrics: Metrics):
        self.loaded, self.metrics = loaded, metrics

    def chat_job(self, req: openai_api.Chat) -> ChatJob | SpeakJob:
        if req.speech_format is not None:
            return self.speak_job(req.question, req.speech_format)
        if req.audio is not None:
            return self.listen_job(req.audio, "input_audio")
        vq = self._needs(self.loaded.vq, "image_url", "images")
        side, _, channels = vq.image_shape
        pixels = openai_api.decode_image(req.image, req.image_format, channels, side)
        return ChatJob(
            self._laid_out(lambda: self.loaded.read_prompt(vq.encode(pixels[None])[0], req.question)),
            pixels,
        )

    def listen_job(self, recording: bytes, param: str = "file") -> ChatJob:
        """A recording → the prompt asking what it says (decoded off the event loop, refused with
        its reason when it is not usable audio)."""
        tok = self._needs(self.loaded.audio, param, "speech")
        samples = openai_api.decode_audio(recording, tok.rate, param)
        return ChatJob(self._laid_out(lambda: self.loaded.listen_prompt(tok.encode(samples))), None)

    def draw_job(self, req: openai_api.ImageBody) -> DrawJob:
        self._needs(self.loaded.vq, "prompt", "images")
        return DrawJob(self._laid_out(lambda: self.loaded.draw_prompt(req.prompt)), req.n)

    def speak_job(self, text: str, fmt: str) -> SpeakJob:
        """Text → the prompt asking the model to say it, and the recording's format (soundfile's)."""
        self._needs(self.loaded.audio, "model", "speech")
        prompt, room = self._laid_out(lambda: self.loaded.say_prompt(text))
        return SpeakJob(prompt, room, fmt)

    @staticmethod
    def _needs(tokenizer, param: str, what: str):
        """The model's tokenizer of a medium, or a 400: the model has no such modality."""
        if tokenizer is None:
            raise openai_api.APIError(400, f"{param}: this model has no {what} (its vocabulary holds none)", param)
        return tokenizer

    @staticmethod
    def _laid_out(prompt) -> list[int]:
        try:
            return prompt()
        except Refused as exc:
            raise openai_api.APIError(400, str(exc), exc.param) from None

    def chat(self, jobs) -> list[dict]:
        loaded, v = self.loaded, self.loaded.vocab
        key: ChatKey = jobs[0].key
        max_tokens, temperature, seed = key.max_tokens, key.temperature, key.seed
        if FAILPOINT == "chat":
            raise RuntimeError("NMM_SERVE_FAILPOINT=chat")
        prompts = [j.payload.prompt for j in jobs]
        patches = (
            torch.from_numpy(loaded.vq.patches(np.stack([j.payload.pixels for j in jobs])))
            if loaded.model.cfg.reads_pixels and key.reads == "image"
            else None
        )
        outs = generate(
            loaded.model,
            prompts,
            max_tokens,
            v.text_range(),
            stop=EOS,
            extra_allowed=(EOS,),
            temperature=temperature,
            generator=_generator(seed),
            patches=patches,
            on_step=_on_step(jobs, fail_streams=FAILPOINT == "stream"),
        )
        self.metrics.tokens.labels("text").inc(sum(len(o) for o in outs))
        return [
            {
                "text": self.text_of(o),
                "prompt_tokens": len(p),
                "completion_tokens": len(o),
                "finish_reason": "stop" if EOS in o else "length",
            }
            for o, p in zip(outs, prompts)
        ]

    def text_of(self, tokens: list[int]) -> str:
        return self.loaded.text.decode(self.loaded.vocab.text_local(t for t in tokens if t != EOS)).strip()

    def images(self, jobs) -> list[list[str] | Exception]:
        if FAILPOINT == "draw":
            raise RuntimeError("NMM_SERVE_FAILPOINT=draw")
        loaded = self.loaded
        key: DrawKey = jobs[0].key
        guidance, temperature, seed = key.guidance, key.temperature, key.seed
        per_job = [j for j in jobs for _ in range(j.payload.n)]
        drawn = draw(
            loaded.model,
            [j.payload.prompt for j in per_job],
            loaded.vq,
            loaded.vocab,
            plans=loaded.prompts.plans,
            temperature=temperature,
            generator=_generator(seed),
            guidance=guidance,
            on_step=_on_step(per_job),
        )
        self.metrics.tokens.labels("image").inc(drawn.codes.size)
        out, at = [], 0
        for j in jobs:
            out.append(_answer(lambda at=at, n=j.payload.n: [_png(p) for p in drawn.pixels[at : at + n]]))
            at += j.payload.n
        return out

    def speech(self, jobs) -> list[dict | Exception]:
        """Each job's speech: codes until the model writes <eoa> (or its room is spent), decoded by
        the audio tokenizer (Griffin-Lim) into a recording (`recording`: its bytes)."""
        loaded = self.loaded
        key: SpeakKey = jobs[0].key
        room = min(j.payload.room for j in jobs)
        codes = speak(
            loaded.model,
            [j.payload.prompt for j in jobs],
            loaded.vocab,
            max_codes=room,
            temperature=key.temperature,
            generator=_generator(key.seed),
        )
        self.metrics.tokens.labels("audio").inc(sum(len(c) for c in codes))
        tok = loaded.audio

        def spoken(c, j) -> dict:
            return {
                "recording": to_wav(tok.decode(c), tok.rate, j.payload.fmt),
                "prompt_tokens": len(j.payload.prompt),
                "completion_tokens": len(c),
                "finish_reason": "length" if len(c) >= room else "stop",
            }

        return [_answer(lambda c=c, j=j: spoken(c, j)) for c, j in zip(codes, jobs)]

    def run(self, jobs) -> list:
        key = jobs[0].key
        return (
            self.chat(jobs)
            if isinstance(key, ChatKey)
            else self.speech(jobs)
            if isinstance(key, SpeakKey)
            else self.images(jobs)
        )


@dataclass(frozen=True)
class ChatKey:
    """What chat requests must share to run in one batch (the batcher groups equal keys; a
    dataclass, so a chat key never equals a draw key of the same numbers)."""

    max_tokens: int
    temperature: float
    seed: int | None
    reads: str = "image"  # what the prompts read: "image" or "audio" (a model reading pixels batches one kind)


@dataclass(frozen=True)
class DrawKey:
    """What image requests must share to run in one batch."""

    guidance: float
    temperature: float
    seed: int | None


@dataclass(frozen=True)
class SpeakKey:
    """What speech requests must share to run in one batch."""

    temperature: float
    seed: int | None


def _answer(fn):
    """fn's result, or the exception in its place: one job's fault stays that job's."""
    try:
        return fn()
    except Exception as exc:
        return exc


def _on_step(jobs, fail_streams: bool = False):
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
                if fail_streams:
                    raise RuntimeError("NMM_SERVE_FAILPOINT=stream")

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
    """The answer as the `openai` package's own `ChatCompletion` (validated as its clients read it):
    text in `content`, or a spoken answer in `audio` (base64, with the model's own transcript)."""
    if "recording" in out:
        audio = chat.ChatCompletionAudio(
            id=f"audio_{uuid.uuid4().hex}",
            data=base64.b64encode(out["recording"]).decode(),
            expires_at=int(time.time()),  # nothing is kept for a later turn: the model answers one turn
            transcript=out["transcript"],
        )
        message = chat.chat_completion_message.ChatCompletionMessage(role="assistant", content=None, audio=audio)
    else:
        message = chat.chat_completion_message.ChatCompletionMessage(role="assistant", content=out["text"])
    usage = CompletionUsage(
        prompt_tokens=out["prompt_tokens"],
        completion_tokens=out["completion_tokens"],
        total_tokens=out["prompt_tokens"] + out["completion_tokens"],
    )
    return chat.ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        object="chat.completion",
        created=int(time.time()),
        model=name,
        choices=[chat.chat_completion.Choice(index=0, message=message, finish_reason=out["finish_reason"])],
        usage=usage,
    ).model_dump(exclude_unset=True)


def _chunk(base: dict, delta: dict, finish: str | None = None) -> str:
    """One server-sent event: a `ChatCompletionChunk` of the `openai` package."""
    choice = chat.chat_completion_chunk.Choice(
        index=0, delta=chat.chat_completion_chunk.ChoiceDelta(**delta), finish_reason=finish
    )
    return f"data: {chat.ChatCompletionChunk(**base, choices=[choice]).model_dump_json(exclude_unset=True)}\n\n"


async def _stream(name: str, model: Model, job, tokens: asyncio.Queue, scope: dict, done):
    """Server-sent events: the role, then each token's text as it comes, then the finish reason.
    Text is sent once it is stable (decoded from all tokens so far, whitespace held back until a
    word follows), so the chunks add up to exactly the non-streamed answer. A generation that
    fails after the stream began says so in the stream and is counted as the 500 it is. `done`
    runs however the stream ends (a client that hung up included)."""
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": name,
    }
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
                yield _chunk(base, {"content": text[len(sent) :]})
                sent = text
        try:
            out = fut.result()
        except Exception as exc:
            mark(scope, 500)
            error = {"message": f"generation failed: {type(exc).__name__}", "type": "server_error"}
            yield f"data: {json.dumps({'error': error})}\n\n"
            return
        if out["text"].startswith(sent) and len(out["text"]) > len(sent):
            yield _chunk(base, {"content": out["text"][len(sent) :]})
        yield _chunk(base, {}, out["finish_reason"])
        yield "data: [DONE]\n\n"
    finally:
        done()


def _error(exc: Exception) -> JSONResponse:
    """A refused request's answer: the APIError's, 429 for a full queue, 503 while draining (any
    other exception is the app's 500). A refusal before the body was read closes the connection."""
    if isinstance(exc, QueueFull):
        exc = openai_api.APIError(429, f"busy: {exc}", kind="rate_limit_error")
    elif isinstance(exc, Draining):
        exc = openai_api.APIError(503, "shutting down", kind="server_error")
    elif not isinstance(exc, openai_api.APIError):
        raise exc
    close = {"connection": "close"} if getattr(exc, "close_connection", False) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=close)


def create_app(
    loaded: LoadedModel,
    name: str,
    *,
    max_batch: int = BATCHING["max_batch"].default,
    max_wait_ms: float = BATCHING["max_wait_ms"].default,
    max_queue: int = BATCHING["max_queue"].default,
    body_timeout: float = BODY_TIMEOUT_S,
):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    metrics = Metrics()
    model = Model(loaded, metrics)
    batcher = Batcher(
        model.run, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, on_batch=metrics.batch.observe
    )
    pool = ThreadPoolExecutor(PREPARE_WORKERS, thread_name_prefix="nmm-prepare")
    budget = BodyBudget()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.drain()  # uvicorn stopped taking requests on SIGTERM; the accepted ones finish
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="nmm serve", openapi_url=None, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_exception_handler(Exception, lambda request, exc: JSONResponse(INTERNAL.body(), status_code=500))

    async def prepared(request: Request, limit: int, parse, prepare):
        """Body → checked request → the job's payload, the CPU work in the pool."""
        raw = await read_body(request, limit, budget, body_timeout)
        loop = asyncio.get_running_loop()
        req = await loop.run_in_executor(pool, parse, raw, name)
        return req, await loop.run_in_executor(pool, prepare, req)

    def first_token(t0: float, job) -> None:
        if job.first_token_at is not None:
            metrics.first_token.observe(job.first_token_at - t0)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.perf_counter()
        try:
            req, payload = await prepared(request, openai_api.MAX_BODY_BYTES, openai_api.parse_chat, model.chat_job)
            reads = "audio" if req.audio is not None else "image"
            key = ChatKey(req.max_tokens, req.temperature, req.seed if req.temperature > 0 else None, reads)
            if req.speech_format is not None:
                key = SpeakKey(req.temperature, req.seed)
            metrics.queue.set(batcher.depth + 1)
            if req.stream:
                loop, tokens = asyncio.get_running_loop(), asyncio.Queue()
                job = batcher.enqueue(
                    key, payload, stream=lambda tok: loop.call_soon_threadsafe(tokens.put_nowait, tok)
                )
            else:
                out, job = await batcher.submit(key, payload)
                if req.speech_format is not None:  # (a full queue here is this request's 429)
                    out["transcript"] = await heard(out["recording"])
        except Exception as exc:
            return _error(exc)
        if req.stream:
            return StreamingResponse(
                _stream(name, model, job, tokens, request.scope, lambda: first_token(t0, job)),
                media_type="text/event-stream",
            )
        first_token(t0, job)
        return _completion(name, out)

    async def heard(recording: bytes) -> str:
        """What the model hears in its own speech (the transcript of a spoken answer); "" when it
        does not transcribe, or its speech is not a usable recording (too short, silent)."""
        if not loaded.serves["transcribe"]:
            return ""
        try:
            payload = await asyncio.get_running_loop().run_in_executor(pool, model.listen_job, recording)
            out, _ = await batcher.submit(ChatKey(openai_api.CHAT_MAX_TOKENS, 0.0, None, "audio"), payload)
        except openai_api.APIError:
            return ""
        return out["text"]

    @app.post("/v1/images/generations")
    async def images(request: Request):
        t0 = time.perf_counter()
        try:
            req, payload = await prepared(request, IMAGE_BODY_BYTES, openai_api.parse_images, model.draw_job)
            pngs, job = await batcher.submit(DrawKey(req.guidance, req.temperature, req.seed), payload)
        except Exception as exc:
            return _error(exc)
        first_token(t0, job)
        return ImagesResponse(created=int(time.time()), data=[Image(b64_json=p) for p in pngs]).model_dump(
            exclude_unset=True
        )

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        t0 = time.perf_counter()
        try:
            raw = await read_body(request, openai_api.MAX_AUDIO_BYTES + (64 << 10), budget, body_timeout)
            req = await openai_api.parse_transcription(raw, request.headers.get("content-type"), name)
            payload = await asyncio.get_running_loop().run_in_executor(pool, model.listen_job, req.audio)
            key = ChatKey(openai_api.CHAT_MAX_TOKENS, req.temperature, None, "audio")
            metrics.queue.set(batcher.depth + 1)
            out, job = await batcher.submit(key, payload)
        except Exception as exc:
            return _error(exc)
        first_token(t0, job)
        if req.response_format == "text":
            return PlainTextResponse(out["text"])
        return Transcription(text=out["text"]).model_dump(exclude_unset=True)

    @app.post("/v1/audio/speech")
    async def speech(request: Request):
        t0 = time.perf_counter()
        try:
            req, payload = await prepared(
                request,
                openai_api.SPEECH_BODY_BYTES,
                openai_api.parse_speech,
                lambda r: model.speak_job(r.input, openai_api.SPEECH_FORMATS[r.response_format]),
            )
            metrics.queue.set(batcher.depth + 1)
            out, job = await batcher.submit(SpeakKey(req.temperature, req.seed), payload)
        except Exception as exc:
            return _error(exc)
        first_token(t0, job)
        return Response(out["recording"], media_type=f"audio/{req.response_format}")

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [OpenAIModel(id=name, object="model", created=0, owned_by="nmm").model_dump()],
        }

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

    return Counted(app, metrics, ROUTES)
