"""Read a curated dataset back: its manifest, split shards, tokenizers and vocabulary."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nmm import modalities, storage
from nmm.data.shards import decode_shard
from nmm.plugins import resolve
from nmm.tokenizers import ImageTokenizer, SharedVocab, TextTokenizer

ROW_COLUMNS = ("tokens", "loss_mask", "task", "style", "row_image")  # one entry per sequence, not per image


class DatasetError(RuntimeError):
    """The dataset URI has no published manifest, or its files do not match it."""


@dataclass
class Split:
    arrays: dict[str, np.ndarray]
    captions: list[list[str]]
    ids: list[str]
    scenes: list[dict] | None = None  # shapes: each image's ground-truth scene
    vqa: list[list[list[str]]] | None = None  # shapes: each image's (question, answer, kind)s

    def images_where(self, keep: np.ndarray) -> Split:
        """The images (and their per-image columns) where `keep` holds; per-row columns (tokens…)
        are left out. How a suite grades only the samples that carry its ground truth."""
        n = len(self.ids)
        idx = np.flatnonzero(keep)
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]
        arrays = {k: v[idx] for k, v in self.arrays.items() if len(v) == n and k not in ROW_COLUMNS}
        return Split(arrays, pick(self.captions), pick(self.ids), pick(self.scenes), pick(self.vqa))


@dataclass
class Dataset:
    uri: str
    manifest: dict
    _splits: dict = field(default_factory=dict, repr=False)  # read once: evaluation asks often
    _image_tokenizer: ImageTokenizer | None = field(
        default=None, repr=False
    )  # read once: the train stage asks four times

    @classmethod
    def open(cls, uri: str) -> Dataset:
        manifest = storage.read_manifest(uri)
        if manifest is None:
            raise DatasetError(f"no dataset at {uri}: its manifest.json is missing")
        return cls(uri, manifest)

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def vocab(self) -> SharedVocab:
        return SharedVocab(**self.manifest["vocab"])

    def tokenizer(self, modality: str):
        """The dataset's fitted tokenizer of `modality` (nmm.modalities: its file and its loader)."""
        m = modalities.modality(modality)
        return resolve(m.tokenizer)(storage.read_file(self.uri, self.manifest, m.tokenizer_file))

    def text_tokenizer(self) -> TextTokenizer:
        return self.tokenizer("text")

    def image_tokenizer(self) -> ImageTokenizer:
        if self._image_tokenizer is None:
            self._image_tokenizer = self.tokenizer("image")
        return self._image_tokenizer

    def split(self, name: str) -> Split:
        if name not in self._splits:
            self._splits[name] = self._read_split(name)
        return self._splits[name]

    def _read_split(self, name: str) -> Split:
        parts = [s for s in self.manifest["shards"] if s["split"] == name]
        if not parts:
            raise DatasetError(f"dataset {self.uri} has no {name!r} split")
        arrays: dict[str, list[np.ndarray]] = {}
        captions: list[list[str]] = []
        ids: list[str] = []
        extra: dict[str, list] = {"scenes": [], "vqa": []}
        offset = 0
        for shard in parts:
            a, meta = decode_shard(storage.read_file(self.uri, self.manifest, shard["file"]))
            a["row_image"] = a["row_image"] + offset
            offset += len(a["images"])
            for k, v in a.items():
                arrays.setdefault(k, []).append(v)
            captions += meta["captions"]
            ids += meta["ids"]
            for k in extra:
                extra[k] += meta.get(k, [])
        return Split(
            {k: np.concatenate(v) for k, v in arrays.items()},
            captions,
            ids,
            extra["scenes"] or None,
            extra["vqa"] or None,
        )
