"""OpenAI-compatible requests, checked: what `nmm serve` accepts and the 4xx it answers otherwise.

`POST /v1/chat/completions`: the last user message's parts (`text`, and at most one `image_url`
holding `data:image/…;base64,…`; http(s) URLs are refused: the server fetches nothing). An image
asks for a caption, an image and text for an answer (VQA). `POST /v1/images/generations`: a prompt
drawn `n` times, returned as base64 PNGs. Every fault is an `APIError` with OpenAI's error body.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nmm.data import userdata

MAX_IMAGE_BYTES = 4 << 20  # a data URL's decoded image
MAX_TEXT_CHARS = 4000
MAX_TOKENS = 256
DATA_URL = re.compile(r"^data:image/(png|jpeg|jpg|webp|gif|bmp);base64,(.*)$", re.S)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields nmm does not use


class ImageURL(_Open):
    url: str = Field(max_length=8 << 20)


class Part(_Open):
    type: Literal["text", "image_url"]
    text: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    image_url: ImageURL | None = None


class Message(_Open):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[Part] | None = None


class ChatBody(_Open):
    model: str = Field(max_length=256)
    messages: list[Message] = Field(min_length=1, max_length=64)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)


class ImageBody(_Open):
    model: str | None = Field(default=None, max_length=256)
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    n: int = Field(default=1, ge=1, le=8)
    response_format: Literal["b64_json"] = "b64_json"
    guidance: float = Field(default=1.0, ge=0.0, le=20.0)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)


@dataclass(frozen=True)
class Chat:
    image: np.ndarray  # (H, W, C) float32 in [0, 1], at the model's shape
    question: str | None
    max_tokens: int
    temperature: float
    seed: int | None
    stream: bool


def _validated(cls, body: Any):
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        raise APIError(400, f"{where}: {err['msg']}", where) from None


def _image(url: str, channels: int, side: int) -> np.ndarray:
    if url.startswith(("http://", "https://")):
        raise APIError(400, "image_url: http(s) URLs are not fetched; send the image as a data: URL", "image_url")
    m = DATA_URL.match(url)
    if not m:
        raise APIError(400, "image_url: expected data:image/<png|jpeg|webp|…>;base64,<data>", "image_url")
    if len(m[2]) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise APIError(413, f"image_url: the image is over {MAX_IMAGE_BYTES} bytes", "image_url")
    try:
        data = base64.b64decode(m[2], validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "image_url: the data is not valid base64", "image_url") from None
    pixels = userdata.decode_image(data, channels, side, userdata.Limits(min_side=1, max_aspect=100.0))
    if isinstance(pixels, tuple):
        raise APIError(400, f"image_url: not a usable image ({pixels[1]})", "image_url")
    return pixels


def parse_chat(body: Any, served: str, channels: int, side: int) -> Chat:
    req = _validated(ChatBody, body)
    if req.model != served:
        raise APIError(404, f"model {req.model!r} is not served here (this server serves {served!r})", "model",
                       "not_found_error")
    user = [m for m in req.messages if m.role == "user"]
    if not user:
        raise APIError(400, "messages: needs a user message", "messages")
    parts = user[-1].content
    parts = [Part(type="text", text=parts)] if isinstance(parts, str) else (parts or [])
    images = [p.image_url.url for p in parts if p.type == "image_url" and p.image_url is not None]
    texts = [p.text for p in parts if p.type == "text" and p.text]
    if len(images) != 1:
        raise APIError(400, f"messages: the last user message needs exactly one image_url part, got {len(images)}",
                       "messages")
    question = " ".join(texts).strip() or None
    return Chat(_image(images[0], channels, side), question, req.max_completion_tokens or req.max_tokens or 32,
                req.temperature, req.seed, req.stream)


def parse_images(body: Any) -> ImageBody:
    return _validated(ImageBody, body)
