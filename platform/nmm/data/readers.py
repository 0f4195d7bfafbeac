"""Users' sources cut into units of work, and each unit read into raw samples `(key, parts)`.

A unit is what one Ray task reads: WebDataset tars or Parquet files (one, or consecutive small ones
up to UNIT_BYTES together: a task must be long enough to hide Ray's scheduling), or up to
FOLDER_CHUNK images of a folder. Units are numbered in source order, then object order: the canonical order
every later decision follows (first one wins), whatever order Ray finishes them in.

Parts are a sample's bytes by extension, as in a WebDataset tar: the image under its extension
(`image` for a Parquet cell), the caption as `txt`, other fields as `json`.

What one sample may cost is bounded before it is spent (S14): tars are streamed member by member,
a member or a file over `userdata.MAX_PART_BYTES` and a sparse tar member are refused unread,
Parquet is read one row group at a time and a row group whose image column would decompress past
MAX_ROW_GROUP_BYTES is refused from its metadata, and a local file that resolves (through a
symlink) outside its source's root is refused. Each is a ledger row with its reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from nmm import storage
from nmm.data import kinds, userdata
from nmm.data.kinds import IMAGE_SUFFIXES
from nmm.data.locate import find, source_root
from nmm.plugins import resolve

FOLDER_CHUNK = 256  # images per unit of a folder source
UNIT_BYTES = 8 << 20  # small tars or Parquet files are read together, up to this much a unit
MAX_ROW_GROUP_BYTES = 256 << 20  # a Parquet row group's image column, decompressed, at most


@dataclass(frozen=True)
class Unit:
    index: int  # canonical position among all units of the run
    source: str  # the source's name
    kind: str  # webdataset | parquet | folder
    uris: tuple[str, ...]  # the tars or parquet files; a folder chunk's images
    captions: dict = field(default_factory=dict)  # folder: image URI → its captions.jsonl record, or its .txt URI
    columns: tuple[str, str] = ("image", "caption")  # parquet: image and caption columns
    root: str = ""  # what every object read must resolve within: the folder, or a glob's folder


def _folder_records(objects) -> dict[str, dict | str]:
    """Each image's captions.jsonl record, by image URI (a file named relative to its jsonl)."""
    records: dict[str, dict | str] = {}
    for obj in objects:
        if not obj.uri.endswith("/captions.jsonl"):
            continue
        base = obj.uri.rpartition("/")[0]
        for line in storage.read_bytes(obj.uri).decode("utf-8", "replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("file"), str):
                records[f"{base}/{rec['file']}"] = rec
    return records


def units(src, start: int = 0) -> tuple[list[Unit], list[tuple[str, int, str]]]:
    """A user source's units (a spec Source; numbered from `start`), by its kind's reader
    (nmm.data.kinds), and its objects (URI, size, ETag: what the cache key covers)."""
    objects = find(src.kind, src.label, src.uri)
    listing = [(o.uri, o.size, o.etag) for o in objects]
    return resolve(kinds.kind(src.kind).units)(src, objects, start, source_root(src.uri)), listing


def grouped_units(src, objects, start: int, root: str) -> list[Unit]:
    """Consecutive objects (tars, Parquet files), UNIT_BYTES or less a unit."""
    cols = (src.columns.image, src.columns.caption)
    return [
        Unit(start + i, src.label, src.kind, group, columns=cols, root=root) for i, group in enumerate(_groups(objects))
    ]


def folder_units(src, objects, start: int, root: str) -> list[Unit]:
    """FOLDER_CHUNK images a unit, each with its captions.jsonl record or the .txt beside it."""
    records = _folder_records(objects)
    texts = {o.uri for o in objects if o.uri.endswith(".txt")}
    images = [o.uri for o in objects if o.uri.lower().endswith(IMAGE_SUFFIXES)]
    for u in images:
        txt = u.rpartition(".")[0] + ".txt"
        if u not in records and txt in texts:
            records[u] = txt
    chunks = [tuple(images[i : i + FOLDER_CHUNK]) for i in range(0, len(images), FOLDER_CHUNK)]
    return [
        Unit(start + i, src.label, src.kind, c, {u: records[u] for u in c if u in records}, root=root)
        for i, c in enumerate(chunks)
    ]


def _groups(objects) -> list[tuple[str, ...]]:
    """Consecutive objects, UNIT_BYTES or less a group (a bigger object alone)."""
    groups: list[list[str]] = []
    size = UNIT_BYTES
    for o in objects:
        if size + o.size > UNIT_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(o.uri)
        size += o.size
    return [tuple(g) for g in groups]


def _name(uri: str) -> str:
    return PurePosixPath(uri).name


def _outside(unit: Unit, uri: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """A refused sample when `uri` resolves (through a symlink) outside the source's root."""
    if unit.root and not storage.resolves_within(uri, unit.root):
        yield (
            f"{_name(uri)}#outside",
            userdata.refused("decode_error", f"{_name(uri)} resolves outside the source's folder"),
        )


def read_tar(unit: Unit, uri: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """A WebDataset tar's samples, streamed member by member."""
    if refused := list(_outside(unit, uri)):
        yield from refused
        return
    with storage.open_read(uri) as (shard, _):  # a store that fails here is retryable (StorageError), not bad data
        for key, parts in userdata.samples(shard, _name(uri)):
            yield f"{_name(uri)}/{key}" if "#broken" not in key else key, parts


def read_parquet(unit: Unit, uri: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """A Parquet file's rows, one row group at a time (the file seekable: ranged reads on S3); a
    row group whose image column would decompress past MAX_ROW_GROUP_BYTES is refused from the
    file's metadata, row by row, unread."""
    import pyarrow.parquet as pq

    if refused := list(_outside(unit, uri)):
        yield from refused
        return

    image_col, caption_col = unit.columns
    with storage.open_seekable(uri) as f:  # a store that fails here is retryable (StorageError), not bad data
        try:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
        except storage.StorageError:
            raise
        except Exception as exc:  # unreadable file, not Parquet: one row says so
            yield f"{_name(uri)}#unreadable", {"error": f"{type(exc).__name__}: {exc}".encode()}
            return
        missing = [c for c in (image_col, caption_col) if c not in names]
        if missing:
            yield f"{_name(uri)}#unreadable", {"error": f"no column(s) {missing}; it has {names}".encode()}
            return
        wanted = [c for c in (image_col, caption_col, "label", "key") if c in names]
        at = 0
        for g in range(pf.metadata.num_row_groups):
            meta = pf.metadata.row_group(g)
            size = sum(
                meta.column(c).total_uncompressed_size
                for c in range(meta.num_columns)
                if meta.column(c).path_in_schema.split(".")[0] == image_col
            )
            if size > MAX_ROW_GROUP_BYTES:
                detail = (
                    f"row group {g}: its {image_col!r} column is {size} bytes decompressed, over {MAX_ROW_GROUP_BYTES}"
                )
                for i in range(meta.num_rows):
                    yield f"{_name(uri)}/{at + i:08d}", userdata.refused("too_large", detail)
            else:
                try:
                    table = pf.read_row_group(g, columns=wanted)
                except storage.StorageError:
                    raise
                except Exception as exc:  # a corrupt row group: its rows say so, the next ones are read
                    detail = f"row group {g}: {type(exc).__name__}: {str(exc)[:200]}"
                    for i in range(meta.num_rows):
                        yield f"{_name(uri)}/{at + i:08d}", {"error": detail.encode()}
                else:
                    yield from _rows(table, uri, image_col, caption_col, at)
            at += meta.num_rows


def _rows(table, uri: str, image_col: str, caption_col: str, at: int) -> Iterator[tuple[str, dict[str, bytes]]]:
    images = table.column(image_col).to_pylist()
    captions = table.column(caption_col).to_pylist()
    labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(images)
    keys = (
        table.column("key").to_pylist()
        if "key" in table.column_names
        else [f"{at + i:08d}" for i in range(len(images))]
    )
    for key, image, caption, label in zip(keys, images, captions, labels):
        parts: dict[str, bytes] = {}
        if isinstance(image, dict):  # Hugging Face's image struct {bytes, path}
            image = image.get("bytes")
        if isinstance(image, (bytes, bytearray)):
            parts["image"] = bytes(image)
        if isinstance(caption, (bytes, bytearray)):
            parts["txt"] = bytes(caption)
        elif isinstance(caption, str):
            parts["txt"] = caption.encode("utf-8", "surrogatepass")
        if label is not None:
            parts["cls"] = str(label).encode()
        if any(len(v) > userdata.MAX_PART_BYTES for v in parts.values()):
            parts = userdata.refused("too_large", f"a cell over the {userdata.MAX_PART_BYTES}-byte limit")
        yield f"{_name(uri)}/{key}", parts


def read_folder_image(unit: Unit, uri: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """One image of a folder, with its caption."""
    stem, _, ext = uri.rpartition(".")
    key = "/".join(stem.rsplit("/", 2)[-2:])
    caption = unit.captions.get(uri)
    outside = [
        u
        for u in (uri, caption if isinstance(caption, str) else None)
        if u is not None and unit.root and not storage.resolves_within(u, unit.root)
    ]
    if outside:
        yield (
            key,
            userdata.refused("decode_error", f"{_name(outside[0])} resolves outside the source's folder (a symlink)"),
        )
        return
    try:
        parts = {ext.lower(): storage.read_bytes(uri, max_bytes=userdata.MAX_PART_BYTES)}
        if isinstance(caption, str):  # a .txt beside the image
            parts["txt"] = storage.read_bytes(caption, max_bytes=userdata.MAX_PART_BYTES)
    except storage.TooLarge as exc:
        yield key, userdata.refused("too_large", str(exc))
        return
    if caption is not None and not isinstance(caption, str):  # its captions.jsonl record
        parts["json"] = json.dumps(caption).encode()
    yield key, parts  # no caption at all: a caption_empty row


def read(unit: Unit) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The raw samples of one unit, in order. Never raises for bad data: an unreadable or refused
    object is one sample with an `error` part (and its `reason`: a ledger row)."""
    reader = resolve(kinds.kind(unit.kind).read)
    for uri in unit.uris:
        yield from reader(unit, uri)
