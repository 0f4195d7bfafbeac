"""OpenAI-compatible requests, checked: what `nmm serve` accepts and the 4xx it answers otherwise.

`POST /v1/chat/completions`: the last user message's parts (`text`, and exactly one `image_url`
holding `data:image/<png|jpeg|webp|gif>;base64,…`; http(s) URLs are refused: the server fetches
nothing). System and developer messages are accepted and not read; earlier turns are refused (the
model answers one turn). `POST /v1/images/generations`: a prompt drawn `n` times, returned as
base64 PNGs. Every fault is an `APIError` with OpenAI's error body.

Everything a request may cost is bounded before it is spent: the body (on `Content-Length`, and
while reading a chunked one), the number of messages and parts (checked before any part is
validated), every text, the image's bytes, its format (the one the data URL declares, nothing
else is decoded) and its pixels (from the header, before decoding).
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

from nmm.data import userdata
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


class Part(_Open):
    type: Literal["text", "image_url"]
    text: Annotated[str | None, _at_most(MAX_TEXT_CHARS)] = None
    image_url: ImageURL | None = None


class Message(_Open):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    # A string or a list of parts: only the branch the value's type picks is validated (its errors alone reported).
    content: Annotated[
        Annotated[str, Tag("str")] | Annotated[list[Part], Tag("parts")] | Annotated[None, Tag("none")],
        Discriminator(lambda v: "none" if v is None else "str" if isinstance(v, str) else "parts"),
        _at_most(MAX_PARTS, MAX_TEXT_CHARS),
    ] = None


class ChatBody(_Open):
    model: Annotated[str, Field(max_length=256)]
    messages: Annotated[list[dict], _at_most(MAX_MESSAGES), Field(min_length=1)]
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)


class ImageBody(_Open):
    model: str | None = Field(default=None, max_length=256)
    prompt: Annotated[str, _at_most(MAX_TEXT_CHARS), Field(min_length=1)]
    n: int = Field(default=1, ge=1, le=8)
    response_format: Literal["b64_json"] = "b64_json"
    guidance: float = Field(default=DRAW_GUIDANCE, ge=0.0, le=20.0)
    temperature: float = Field(default=DRAW_TEMPERATURE, ge=0.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)


@dataclass(frozen=True)
class Chat:
    image: bytes  # the image's bytes, not yet decoded
    image_format: str  # Pillow's name of the format the data URL declares
    question: str | None  # the user's text, None without
    max_tokens: int
    temperature: float  # 0 (greedy) below the sampling floor
    seed: int | None
    stream: bool


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
    if len(m[2]) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise APIError(413, f"image_url: the image is over {MAX_IMAGE_BYTES} bytes", "image_url")
    try:
        return base64.b64decode(m[2], validate=True), FORMATS[m[1]]
    except (binascii.Error, ValueError):
        raise APIError(400, "image_url: the data is not valid base64", "image_url") from None


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
    texts = [p.text for p in parts or [] if p.type == "text" and p.text]
    if len(images) != 1:
        raise APIError(
            400, f"messages: the last user message needs exactly one image_url part, got {len(images)}", "messages"
        )
    image, fmt = image_url_bytes(images[0])
    question = " ".join(texts).strip() or None
    max_tokens = req.max_completion_tokens or req.max_tokens or CHAT_MAX_TOKENS
    return Chat(image, fmt, question, max_tokens, greedy_below_floor(req.temperature), req.seed, req.stream)


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
