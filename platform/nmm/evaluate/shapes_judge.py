"""A GenEval-style judge for shapes scenes: it reads pixels only (never the generator's state).

Detection: each pixel takes the nearest of GenEval's ten colours or the grey ground; connected
components per colour (scipy) above a minimum area are objects; the shape comes from how much of
its bounding box the object fills (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2).
Scoring, binary per image as in GenEval: single/two objects present; counting exact (one extra
fails); colour of the named object; position by box centres with GenEval's 0.1 margin; colour
attribution needs both shape+colour pairs. Overall = mean of the six task means.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nmm.data.shapes import BACKGROUND, COLOURS, TASKS, Obj, Scene, placement, relation_holds

PALETTE_NAMES = ("background", *COLOURS)
PALETTE = np.array([BACKGROUND, *COLOURS.values()], np.float32)


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    box: tuple[float, float, float, float]
    area: int


def classify_shape(fill: float) -> str:
    if fill > 0.9:
        return "square"
    if fill > 0.64:
        return "circle"
    return "triangle"


def detect(image: np.ndarray, min_area: int | None = None) -> list[Detection]:
    from scipy import ndimage

    h, w, _ = image.shape
    min_area = min_area or max(6, (h * w) // 200)
    dist = ((image[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)
    labels = dist.argmin(-1)
    out = []
    for ci in range(1, len(PALETTE)):
        comp, n = ndimage.label(labels == ci)
        for k in range(1, n + 1):
            ys, xs = np.nonzero(comp == k)
            if len(ys) < min_area:
                continue
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            fill = len(ys) / float((x1 - x0) * (y1 - y0))
            out.append(
                Detection(
                    classify_shape(fill), PALETTE_NAMES[ci], (float(x0), float(y0), float(x1), float(y1)), len(ys)
                )
            )
    return out


def placements(image: np.ndarray) -> list[tuple[str, str, str, str]]:
    """The objects detected in the image as a layout words them (nmm.data.shapes.placement),
    sorted: colour, shape and the grid cell of the box's centre."""
    side = image.shape[1]
    return sorted(
        placement(Obj(d.shape, d.colour, (d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2, 0), side)
        for d in detect(image)
    )


def score(scene: Scene, image: np.ndarray) -> bool:
    """Does the image satisfy the scene's prompt (GenEval rules)?"""
    dets = detect(image)
    by_shape = {s["shape"]: [d for d in dets if d.shape == s["shape"]] for s in scene.include}
    for want in scene.include:
        found = by_shape[want["shape"]]
        if scene.task == "counting":
            if len(found) != want["count"]:
                return False
        elif not found:
            return False
        if "colour" in want and not any(d.colour == want["colour"] for d in found):
            return False
    if scene.task == "position":
        a, b = (by_shape[s["shape"]] for s in scene.include)
        return any(relation_holds(x.box, y.box, scene.relation) for x in a for y in b)
    return True


def evaluate(scenes: list[Scene], images: np.ndarray) -> dict[str, float]:
    """Per-task accuracy and `overall` (mean of the six task means)."""
    hits: dict[str, list[bool]] = {t: [] for t in TASKS}
    for scene, image in zip(scenes, images):
        hits[scene.task].append(score(scene, image))
    out = {t: float(np.mean(v)) for t, v in hits.items() if v}
    out["overall"] = float(np.mean([out[t] for t in TASKS if t in out]))
    return out
