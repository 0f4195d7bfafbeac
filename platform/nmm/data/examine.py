"""The per-sample step of curation, run on Ray Data workers (or in a plain loop): read one unit,
decode and validate each sample, and sign what survives (content hash of the decoded pixels,
perceptual hash, caption MinHash). Its output is one batch of columns; the decisions that need
every sample (duplicates, the split) are made afterwards from the small columns only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from nmm.data import readers, signatures, userdata
from nmm.data.curate import content_ids
from nmm.data.readers import Unit

MAX_SAMPLES_PER_UNIT = 1 << 24  # the canonical order is unit index << 24 | position


@dataclass(frozen=True)
class Settings:
    """What every worker needs to know (plain values: it travels to Ray workers)."""

    side: int
    channels: int
    limits: userdata.Limits
    truth: dict  # source name → "digits" | "shapes" | None: whose ground truth its samples must carry
    signatures: bool = True  # perceptual hash and MinHash (near dedup, leakage)


COLUMNS = (
    "order",
    "source",
    "key",
    "reason",
    "detail",
    "content_id",
    "pixel_std",
    "words",
    "phash",
    "minhash",
    "pixels",
    "has_pixels",
    "captions",
    "label",
    "scene",
)


BLOCK = 256  # a unit's batch grows by this many rows (doubling)


def _empty(n: int, s: Settings) -> dict[str, np.ndarray]:
    return {
        "order": np.zeros(n, np.int64),
        "source": np.empty(n, object),
        "key": np.empty(n, object),
        "reason": np.full(n, "", object),
        "detail": np.full(n, "", object),
        "content_id": np.full(n, "", object),
        "pixel_std": np.full(n, np.nan, np.float32),
        "words": np.zeros(n, np.int32),
        "phash": np.zeros(n, np.uint64),
        "minhash": np.zeros((n, signatures.NUM_PERM), np.uint64),
        "pixels": np.zeros((n, s.side, s.side, s.channels), np.uint8),
        "has_pixels": np.zeros(n, bool),
        "captions": np.full(n, "[]", object),
        "label": np.full(n, -1, np.int64),
        "scene": np.full(n, "", object),
    }


def _missing_truth(d: userdata.Decoded, truth: str | None) -> str | None:
    if truth == "digits" and not 0 <= d.label <= 9:
        return 'no digit label 0-9 (`.cls`, or "label" in the .json)'
    if truth == "shapes":
        if d.scene is None:
            return 'no "scene" in the .json'
        from nmm.data import shapes

        try:
            shapes.check_scene(d.scene)
        except ValueError as exc:
            return f'the .json\'s "scene" is not a shapes scene: {str(exc)[:120]}'
    return None


def fill(
    out: dict[str, np.ndarray],
    i: int,
    d: userdata.Decoded | userdata.Rejected,
    s: Settings,
    raw: bytes,
    content_id: str | None = None,
) -> None:
    """Row i of a batch from one decoded (or rejected) sample. Its content id: the hash of its
    decoded 8-bit pixels (of the raw bytes when it did not decode), unless given."""
    if isinstance(d, userdata.Rejected):
        out["reason"][i], out["detail"][i] = d.reason, d.detail
        out["content_id"][i] = hashlib.sha256(raw).hexdigest()
        if d.image is not None:  # it decoded: kept for the grid of its reason
            out["pixels"][i], out["has_pixels"][i] = (d.image * 255.0).round().astype(np.uint8), True
        return
    pixels = (d.image * 255.0).round().astype(np.uint8)
    out["content_id"][i] = content_id or hashlib.sha256(pixels.tobytes()).hexdigest()
    out["pixel_std"][i], out["words"][i] = (d.scores or {}).get("pixel_std", np.nan), (d.scores or {}).get("words", 0)
    missing = _missing_truth(d, s.truth.get(out["source"][i]))
    if missing:
        out["reason"][i], out["detail"][i] = "decode_error", missing
        return
    out["pixels"][i], out["has_pixels"][i] = pixels, True
    out["captions"][i] = json.dumps(list(d.captions or (d.caption,)))
    out["label"][i] = d.label
    out["scene"][i] = json.dumps(d.scene, sort_keys=True) if d.scene is not None else ""
    if s.signatures:
        out["phash"][i] = signatures.phash(pixels)
        out["minhash"][i] = signatures.minhash(d.caption)


def examine_unit(unit: Unit, s: Settings) -> dict[str, np.ndarray]:
    """Every sample of one unit, as one batch of columns in the unit's order. Samples are read
    and decoded one at a time (a unit's raw bytes are never all in memory): the batch holds
    their decoded pixels and small columns only, grown in blocks."""
    out, n = _empty(BLOCK, s), 0
    for key, parts in readers.read(unit):
        if n >= MAX_SAMPLES_PER_UNIT:
            raise ValueError(f"{unit.uris[0]}: over {MAX_SAMPLES_PER_UNIT} samples in one object")
        if n == len(out["order"]):
            more = _empty(len(out["order"]), s)
            out = {c: np.concatenate([out[c], more[c]]) for c in out}
        out["order"][n] = (unit.index << 24) | n
        out["source"][n], out["key"][n] = unit.source, key
        if "error" in parts or not parts:
            detail = parts.get("error", b"broken tar member: the rest of the shard is lost").decode("utf-8", "replace")
            reason = parts.get("reason", b"decode_error").decode()
            d: userdata.Decoded | userdata.Rejected = userdata.Rejected(key, reason, detail)
        else:
            d = userdata.decode(key, parts, s.channels, s.side, s.limits)
        fill(out, n, d, s, b"".join(parts[k] for k in sorted(parts)))
        n += 1
    return {c: v[:n] for c, v in out.items()}


def examine_builtin(
    name: str,
    index: int,
    images: np.ndarray,
    captions: list[list[str]],
    labels: np.ndarray,
    scenes: list[dict] | None,
    s: Settings,
) -> dict[str, np.ndarray]:
    """A built-in source's samples (already at the model's size), as one batch: no decoding or
    filtering (they are clean by construction), the same hashes and signatures. Their content ids
    stay nmm 0.1's (the hash of their float32 pixels), so their splits are what they were."""
    out = _empty(len(images), s)
    ids = content_ids(images)
    for i in range(len(images)):
        out["order"][i] = (index << 24) | i
        out["source"][i], out["key"][i] = name, f"{name}-{i:08d}"
        d = userdata.Decoded(
            out["key"][i],
            images[i],
            captions[i][0],
            tuple(captions[i]),
            int(labels[i]),
            scenes[i] if scenes is not None else None,
            {"pixel_std": float(images[i].std()), "words": len(captions[i][0].split())},
        )
        fill(out, i, d, s, b"", ids[i])
    return out
