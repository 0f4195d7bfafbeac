"""Content ids and the deterministic, content-hashed split (the decisions live in nmm.data.dedup)."""

from __future__ import annotations

import hashlib

import numpy as np


def content_ids(images: np.ndarray) -> list[str]:
    return [hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest() for img in images]


def split_of(content_id: str, train: float, val: float, salt: str = "") -> str:
    """Assign a sample to train/val/test by a hash of its content: stable under reordering."""
    u = int(hashlib.sha256((salt + content_id).encode()).hexdigest()[:12], 16) / float(1 << 48)
    if u < train:
        return "train"
    if u < train + val:
        return "val"
    return "test"


def split(ids: list[str], train: float, val: float) -> dict[str, np.ndarray]:
    """Indices of each split, from the samples' content ids."""
    names = np.array([split_of(h, train, val) for h in ids])
    return {s: np.flatnonzero(names == s) for s in ("train", "val", "test")}
