"""OpenAI-compatible requests, checked: what `nmm serve` accepts and the 4xx it answers otherwise.

`POST /v1/chat/completions`: the last user message's parts (`text`, and exactly one medium: an
`image_url` holding `data:image/<png|jpeg|webp|gif>;base64,…` — http(s) URLs are refused: the
server fetches nothing — or an `input_audio` holding base64 WAV, FLAC, OGG or MP3). System and
developer messages are accepted and not read; earlier turns are refused (the model answers one
turn). `POST /v1/images/generations`: a prompt drawn `n` times, returned as base64 PNGs.
`POST /v1/audio/transcriptions`: a recording uploaded as multipart form data (`file`, `model`),
answered with its text. `POST /v1/audio/speech`: text (`input`) → a WAV or FLAC recording. Every
fault is an `APIError` with OpenAI's error body.

Everything a request may cost is bounded before it is spent: the body (on `Content-Length`, and
while reading a chunked one), the number of messages and parts (checked before any part is
validated), every text, the image's bytes, its format (the one the data URL declares, nothing
else is decoded) and its pixels (from the header, before decoding), a recording's bytes and the
duration its header claims (nmm.data.audio.decode: before any sample is read), a form's fields
and files (counted as they are parsed).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError

from nmm.data import audio, userdata
from nmm.model.generate import sampled

MAX_BODY_BYTES = 8 << 20  # a chat body: a 4 MiB image as base64 (5.4 MiB) and the rest
MAX_IMAGE_BYTES = 4 << 20  # a data URL's decoded image
MAX_IMAGE_PIXELS = 2048 * 2048  # nmm's models read ≤ 64×64: a bigger picture costs decode work and buys nothing
MAX_TEXT_CHARS = 4000
MAX_MESSAGES = 64
MAX_PARTS = 8
MAX_TOKENS = 256
CHAT_MAX_TOKENS = 32  # an answer's tokens when the request does not say (the pyfunc's too)
DRAW_TEMPERATURE, DRAW_GUIDANCE = 0.7, 1.0  # a drawing's sampling when the request does not say
FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP", "gif": "GIF"}  # data URL type → Pillow's
DATA_URL = re.compile(r"^data:image/([a-z]+);base64,(.*)$", re.S)
MAX_AUDIO_BYTES = 4 << 20  # an uploaded recording (a transcription's body may hold it and a few fields)
MAX_AUDIO_SECONDS = 10.0  # refused from the header beyond this: nmm's models hear short utterances
MAX_FORM_FIELDS = 16
SPEECH_FORMATS = {"wav": "WAV", "flac": "FLAC"}  # response_format → soundfile's format
SPEECH_BODY_BYTES = 64 << 10


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def _at_most(items: int, chars: int | None = None):
    """Refuse a list over `items` items (a string over `chars` characters) before anything in it
    is validated: pydantic checks `max_length` only after validating every item (690k empty
    content parts took seconds)."""

    def check(v):
        if isinstance(v, list) and len(v) > items:
            raise ValueError(f"at most {items} items, got {len(v)}")
        if isinstance(v, str) and len(v) > (chars if chars is not None else items):
            raise ValueError(f"at most {chars if chars is not None else items} characters, got {len(v)}")
        return v

    return BeforeValidator(check)


class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields nmm does not use


class ImageURL(_Open):
    url: Annotated[str, _at_most(MAX_BODY_BYTES)]


class InputAudio(_Open):
    data: Annotated[str, _at_most(MAX_BODY_BYTES)]
    format: Literal["wav", "mp3", "flac", "ogg"] = "wav"


class Part(_Open):
    type: Literal["text", "image_url", "input_audio"]
    text: Annotated[str | None, _at_most(MAX_TEXT_CHARS)] = None
    image_url: ImageURL | None = None
    input_audio: InputAudio | None = None


class Message(_Open):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    # A string or a list of parts: only the branch the value's type picks is validated (its errors alone reported).
    content: Annotated[
        Annotated[str, Tag("str")] | Annotated[list[Part], Tag("parts")] | Annotated[None, Tag("none")],
        Discriminator(lambda v: "none" if v is None else "str" if isinstance(v, str) else "parts"),
        _at_most(MAX_PARTS, MAX_TEXT_CHARS),
    ] = None


class SpokenAnswer(_Open):
    """`audio` of a chat request asking for a spoken answer (`modalities: ["text", "audio"]`)."""

    format: Literal["wav", "flac"] = "wav"
    voice: Annotated[str, Field(max_length=64)] | dict | None = None  # accepted, not read: the model has one voice


class ChatBody(_Open):
    model: Annotated[str, Field(max_length=256)]
    messages: Annotated[list[dict], _at_most(MAX_MESSAGES), Field(min_length=1)]
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    modalities: list[Literal["text", "audio"]] | None = Field(default=None, max_length=2)
    audio: SpokenAnswer | None = None


class ImageBody(_Open):
    model: str | None = Field(default=None, max_length=256)
    prompt: Annotated[str, _at_most(MAX_TEXT_CHARS), Field(min_length=1)]
    n: int = Field(default=1, ge=1, le=8)
    response_format: Literal["b64_json"] = "b64_json"
    guidance: float = Field(default=DRAW_GUIDANCE, ge=0.0, le=20.0)
    temperature: float = Field(default=DRAW_TEMPERATURE, ge=0.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)


class SpeechBody(_Open):
    model: Annotated[str, Field(max_length=256)]
    input: Annotated[str, _at_most(MAX_TEXT_CHARS), Field(min_length=1)]
    voice: Annotated[str, Field(max_length=64)] | dict  # nmm's models have one voice: any is accepted
    response_format: Literal["wav", "flac"] = "wav"
    speed: float = Field(default=1.0, ge=1.0, le=1.0)  # spoken as the model speaks
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)


@dataclass(frozen=True)
class Chat:
    image: bytes | None  # the image's bytes, not yet decoded (None: the medium is a recording)
    image_format: str  # Pillow's name of the format the data URL declares
    question: str | None  # the user's text, None without
    max_tokens: int
    temperature: float  # 0 (greedy) below the sampling floor
    seed: int | None
    stream: bool
    audio: bytes | None = None  # an input_audio part's recording, not yet decoded
    speech_format: str | None = None  # a spoken answer's soundfile format (`modalities` has "audio"); None: text


@dataclass(frozen=True)
class Transcription:
    audio: bytes
    response_format: str
    temperature: float


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        raise APIError(400, "the request body is not JSON (or nests too deep)") from None


def _msg(err: dict) -> str:
    return err["msg"].removeprefix("Value error, ")


def _validated(cls, body: Any):
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        raise APIError(400, f"{where}: {_msg(err)}", where or None) from None


def _message(i: int, raw: dict) -> Message:
    try:
        return Message.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(["messages", str(i)] + [str(p) for p in err["loc"] if p not in ("str", "parts", "none")])
        raise APIError(400, f"{where}: {_msg(err)}", where) from None


def image_url_bytes(url: str) -> tuple[bytes, str]:
    """(bytes, Pillow format) of a data URL, checked for size and declared format."""
    if url.startswith(("http://", "https://")):
        raise APIError(400, "image_url: http(s) URLs are not fetched; send the image as a data: URL", "image_url")
    m = DATA_URL.match(url)
    if not m:
        raise APIError(400, "image_url: expected data:image/<png|jpeg|webp|gif>;base64,<data>", "image_url")
    if m[1] not in FORMATS:
        raise APIError(400, f"image_url: image/{m[1][:16]} is not accepted (png, jpeg, webp, gif)", "image_url")
    return _base64(m[2], "image_url", MAX_IMAGE_BYTES, "the image"), FORMATS[m[1]]


def parse_chat(raw: bytes, served: str) -> Chat:
    """The request's checked fields; the image is decoded later (`decode_image`), off the event loop."""
    req = _validated(ChatBody, _json(raw))
    if req.model != served:
        raise APIError(
            404, f"model {req.model!r} is not served here (this server serves {served!r})", "model", "not_found_error"
        )
    messages = [_message(i, m) for i, m in enumerate(req.messages)]
    turns = [m for m in messages if m.role not in ("system", "developer")]
    if not turns or turns[-1].role != "user":
        raise APIError(400, "messages: the last message must be the user's", "messages")
    if len(turns) > 1:
        raise APIError(
            400, "messages: this model answers one user turn about one image; send the last turn alone", "messages"
        )
    parts = turns[-1].content
    if isinstance(parts, str):
        parts = [Part(type="text", text=parts)]
    images = [p.image_url.url for p in parts or [] if p.type == "image_url" and p.image_url is not None]
    recordings = [p.input_audio.data for p in parts or [] if p.type == "input_audio" and p.input_audio is not None]
    texts = [p.text for p in parts or [] if p.type == "text" and p.text]
    if req.modalities and "audio" in req.modalities:
        return _spoken(req, images + recordings, " ".join(texts).strip())
    if len(images) + len(recordings) != 1:
        raise APIError(
            400,
            "messages: the last user message needs exactly one image_url or input_audio part, "
            f"got {len(images)} images and {len(recordings)} recordings",
            "messages",
        )
    question = " ".join(texts).strip() or None
    max_tokens = req.max_completion_tokens or req.max_tokens or CHAT_MAX_TOKENS
    temperature = greedy_below_floor(req.temperature)
    if recordings:
        if question is not None:
            raise APIError(
                400, "messages: a recording is transcribed; send the input_audio part without text", "messages"
            )
        recording = _base64(recordings[0], "input_audio", MAX_AUDIO_BYTES)
        return Chat(None, "", None, max_tokens, temperature, req.seed, req.stream, audio=recording)
    image, fmt = image_url_bytes(images[0])
    return Chat(image, fmt, question, max_tokens, temperature, req.seed, req.stream)


