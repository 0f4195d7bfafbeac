"""Raw-data sources. Each returns images (N, H, W, C) float32 in [0, 1], labels and captions.

- `digits`: scikit-learn's 1,797 real 8x8 handwritten digits (shipped inside scikit-learn).
- `shapes`: procedural scenes of coloured shapes at positions, with templated captions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a handwritten digit {d}",
    "the number {w}",
    "a scanned {d}",
    "an image of the digit {w}",
)
COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.7, 0.2),
    "blue": (0.1, 0.2, 0.9),
    "yellow": (0.95, 0.9, 0.1),
}
SHAPES = ("square", "circle", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")


@dataclass
class SourceData:
    name: str
    images: np.ndarray  # (N, H, W, C) float32
    labels: np.ndarray  # (N,) int64, -1 when the source has no class
    captions: list[list[str]]  # per image, all paraphrases


def _pick(key: bytes, n: int, k: int) -> list[int]:
    """k distinct template indices out of n, chosen from a content hash (deterministic)."""
    h = hashlib.sha256(key).digest()
    order = sorted(range(n), key=lambda i: h[i])
    return order[:k]


def digit_captions(label: int, key: bytes, k: int) -> list[str]:
    return [
        DIGIT_TEMPLATES[i].format(d=label, w=DIGIT_WORDS[label])
        for i in _pick(key, len(DIGIT_TEMPLATES), k)
    ]


def digit_prompt(label: int, variant: int = 0) -> str:
    t = DIGIT_TEMPLATES[variant % len(DIGIT_TEMPLATES)]
    return t.format(d=label, w=DIGIT_WORDS[label])


def parse_digit(text: str) -> int | None:
    """The digit a caption names (numeral or word), or None."""
    for tok in text.replace(",", " ").split():
        if tok.isdigit() and len(tok) == 1:
            return int(tok)
        if tok in DIGIT_WORDS:
            return DIGIT_WORDS.index(tok)
    return None


def load_digits(captions_per_image: int) -> SourceData:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = (d.images.astype(np.float32) / 16.0)[..., None]
    labels = d.target.astype(np.int64)
    caps = [
        digit_captions(int(y), img.tobytes(), captions_per_image) for img, y in zip(images, labels)
    ]
    return SourceData("digits", images, labels, caps)


def render_shapes(samples: int, size: int, seed: int, captions_per_image: int) -> SourceData:
    """One coloured shape per scene in one of four quadrants, on a white background."""
    rng = np.random.default_rng(seed)
    images = np.ones((samples, size, size, 3), np.float32)
    labels = np.full(samples, -1, np.int64)
    caps: list[list[str]] = []
    half = size // 2
    yy, xx = np.mgrid[0:half, 0:half]
    for i in range(samples):
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        pos = rng.integers(len(POSITIONS))
        r = half / 2 - 1
        cy = cx = half / 2 - 0.5
        if shape == "square":
            mask = (abs(yy - cy) <= r * 0.8) & (abs(xx - cx) <= r * 0.8)
        elif shape == "circle":
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        else:
            mask = (yy >= cy - r) & (yy <= cy + r) & (abs(xx - cx) <= (yy - (cy - r)) / 2)
        oy, ox = (pos // 2) * half, (pos % 2) * half
        tile = images[i, oy : oy + half, ox : ox + half]
        tile[mask] = COLOURS[colour]
        where = POSITIONS[pos]
        options = [
            f"a {colour} {shape} in the {where}",
            f"a {shape} coloured {colour} at the {where}",
            f"one {colour} {shape}, {where}",
        ]
        caps.append([options[j] for j in _pick(images[i].tobytes(), len(options), captions_per_image)])
    return SourceData("shapes", images, labels, caps)
