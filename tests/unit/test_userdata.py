"""Users' samples decoded and validated one at a time: every planted fault becomes a reason, every
clean sample is kept, nothing raises (issue 11's per-sample step)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
from PIL import Image

from nmm.data import export, userdata
from nmm.data.sources import render_shapes

CAPTION = b"a red square left of a blue circle"


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _scene(side: int = 32) -> Image.Image:
    pixels = (render_shapes(1, 32, 0, 1).images[0] * 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").resize((side, side))


def _tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_every_planted_fault_gets_its_reason_and_clean_samples_are_kept():
    good = _png(_scene(48))
    bomb = _png(Image.new("1", (10_000, 10_000)))  # 100 M pixels in a few kB
    planted = [
        ("clean", {"png": good, "txt": CAPTION}),
        ("clean-jpeg", {"jpg": _png(_scene(40).convert("RGB"), "JPEG"), "json": b'{"caption": "two shapes"}'}),
        ("truncated", {"png": good[: len(good) // 2], "txt": CAPTION}),
        ("zero-bytes", {"png": b"", "txt": CAPTION}),
        ("not-an-image", {"png": b"hello, world", "txt": CAPTION}),
        ("bomb", {"png": bomb, "txt": CAPTION}),
        ("latin1-caption", {"png": good, "txt": "café crème".encode("latin-1")}),
        ("no-caption", {"png": good}),
        ("empty-caption", {"png": good, "txt": b"   "}),
        ("long-caption", {"png": good, "txt": b"word " * 100}),
        ("tiny", {"png": _png(_scene(10)), "txt": CAPTION}),
        ("banner", {"png": _png(_scene(64).resize((64, 16))), "txt": CAPTION}),
        ("blank", {"png": _png(Image.new("RGB", (32, 32), (128, 128, 128))), "txt": CAPTION}),
        ("no-image", {"txt": CAPTION}),
    ]
    shard = _tar(planted)
    got = {
        key: userdata.decode(key, parts, channels=3, size=32)
        for key, parts in userdata.samples(io.BytesIO(shard), "s0")
    }
    reasons = {k: (v.reason if isinstance(v, userdata.Rejected) else "keep") for k, v in got.items()}
    assert reasons == {
        "clean": "keep",
        "clean-jpeg": "keep",
        "truncated": "decode_error",
        "zero-bytes": "decode_error",
        "not-an-image": "decode_error",
        "bomb": "decode_error",
        "latin1-caption": "decode_error",
        "no-caption": "caption_empty",
        "empty-caption": "caption_empty",
        "long-caption": "caption_length",
        "tiny": "too_small",
        "banner": "bad_aspect",
        "blank": "blank_image",
        "no-image": "decode_error",
    }
    assert all(r in userdata.REASONS for r in reasons.values() if r != "keep")
    kept = got["clean"]
    assert kept.image.shape == (32, 32, 3) and kept.image.dtype == np.float32 and kept.caption == CAPTION.decode()
    assert got["clean-jpeg"].caption == "two shapes"
    assert "decompression-bomb" in got["bomb"].detail


def test_a_broken_tar_keeps_what_it_read_and_reports_the_rest():
    shard = _tar([("a", {"png": _png(_scene()), "txt": CAPTION}), ("b", {"png": _png(_scene()), "txt": CAPTION})])
    with tarfile.open(fileobj=io.BytesIO(shard)) as tar:
        b_png = tar.getmember("b.png")
    broken = shard[: b_png.offset_data + b_png.size // 2]  # cut inside the second sample's image
    keys = [key for key, _ in userdata.samples(io.BytesIO(broken), "shard-000007.tar")]
    assert keys[0] == "a" and keys[1] == "b" and keys[-1].startswith("shard-000007.tar#broken-")
    rows = {k: userdata.decode(k, p, 3, 32) for k, p in userdata.samples(io.BytesIO(broken), "shard-000007.tar")}
    assert isinstance(rows["a"], userdata.Decoded)
    assert all(isinstance(rows[k], userdata.Rejected) and rows[k].reason == "decode_error" for k in keys[1:])


def test_exported_shards_decode_back_to_their_source_images(tmp_path):
    data = render_shapes(6, 32, 1, 1)
    (uri,) = export.export_webdataset(data, tmp_path.as_uri(), shard_size=10)
    decoded = [
        userdata.decode(k, p, 3, 32)
        for k, p in userdata.samples(io.BytesIO((tmp_path / "shard-000000.tar").read_bytes()), uri)
    ]
    assert [d.caption for d in decoded] == [c[0] for c in data.captions]
    for d, image in zip(decoded, data.images):
        assert np.abs(d.image - (image * 255).round() / 255).max() < 1e-6  # same size: no resampling
    grey = userdata.decode("g", {"png": _png(_scene(32)), "txt": CAPTION}, channels=1, size=24)
    assert grey.image.shape == (24, 24, 1)
