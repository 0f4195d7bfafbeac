"""From decisions to training data: the kept samples, in canonical order, as one SourceData with
each image's source (for the mixture), content id and split."""

from __future__ import annotations

import json

import numpy as np

from nmm.data.sources import SourceData
from nmm.data.stream import Examined


def apply_limits(cols: dict, reason: np.ndarray, limits: dict[str, int | None]) -> None:
    """A source's samples past its `limit` (counting kept ones, in the canonical order `cols` are
    in) become `over_limit` drops."""
    taken: dict[str, int] = {}
    for i, name in enumerate(cols["source"]):
        if reason[i]:
            continue
        taken[name] = taken.get(name, 0) + 1
        if limits.get(name) and taken[name] > limits[name]:
            reason[i] = "over_limit"


def kept(reason: np.ndarray) -> np.ndarray:
    """The kept rows, in canonical order."""
    return np.array([i for i, r in enumerate(reason) if not r], np.int64)


def _vqa(scene: dict, content_id: str, grounded_on: int | None):
    from nmm.data import shapes

    rng = np.random.default_rng(int(content_id[:12], 16))  # a user's scene: its questions follow from its content
    return shapes.vqa_pairs(shapes.scene_from_dict(scene), rng, grounded_on)


def source_data(
    ex: Examined,
    rows: np.ndarray,
    names: list[str],
    captions_per_image: int,
    builtin: dict[str, SourceData],
    grounded_on: int | None = None,
) -> tuple[SourceData, list[str], np.ndarray]:
    """(the kept samples, their content ids, each one's source index into `names`). `grounded_on`
    (the images' side): a user's scenes get grounded position answers (nmm.data.shapes.vqa_pairs)."""
    cols = ex.cols
    images = ex.pixels(rows).astype(np.float32) / 255.0
    captions = [json.loads(cols["captions"][i])[:captions_per_image] for i in rows]
    labels = np.asarray(cols["label"][rows], np.int64)
    src = [str(cols["source"][i]) for i in rows]
    with_scenes = any(cols["scene"][i] for i in rows)
    scenes = [json.loads(cols["scene"][i]) if cols["scene"][i] else None for i in rows] if with_scenes else None
    vqa = None
    if with_scenes:
        vqa = []
        for i, name in zip(rows, src):
            own = builtin.get(name)
            if not cols["scene"][i]:  # a sample without a scene (another source's): no questions
                vqa.append([])
            elif own is not None and own.vqa is not None:  # a built-in scene brings its own questions
                vqa.append(own.vqa[int(cols["order"][i]) & 0xFFFFFF])
            else:
                vqa.append(_vqa(json.loads(cols["scene"][i]), cols["content_id"][i], grounded_on))
    name = "+".join(dict.fromkeys(src)) or "+".join(names)
    data = SourceData(name, images, labels, captions, scenes, vqa)
    index = np.array([names.index(s) for s in src], np.int16)
    return data, [str(cols["content_id"][i]) for i in rows], index
