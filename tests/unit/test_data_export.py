"""`nmm data export`: a built-in source as WebDataset shards (issue 11's way in, and its fixtures)."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile

import numpy as np
from PIL import Image

from nmm.data import export
from nmm.data.sources import render_shapes
from tests.conftest import NMM


def _members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_shapes_become_shards_of_png_and_json_pairs_that_decode_to_the_source(tmp_path):
    data = render_shapes(50, 32, 3, 2)
    uris = export.export_webdataset(data, tmp_path.as_uri(), shard_size=20)
    assert [u.rsplit("/", 1)[1] for u in uris] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    seen = 0
    for path in sorted(tmp_path.glob("shard-*.tar")):
        members = _members(path)
        for (meta_name, meta), (png_name, png) in zip(members[0::2], members[1::2]):
            key = meta_name.removesuffix(".json")
            assert png_name == f"{key}.png"  # one key, consecutive members: the WebDataset convention
            i = int(key.rsplit("-", 1)[1])
            record = json.loads(meta)
            assert record["caption"] == data.captions[i][0] and record["captions"] == data.captions[i]
            assert record["scene"] == json.loads(json.dumps(data.scenes[i]))  # the scene, as JSON
            image = Image.open(io.BytesIO(png))
            assert image.mode == "RGB" and image.size == (32, 32)
            expected = (data.images[i] * 255).round().astype(np.uint8)
            assert np.array_equal(np.asarray(image), expected)
            seen += 1
    assert seen == 50


def test_digits_are_grey_and_the_export_is_byte_identical_when_repeated(tmp_path):
    data = export.load_source("digits", 30, 32, 0, 1)
    a = export.export_webdataset(data, (tmp_path / "a").as_uri(), shard_size=100)
    b = export.export_webdataset(data, (tmp_path / "b").as_uri(), shard_size=100)
    assert len(a) == len(b) == 1
    assert (tmp_path / "a" / "shard-000000.tar").read_bytes() == (tmp_path / "b" / "shard-000000.tar").read_bytes()
    (name, meta), (_, png) = _members(tmp_path / "a" / "shard-000000.tar")[:2]
    assert name == "digits-00000000.json" and "scene" not in json.loads(meta)
    assert Image.open(io.BytesIO(png)).mode == "L" and Image.open(io.BytesIO(png)).size == (8, 8)


def test_the_cli_writes_shards_and_refuses_unknown_sources_and_formats(tmp_path):
    r = subprocess.run(
        [
            NMM,
            "data",
            "export",
            "--source",
            "shapes",
            "--samples",
            "12",
            "--shard-size",
            "5",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "wrote 12 shapes samples in 3 WebDataset shard(s)" in r.stdout.replace("\n", " ")
    assert len(list((tmp_path / "out").glob("shard-*.tar"))) == 3
    for args, message in (
        (["--source", "mnist"], "--source: expected one of digits, shapes"),
        (["--source", "shapes", "--format", "parquet"], "--format: expected one of webdataset"),
    ):
        r = subprocess.run(
            [NMM, "data", "export", *args, "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "bad").exists()
