"""Users' image–text samples, one at a time: WebDataset shards grouped into samples, and each
sample decoded and validated into an image of the model's shape and a caption, or a ledger
reason. Bad data never raises here: a truncated or corrupt image, a zero-byte file, an image over
the decompression-bomb limit, a non-UTF-8 or missing caption, a broken tar member each become a
`Rejected` with its reason (the per-sample step of curation; issue 11 runs it in Ray Data).
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")
REASONS = ("decode_error", "too_large", "too_small", "bad_aspect", "blank_image", "caption_empty", "caption_length")


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What a sample must satisfy to be kept."""

    min_side: int = 16  # pixels, before resizing
    max_aspect: float = 3.0  # longer side / shorter side
    blank_std: float = 0.02  # a near-constant image: pixel standard deviation (0..1) below this
    min_words: int = 1
    max_words: int = 64
    max_pixels: int = 64 * 1024 * 1024  # decompression-bomb guard: checked from the header, before decoding


@dataclass(frozen=True)
class Decoded:
    key: str
    image: np.ndarray  # (size, size, channels) float32 in [0, 1]
    caption: str
    captions: tuple[str, ...] = ()  # every paraphrase, the caption first (a `.json`'s "captions")
    label: int = -1  # digits ground truth: `.cls`, or "label" in the `.json`
    scene: dict | None = None  # shapes ground truth: "scene" in the `.json`
    scores: dict | None = None  # what the filters measured: width, height, pixel_std, words


@dataclass(frozen=True)
class Rejected:
    key: str
    reason: str  # one of REASONS
    detail: str
    image: np.ndarray | None = None  # when it decoded (blank, caption faults): what the grids of drops show


MAX_PART_BYTES = 64 << 20  # one part of a sample (an image, a caption) read at most


def refused(reason: str, detail: str) -> dict[str, bytes]:
    """The parts of a sample a reader refused: a ledger row with `reason` (see `decode`)."""
    return {"error": detail.encode(), "reason": reason.encode()}


def samples(shard: BinaryIO, name: str, max_part: int = MAX_PART_BYTES) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a WebDataset tar read as a stream (never whole
    into memory): consecutive members sharing the key before the first dot. A member over
    `max_part` bytes, or a sparse one (GNU sparse: 10 KiB stored read back as 1 GiB), is not
    read: its sample is refused (`too_large`, `decode_error`). A broken member ends the shard:
    the sample it belonged to comes with the parts read before it, then a sample keyed
    `<name>#broken-<n>` with no parts (the rest of the shard, lost: a `decode_error` row, not a
    crash)."""
    key, parts, n = None, {}, 0
    try:
        with tarfile.open(fileobj=shard, mode="r|") as tar:
            for member in tar:
                n += 1
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, _, ext = base.partition(".")
                stem = f"{folder}/{stem}" if folder else stem  # WebDataset keys keep their folder
                if stem != key and key is not None:
                    yield key, parts
                    parts = {}
                key = stem
                if "error" in parts:
                    continue  # the sample is refused already: skip the rest of its parts unread
                if member.issparse():
                    parts = refused(
                        "decode_error", f"{member.name}: a sparse tar member (declares {member.size} bytes)"
                    )
                    continue
                if member.size > max_part:
                    parts = refused("too_large", f"{member.name}: {member.size} bytes, over the {max_part}-byte limit")
                    continue
                data = tar.extractfile(member).read()
                if len(data) != member.size:  # tarfile reads a cut archive's last member short, silently
                    raise tarfile.ReadError(f"{member.name}: {len(data)} of {member.size} bytes")
                parts[ext.lower()] = data
    except (tarfile.TarError, EOFError, OSError):
        if key is not None:
            yield key, parts
        yield f"{name}#broken-{n}", {}
        return
    if key is not None:
        yield key, parts


def record_of(parts: dict[str, bytes]) -> dict | Rejected:
    """A sample's text parts as one record: `caption` (from `.txt`, else the `.json`'s "caption"),
    and the `.json`'s other fields ("captions", "label", "scene"); `.cls` as "label"."""
    record: dict = {}
    for ext in ("json", "txt", "cls"):
        if ext not in parts:
            continue
        try:
            text = parts[ext].decode("utf-8")
        except UnicodeDecodeError:
            return Rejected("", "decode_error", f"the .{ext} part is not UTF-8")
        if ext == "json":
            try:
                doc = json.loads(text)
            except ValueError:
                return Rejected("", "decode_error", "the .json part is not JSON")
            record.update(doc if isinstance(doc, dict) else {})
        elif ext == "txt":
            record["caption"] = text
        else:
            record["label"] = text.strip()
    return record


