"""Readers of users' data bound what one sample may cost (issue 27 items 15 and 17, S14): a 10 KiB
GNU-sparse tar member that reads back as 1 GiB, a 100 MiB member, a Parquet file of a few KiB
holding one 300 MiB zstd cell, a folder whose caption is a symlink to a file outside it. Each
becomes a ledger row with its reason, the clean samples beside it are kept, and curating them
costs the process a bounded amount of memory (measured in a child process: ru_maxrss against the
same process examining clean data)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration


def png(seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((16, 16, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def gnu_sparse_member(name: bytes, real_size: int, data: bytes) -> bytes:
    """A GNU sparse tar member (type 'S'): `data` stored, `real_size` declared (the holes read as zeros)."""
    h = bytearray(512)
    h[0 : len(name)] = name
    h[100:108], h[108:116], h[116:124] = b"0000644\0", b"0001750\0", b"0001750\0"
    h[124:136], h[136:148], h[156:157], h[257:265] = b"%011o\0" % len(data), b"%011o\0" % 0, b"S", b"ustar  \0"
    h[386:398], h[398:410] = b"%011o\0" % 0, b"%011o\0" % len(data)  # one sparse entry: offset 0, its bytes
    h[483:495] = b"%011o\0" % real_size
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h) + data + b"\0" * (-len(data) % 512)


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    wds = root / "wds"
    wds.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        add(tar, "clean.png", png(0))
        add(tar, "clean.txt", b"a clean sample")
        add(tar, "huge.png", bytes(100 << 20))  # 100 MiB: over the 64 MiB a part may be
        add(tar, "huge.txt", b"a huge image")
        end = tar.offset  # before the end-of-archive blocks: the sparse member follows
    clean_and_huge = buf.getvalue()[:end]
    (wds / "shard-000000.tar").write_bytes(
        clean_and_huge + gnu_sparse_member(b"sparse.png", 1 << 30, b"x" * 10240) + b"\0" * 1024
    )
    pq_dir = root / "pq"
    pq_dir.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [png(1)], "caption": ["a clean row"]}), pq_dir / "a-clean.parquet")
    pq.write_table(
        pa.table({"image": pa.array([bytes(300 << 20)], pa.binary()), "caption": ["a bomb"]}),
        pq_dir / "b-bomb.parquet",
        compression="zstd",
    )
    assert (pq_dir / "b-bomb.parquet").stat().st_size < 200_000  # a few KiB on disk, 300 MiB inside
    folder = root / "folder"
    folder.mkdir()
    (folder / "inside.png").write_bytes(png(2))
    (folder / "inside.txt").write_text("a caption inside")
    (folder / "leak.png").write_bytes(png(3))
    (root / "secret.txt").write_text("the contents of a file outside the source")
    (folder / "leak.txt").symlink_to(root / "secret.txt")
    return root


CHILD = """
import json, sys
from nmm.data import readers
from nmm.data.examine import Settings, examine_unit
from nmm.data.userdata import Limits
from nmm.spec.data import Source
src = Source.model_validate(json.loads(sys.argv[1]))
settings = Settings(side=16, channels=3, limits=Limits(min_side=8), signatures=False, truth={})
rows = []
for unit in readers.units(src)[0]:
    out = examine_unit(unit, settings)
    fields = zip(out["key"], out["reason"], out["detail"], out["has_pixels"])
    rows += [[str(k), str(r), str(d)[:200], bool(p)] for k, r, d, p in fields]
# this process image's own peak (ru_maxrss survives exec)
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rows": rows, "peak_mib": peak / 1024}))
"""


def examine(source: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(source)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_oversized_and_sparse_tar_members_are_ledger_rows_read_as_a_stream(hostile):
    out = examine({"kind": "webdataset", "uri": str(hostile / "wds"), "imageSize": 16})
    rows = {k.rpartition("/")[2]: (reason, detail) for k, reason, detail, _ in out["rows"]}
    assert rows["clean"][0] == ""
    assert rows["huge"][0] == "too_large" and "over the 67108864-byte limit" in rows["huge"][1]
    assert rows["sparse"][0] == "decode_error" and "sparse tar member" in rows["sparse"][1]
    baseline = examine({"kind": "parquet", "uri": str(hostile / "pq" / "a-clean.parquet"), "imageSize": 16})
    print(
        f"webdataset with a 1 GiB sparse and a 100 MiB member: peak {out['peak_mib']:.0f} MiB, "
        f"clean baseline {baseline['peak_mib']:.0f} MiB"
    )
    assert out["peak_mib"] - baseline["peak_mib"] < 100


def test_a_parquet_cell_that_decompresses_to_300_mib_is_refused_from_the_metadata(hostile):
    out = examine({"kind": "parquet", "uri": str(hostile / "pq"), "imageSize": 16})
    (clean, bomb) = out["rows"]
    assert clean[1] == "" and clean[3]
    assert bomb[1] == "too_large" and "decompressed" in bomb[2]
    baseline = examine({"kind": "parquet", "uri": str(hostile / "pq" / "a-clean.parquet"), "imageSize": 16})
    print(
        f"parquet with a 300 MiB zstd cell: peak {out['peak_mib']:.0f} MiB, "
        f"clean baseline {baseline['peak_mib']:.0f} MiB"
    )
    assert out["peak_mib"] - baseline["peak_mib"] < 100


def test_a_symlink_out_of_a_folder_source_is_refused_not_read(hostile):
    out = examine({"kind": "folder", "uri": str(hostile / "folder"), "imageSize": 16})
    rows = {k.rpartition("/")[2]: (reason, detail) for k, reason, detail, _ in out["rows"]}
    assert rows["inside"][0] == ""
    assert rows["leak"][0] == "decode_error" and "resolves outside the source's folder" in rows["leak"][1]
    assert "contents of a file outside" not in json.dumps(out)
