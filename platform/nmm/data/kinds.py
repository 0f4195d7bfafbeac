"""Data source kinds, registered by name (a pipeline's `data.sources[].kind`).

A built-in kind is generated here (`load`: every sample at once, small and clean by construction);
a kind of yours is read from objects at a URI through one reader protocol: `units(src, objects,
start, root)` cuts the listed objects into units of work (what one Ray task reads, numbered in
canonical order) and `read(unit, uri)` yields one object's raw samples `(key, parts)`, never
raising for bad data (nmm.data.readers). Implementations are named "module:attribute" and
imported when used, so the spec validates sources without importing a reader.

Adding a kind: its reader (or loader) module, and its entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from nmm.data.sources import DIGITS_SIDE
from nmm.modalities import modality
from nmm.plugins import entry

IMAGE_SUFFIXES = modality("image").suffixes  # the image files a folder source reads


@dataclass(frozen=True)
class SourceKind:
    name: str
    summary: str  # one line for the spec reference
    built_in: bool
    # built in: "module:attribute" of its loader (captions_per_image, samples, image_size, seed,
    # grounded_on) -> SourceData; the side and channels it yields (None: the source's imageSize)
    load: str = ""
    side: int | None = None
    channels: int | None = None
    min_side: int = 8  # the smallest imageSize it takes
    # yours: the object names it lists, what they are called in an error, the reader protocol
    suffixes: tuple[str, ...] = ()
    objects: str = ""
    units: str = ""  # "module:attribute" (src, objects, start, root) -> list[Unit]
    read: str = ""  # "module:attribute" (unit, uri) -> Iterator[(key, parts)]
    folder: bool = False  # its URI names a folder read file by file (a plain path is a prefix to list)
    hint: str = ""  # added to "matches nothing"
    check: str = ""  # "module:attribute" (source) -> None, ValueError naming the option: its own options' checks
    modalities: tuple[str, ...] = ("text", "image")  # what its samples hold (nmm.modalities' names)


SOURCE_KINDS: dict[str, SourceKind] = {
    k.name: k
    for k in (
        SourceKind(
            "digits",
            "scikit-learn's 1,797 real 8×8 handwritten digits",
            built_in=True,
            load="nmm.data.sources:load_digits_source",
            side=DIGITS_SIDE,
            channels=1,
        ),
        SourceKind(
            "shapes",
            "procedural GenEval-style scenes of coloured shapes, with captions and VQA pairs",
            built_in=True,
            load="nmm.data.sources:render_shapes_source",
            channels=3,
            min_side=24,
            check="nmm.data.shapes:check_source",
        ),
        SourceKind(
            "webdataset",
            "WebDataset tar shards: <key>.jpg|png|webp + <key>.txt or .json",
            built_in=False,
            suffixes=(".tar",),
            objects=".tar shards",
            units="nmm.data.readers:grouped_units",
            read="nmm.data.readers:read_tar",
            hint=" (write some with `nmm data export --source digits --format webdataset --out …`)",
        ),
        SourceKind(
            "parquet",
            "Parquet files of image bytes and captions (`columns`)",
            built_in=False,
            suffixes=(".parquet",),
            objects=".parquet files",
            units="nmm.data.readers:grouped_units",
            read="nmm.data.readers:read_parquet",
        ),
        SourceKind(
            "folder",
            "a folder of images with captions.jsonl or a .txt beside each",
            built_in=False,
            suffixes=(*IMAGE_SUFFIXES, ".txt", ".jsonl"),
            objects="images",
            units="nmm.data.readers:folder_units",
            read="nmm.data.readers:read_folder_image",
            folder=True,
        ),
    )
}
BUILT_IN = tuple(k for k, v in SOURCE_KINDS.items() if v.built_in)
YOURS = tuple(k for k, v in SOURCE_KINDS.items() if not v.built_in)


def kind(name: str) -> SourceKind:
    return entry(SOURCE_KINDS, name, "kind")