def _truth(record: dict) -> tuple[int, dict | None]:
    label = record.get("label", -1)
    try:
        label = int(label) if not isinstance(label, bool) else -1
    except (TypeError, ValueError):
        label = -1
    scene = record.get("scene")
    return (label if 0 <= label < 1_000_000 else -1), (scene if isinstance(scene, dict) else None)


def decode_image(
    data: bytes, channels: int, size: int, limits: Limits, formats: tuple[str, ...] | None = None
) -> np.ndarray | tuple[str, str]:
    """Image bytes → (size, size, channels) float32 in [0, 1], resized and centre-cropped; or
    (reason, detail) when they are not a usable image. `formats`: the only Pillow formats tried
    (None: any). Never raises for bad bytes."""
    from PIL import Image, ImageOps

    if not data:
        return "decode_error", "zero-byte image"
    try:
        with warnings.catch_warnings():  # over Pillow's own limit: ours below says so, as a row
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
        with img:
            w, h = img.size
            if w * h > limits.max_pixels:
                return "decode_error", f"{w}x{h} pixels is over the decompression-bomb limit of {limits.max_pixels}"
            if min(w, h) < limits.min_side:
                return "too_small", f"{w}x{h}, the shorter side under {limits.min_side}"
            if max(w, h) / min(w, h) > limits.max_aspect:
                return "bad_aspect", f"{w}x{h}, aspect over {limits.max_aspect:g}"
            img.load()
            picture = ImageOps.fit(img.convert("L" if channels == 1 else "RGB"), (size, size), Image.Resampling.BICUBIC)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        return "decode_error", f"{type(exc).__name__}: {str(exc)[:120]}"
    pixels = np.asarray(picture, np.float32) / 255.0
    return pixels[..., None] if channels == 1 else pixels


def decode(
    key: str, parts: dict[str, bytes], channels: int, size: int, limits: Limits = Limits()
) -> Decoded | Rejected:
    """One sample: its image resized and centre-cropped to `size` (grey for 1 channel, else RGB)
    and its caption, or why it is dropped."""
    record = record_of(parts)
    if isinstance(record, Rejected):
        return Rejected(key, record.reason, record.detail)
    caption = record.get("caption")
    caption = caption.strip() if isinstance(caption, str) else None
    ext = next((e for e in ("image", *IMAGE_EXTENSIONS) if e in parts), None)
    if ext is None:
        return Rejected(key, "decode_error", "no image (.jpg, .jpeg, .png or .webp)" if parts else "broken tar member")
    image = decode_image(parts[ext], channels, size, limits)
    if isinstance(image, tuple):
        return Rejected(key, *image)
    std = float(image.std())
    if std < limits.blank_std:
        return Rejected(key, "blank_image", f"pixel standard deviation {std:.4f} < {limits.blank_std:g}", image)
    if not caption:
        return Rejected(key, "caption_empty", "no caption" if caption is None else "empty caption", image)
    words = len(caption.split())
    if not limits.min_words <= words <= limits.max_words:
        return Rejected(key, "caption_length", f"{words} words, outside {limits.min_words}..{limits.max_words}", image)
    more = record.get("captions")
    more = [c.strip() for c in more if isinstance(c, str) and c.strip()] if isinstance(more, list) else []
    captions = (caption, *[c for c in more if c != caption])
    label, scene = _truth(record)
    return Decoded(key, image, caption, captions, label, scene, {"pixel_std": std, "words": words})