def _spoken(req: ChatBody, media: list, text: str) -> Chat:
    """A chat asking for a spoken answer: the model says the user's text (what it was trained to
    do when asked to speak); images and recordings are refused, and so is streaming."""
    if req.stream:
        raise APIError(400, "stream: a spoken answer is sent whole; leave stream out", "stream")
    if media or not text:
        raise APIError(400, "messages: a spoken answer says the user's text: send one text part alone", "messages")
    fmt = SPEECH_FORMATS[req.audio.format if req.audio else "wav"]
    max_tokens = req.max_completion_tokens or req.max_tokens or CHAT_MAX_TOKENS
    temperature = greedy_below_floor(req.temperature)
    return Chat(None, "", text, max_tokens, temperature, req.seed, False, speech_format=fmt)


def _base64(data: str, param: str, limit: int, what: str = "the data") -> bytes:
    """The decoded bytes of `param`'s base64: a 413 when they would be over `limit` (judged from
    the text's length, before decoding), a 400 when it is not base64."""
    if len(data) > limit * 4 // 3 + 4:
        raise APIError(413, f"{param}: {what} is over {limit} bytes", param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: the data is not valid base64", param) from None


async def parse_transcription(raw: bytes, content_type: str | None, served: str) -> Transcription:
    """A transcription request's form (what `client.audio.transcriptions.create` sends): `file`
    (the recording), `model`, and optionally `response_format` (json or text), `temperature`,
    `language` and `prompt` (accepted, not read). Parsed from the already bounded body; the form's
    fields and files are counted as they are read."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    if not (content_type or "").lower().startswith("multipart/form-data"):
        raise APIError(400, "expected multipart/form-data with the recording as `file`", "file")

    async def body():
        yield raw
        yield b""

    try:
        form = await MultiPartParser(
            Headers({"content-type": content_type}),
            body(),
            max_files=1,
            max_fields=MAX_FORM_FIELDS,
            max_part_size=MAX_TEXT_CHARS,
        ).parse()
    except (MultiPartException, ValueError) as exc:
        raise APIError(400, f"the form is not valid multipart data: {str(exc)[:200]}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "file: the form needs the recording as a file field named `file`", "file")
        data = await upload.read()
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    finally:
        await form.close()
    if not fields.get("model"):
        raise APIError(400, "model: the form needs the model's name", "model")
    if fields["model"] != served:
        model = fields["model"]
        raise APIError(
            404, f"model {model!r} is not served here (this server serves {served!r})", "model", "not_found_error"
        )
    fmt = fields.get("response_format", "json")
    if fmt not in ("json", "text"):
        raise APIError(400, f"response_format: {fmt[:20]!r} is not one of json, text", "response_format")
    try:
        temperature = float(fields.get("temperature", 0.0))
    except ValueError:
        raise APIError(400, "temperature: expected a number", "temperature") from None
    if not 0.0 <= temperature <= 2.0:
        raise APIError(400, "temperature: expected 0 to 2", "temperature")
    return Transcription(data, fmt, greedy_below_floor(temperature))


def parse_speech(raw: bytes, served: str) -> SpeechBody:
    req = _validated(SpeechBody, _json(raw))
    if req.model != served:
        raise APIError(404, f"model {req.model!r} is not served here", "model", "not_found_error")
    return req.model_copy(update={"temperature": greedy_below_floor(req.temperature)})


def decode_audio(data: bytes, rate: int, param: str = "file") -> np.ndarray:
    """The recording as mono samples at the model's `rate`, or a 400 naming why it is not usable
    (nmm.data.audio's reasons: decode_error, too_long, too_short, silence, clipping)."""
    limits = audio.AudioLimits(
        rate=rate, max_seconds=MAX_AUDIO_SECONDS, max_bytes=MAX_AUDIO_BYTES, silence_rms=0.0, clipping_share=1.0
    )
    try:
        return audio.decode(data, limits).samples
    except audio.AudioRejected as exc:
        raise APIError(400, f"{param}: not usable audio ({exc})", param) from None


def parse_images(raw: bytes, served: str) -> ImageBody:
    req = _validated(ImageBody, _json(raw))
    if req.model not in (None, served):
        raise APIError(404, f"model {req.model!r} is not served here", "model", "not_found_error")
    return req.model_copy(update={"temperature": greedy_below_floor(req.temperature)})


def greedy_below_floor(temperature: float) -> float:
    """A temperature too small to sample with (nmm.model.generate.MIN_TEMPERATURE) is greedy: 0."""
    return temperature if sampled(temperature) else 0.0


def decode_image(data: bytes, fmt: str, channels: int, side: int) -> np.ndarray:
    """The image at the model's shape, or a 400 naming why it is not usable (CPU work: run it off
    the event loop). Only the declared format is decoded; the pixel count is checked from the
    header before any decoding."""
    limits = userdata.Limits(min_side=1, max_aspect=100.0, max_pixels=MAX_IMAGE_PIXELS)
    pixels = userdata.decode_image(data, channels, side, limits, formats=(fmt,))
    if isinstance(pixels, tuple):
        raise APIError(400, f"image_url: not a usable image ({pixels[1]})", "image_url")
    return pixels
