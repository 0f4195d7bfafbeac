"""Raw-data sources. Each returns images (N, H, W, C) float32 in [0, 1], labels and captions.

- `digits`: scikit-learn's 1,797 real 8x8 handwritten digits (shipped inside scikit-learn).
- `shapes`: GenEval-style procedural scenes (nmm.data.shapes) with caption paraphrases.
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
    """GenEval-style scenes (nmm.data.shapes): the six tasks in turn, with caption paraphrases."""
    from nmm.data import shapes

    scenes = shapes.generate(samples, size, seed)
    images = np.stack([shapes.render(sc.objects, size) for sc in scenes])
    caps = [shapes.captions(sc)[:captions_per_image] for sc in scenes]
    return SourceData("shapes", images, np.full(samples, -1, np.int64), caps)
