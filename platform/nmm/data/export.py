"""A built-in source written out as WebDataset shards: what users' own image-text data looks like
to nmm (`nmm data export`), and the fixtures the curation tests read.

Each shard `shard-000000.tar` holds, per sample, `<key>.png` (8-bit grey or RGB, as the source's
channels) and `<key>.json` (`{"caption": …, "captions": [...]}`, plus the ground-truth `scene` of a
shapes sample, or the `label` of a digit). Keys are `<source>-<index>`, members sorted, tar headers
fixed (mtime 0, uid 0):
the same source and options give byte-identical shards.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np

from nmm import storage
from nmm.data import sources
from nmm.data.sources import SourceData

FORMATS = ("webdataset",)


def load_source(kind: str, samples: int, image_size: int, seed: int, captions_per_image: int) -> SourceData:
    """A built-in source by name, `samples` of it at most (digits has 1,797)."""
    data = sources.load(kind, captions_per_image, samples, image_size, seed)
    return data if len(data.images) <= samples else data.subset(range(samples))


def png(image: np.ndarray) -> bytes:
    """An (H, W, C) float image in [0, 1] as PNG bytes (C = 1: grey, 3: RGB)."""
    from PIL import Image

    pixels = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels[..., 0], "L") if pixels.shape[-1] == 1 else Image.fromarray(pixels, "RGB")
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def shard(data: SourceData, indices: range) -> bytes:
    """One tar shard of the given samples."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in indices:
            key = f"{data.name}-{i:08d}"
            meta = {"caption": data.captions[i][0], "captions": list(data.captions[i])}
            if data.scenes is not None:
                meta["scene"] = data.scenes[i]
            if data.labels[i] >= 0:
                meta["label"] = int(data.labels[i])
            _member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
            _member(tar, f"{key}.png", png(data.images[i]))
    return buf.getvalue()


def export_webdataset(data: SourceData, out_uri: str, shard_size: int) -> list[str]:
    """Write the shards under `out_uri` (a folder or s3:// prefix, through nmm.storage); their URIs."""
    if shard_size < 1:
        raise ValueError(f"--shard-size: expected at least 1, got {shard_size}")
    uris = []
    for n, start in enumerate(range(0, len(data.images), shard_size)):
        uri = storage.join(out_uri, f"shard-{n:06d}.tar")
        storage.write_bytes(uri, shard(data, range(start, min(start + shard_size, len(data.images)))))
        uris.append(uri)
    return uris
