"""Shards: safetensors files (deterministic bytes: same content → same digest → same key).

Arrays go in the tensors, strings (captions, ids) as JSON in the safetensors metadata.
"""

from __future__ import annotations

import json

import numpy as np


def encode_shard(arrays: dict[str, np.ndarray], meta: dict) -> bytes:
    from safetensors.numpy import save

    return save(
        {k: np.ascontiguousarray(v) for k, v in arrays.items()},
        metadata={"json": json.dumps(meta, sort_keys=True)},
    )


def decode_shard(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors.numpy import load

    arrays = load(data)
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["json"])
    return arrays, meta
