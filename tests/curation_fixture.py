"""Shards with planted faults for the curation tests: clean samples written by nmm's own WebDataset
writer (nmm.data.export), then exact and near duplicates, blank and undecodable images, bad
captions, a decompression bomb and a cut tar, each under a key that says what it is.

`EXPECTED` maps every planted key to the reason curation must give it (and which clean sample a
duplicate must name). The clean images are checked to be far apart in pHash, so a clean sample
dropped as a near-duplicate is a real failure, not a fixture accident.
"""

from __future__ import annotations

import io
import itertools
import tarfile

import numpy as np
from PIL import Image

from nmm.data import export, signatures, userdata
from nmm.data.sources import SourceData

CLEAN = 24
SIDE = 64
WORDS = (
    "red green blue small large round square bright dark striped dotted wooden metal glass paper stone "
    "river hill tree house boat car bird dog cat flower cloud road bridge tower lamp chair table"
).split()


def picture(seed: int) -> np.ndarray:
    """A textured (H, W, 3) uint8 picture: an 8×8 random grid, smoothly upscaled."""
    rng = np.random.default_rng(seed)
    small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((SIDE, SIDE), Image.Resampling.BICUBIC))


def caption(seed: int) -> str:
    rng = np.random.default_rng(seed + 10_000)
    return "a photo of " + " ".join(rng.choice(WORDS, 6, replace=False))


def encode(pixels: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kw)
    return buf.getvalue()


def tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _hash(pixels: np.ndarray) -> int:
    d = userdata.decode("k", {"png": encode(pixels), "txt": b"x"}, 3, 32)
    return signatures.phash((d.image * 255).round().astype(np.uint8))


def clean_source() -> SourceData:
    images = np.stack([picture(s) for s in range(CLEAN)]).astype(np.float32) / 255.0
    return SourceData("clean", images, np.full(CLEAN, -1, np.int64), [[caption(s)] for s in range(CLEAN)])


def shards(radius: int = 6) -> dict[str, bytes]:
    """{file name: tar bytes} of the fixture."""
    hashes = [_hash(picture(s)) for s in range(CLEAN + 2)]
    closest = min(signatures.hamming(a, b) for a, b in itertools.combinations(hashes, 2))
    assert closest > 2 * radius, f"fixture: clean pictures only {closest} bits apart"
    clean = export.shard(clean_source(), range(CLEAN))  # keys clean-00000000 …
    p = [picture(s) for s in range(4)]
    shifted = np.concatenate([p[3][:, :1], p[3][:, :-1]], axis=1)  # one pixel right, edge repeated
    big = Image.new("1", (10_000, 10_000))
    bomb = io.BytesIO()
    big.save(bomb, format="PNG")
    txt = lambda s: caption(s).encode()
    planted = tar(
        [
            ("exact-same-bytes", {"png": encode(p[0]), "txt": b"a different caption about a copy"}),
            ("exact-reencoded", {"png": encode(p[0], compress_level=1), "txt": b"another caption of the same pixels"}),
            ("near-resized", {"png": encode(np.asarray(Image.fromarray(p[1]).resize((48, 48)))), "txt": txt(101)}),
            ("near-jpeg", {"jpg": encode(p[2], "JPEG", quality=70), "txt": txt(102)}),
            ("near-shifted", {"png": encode(shifted), "txt": txt(103)}),
            ("caption-copy", {"png": encode(picture(CLEAN)), "txt": caption(4).upper().encode()}),
            ("blank", {"png": encode(np.full((SIDE, SIDE, 3), 128, np.uint8)), "txt": txt(104)}),
            ("empty-caption", {"png": encode(picture(200)), "txt": b"  "}),
            ("latin1-caption", {"png": encode(picture(201)), "txt": "café crème brûlée".encode("latin-1")}),
            ("no-caption", {"png": encode(picture(202))}),
            ("bomb", {"png": bomb.getvalue(), "txt": txt(105)}),
            ("truncated", {"png": encode(picture(203))[:200], "txt": txt(106)}),
            ("zero-bytes", {"png": b"", "txt": txt(107)}),
            ("tiny", {"png": encode(picture(204)[:8, :8]), "txt": txt(108)}),
            ("banner", {"png": encode(np.asarray(Image.fromarray(picture(205)).resize((64, 16)))), "txt": txt(109)}),
            ("long-caption", {"png": encode(picture(206)), "txt": b"word " * 100}),
        ]
    )
    whole = tar(
        [
            ("ok-before-cut", {"png": encode(picture(CLEAN + 1)), "txt": txt(110)}),
            ("cut", {"txt": txt(111), "png": encode(picture(207))}),
        ]
    )
    with tarfile.open(fileobj=io.BytesIO(whole)) as t:
        member = t.getmember("cut.png")
    broken = whole[: member.offset_data + member.size // 2]
    return {"shard-000000.tar": clean, "shard-000001.tar": planted, "shard-000002.tar": broken}


CLEAN_KEYS = [f"shard-000000.tar/clean-{i:08d}" for i in range(CLEAN)] + ["shard-000002.tar/ok-before-cut"]
EXPECTED = {  # key → (reason, the clean key a duplicate names)
    "shard-000001.tar/exact-same-bytes": ("exact_duplicate", "shard-000000.tar/clean-00000000"),
    "shard-000001.tar/exact-reencoded": ("exact_duplicate", "shard-000000.tar/clean-00000000"),
    "shard-000001.tar/near-resized": ("near_duplicate", "shard-000000.tar/clean-00000001"),
    "shard-000001.tar/near-jpeg": ("near_duplicate", "shard-000000.tar/clean-00000002"),
    "shard-000001.tar/near-shifted": ("near_duplicate", "shard-000000.tar/clean-00000003"),
    "shard-000001.tar/caption-copy": ("caption_near_duplicate", "shard-000000.tar/clean-00000004"),
    "shard-000001.tar/blank": ("blank_image", None),
    "shard-000001.tar/empty-caption": ("caption_empty", None),
    "shard-000001.tar/latin1-caption": ("decode_error", None),
    "shard-000001.tar/no-caption": ("caption_empty", None),
    "shard-000001.tar/bomb": ("decode_error", None),
    "shard-000001.tar/truncated": ("decode_error", None),
    "shard-000001.tar/zero-bytes": ("decode_error", None),
    "shard-000001.tar/tiny": ("too_small", None),
    "shard-000001.tar/banner": ("bad_aspect", None),
    "shard-000001.tar/long-caption": ("caption_length", None),
    "shard-000002.tar/cut": ("decode_error", None),
    "shard-000002.tar#broken-4": ("decode_error", None),
}
