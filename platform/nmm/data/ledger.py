"""The ledger: one row per input sample and its fate, as Parquet next to the dataset
(`<dataset_uri>/ledger.parquet`). Rows follow the canonical order; the bytes are the same for
the same rows (no timestamps), so the ledger is part of the dataset's digest.
"""

from __future__ import annotations

import io
from collections import Counter

import numpy as np

REASONS = (
    "decode_error",
    "too_large",
    "too_small",
    "bad_aspect",
    "blank_image",
    "caption_empty",
    "caption_length",
    "exact_duplicate",
    "near_duplicate",
    "caption_near_duplicate",
    "low_alignment_score",
    "over_limit",
)  # over_limit: past its source's `limit` (kept otherwise)
FILE = "ledger.parquet"
SIGNED = (
    "exact_duplicate",
    "near_duplicate",
    "caption_near_duplicate",
    "low_alignment_score",
    "over_limit",
)  # decoded rows


def table(cols: dict, decisions, alignment: np.ndarray | None = None):
    """The ledger as an Arrow table: a row per sample, in the canonical order `cols` are in."""
    import pyarrow as pa

    reason = list(decisions.reason)
    optional = lambda xs: [x or None for x in xs]
    score = lambda xs: [None if np.isnan(x) else round(float(x), 6) for x in xs]
    data = {
        "source": pa.array(list(cols["source"]), pa.string()),
        "key": pa.array(list(cols["key"]), pa.string()),
        "content_id": pa.array(list(cols["content_id"]), pa.string()),
        "decision": pa.array(["drop" if r else "keep" for r in reason], pa.string()),
        "reason": pa.array(optional(reason), pa.string()),
        "detail": pa.array(optional(cols["detail"]), pa.string()),
        "duplicate_of": pa.array(optional(decisions.duplicate_of), pa.string()),
        "split": pa.array(optional(decisions.split), pa.string()),
        "pixel_std": pa.array(score(cols["pixel_std"]), pa.float64()),
        "caption_words": pa.array([int(x) for x in cols["words"]], pa.int32()),
        "phash": pa.array(
            [f"{int(h):016x}" if not r or r in SIGNED else None for h, r in zip(np.asarray(cols["phash"]), reason)],
            pa.string(),
        ),
        "hamming": pa.array([None if h < 0 else int(h) for h in decisions.hamming], pa.int16()),
        "caption_jaccard": pa.array(score(decisions.caption_jaccard), pa.float64()),
        "alignment_score": pa.array([None] * len(reason) if alignment is None else score(alignment), pa.float64()),
    }
    return pa.table(data)


def to_bytes(tbl) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(tbl, buf, compression="zstd", write_statistics=False)
    return buf.getvalue()


def from_bytes(data: bytes):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data))


def counts(tbl) -> dict:
    """kept, dropped per reason, and both per source."""
    reasons = tbl.column("reason").to_pylist()
    sources = tbl.column("source").to_pylist()
    by_reason = Counter(r for r in reasons if r)
    out = {
        "kept": sum(1 for r in reasons if not r),
        "dropped": sum(by_reason.values()),
        "dropped_by_reason": {r: by_reason.get(r, 0) for r in REASONS},
        "sources": {},
    }
    for name in sorted(set(sources)):
        mine = [r for r, s in zip(reasons, sources) if s == name]
        out["sources"][name] = {"samples": len(mine), "kept": sum(1 for r in mine if not r)}
    return out
