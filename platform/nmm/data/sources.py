"""Raw-data sources. Each returns images (N, H, W, C) float32 in [0, 1], labels and captions.

- `digits`: scikit-learn's 1,797 real 8x8 handwritten digits (shipped inside scikit-learn).
- `shapes`: GenEval-style procedural scenes (nmm.data.shapes) with caption paraphrases.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

DIGITS_SIDE = 8  # scikit-learn's digits are 8×8 pixels
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
    # shapes only: each image's scene (ground truth for the judge) and (question, answer, kind)s
    scenes: list[dict] | None = None
    vqa: list[list[tuple[str, str, str]]] | None = None

    def subset(self, idx) -> SourceData:
        idx = [int(i) for i in idx]
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]
        return SourceData(
            self.name, self.images[idx], self.labels[idx], pick(self.captions), pick(self.scenes), pick(self.vqa)
        )

    def sample_texts(self, i: int) -> list[str]:
        """Image i's texts: its captions, then question, answer, question, answer, …"""
        qa = [t for q, a, _ in self.vqa[i] for t in (q, a)] if self.vqa is not None else []
        return [*self.captions[i], *qa]

    def texts(self, idx) -> list[str]:
        """Every text of the given images (what a text tokenizer learns from)."""
        return [t for i in idx for t in self.sample_texts(int(i))]


def _pick(key: bytes, n: int, k: int) -> list[int]:
    """k distinct template indices out of n, chosen from a content hash (deterministic)."""
    h = hashlib.sha256(key).digest()
    order = sorted(range(n), key=lambda i: h[i])
    return order[:k]


def digit_captions(label: int, key: bytes, k: int) -> list[str]:
    return [DIGIT_TEMPLATES[i].format(d=label, w=DIGIT_WORDS[label]) for i in _pick(key, len(DIGIT_TEMPLATES), k)]


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
    caps = [digit_captions(int(y), img.tobytes(), captions_per_image) for img, y in zip(images, labels)]
    return SourceData("digits", images, labels, caps)


def load(
    kind: str, captions_per_image: int, samples: int, image_size: int, seed: int, grounded_on: int | None = None
) -> SourceData:
    """A built-in source by name (nmm.data.kinds): its loader with the source's options."""
    from nmm.data import kinds
    from nmm.plugins import resolve

    info = kinds.kind(kind)
    if not info.built_in:
        raise ValueError(f"kind: {kind} is not a built-in source; expected one of {list(kinds.BUILT_IN)}")
    return resolve(info.load)(captions_per_image, samples, image_size, seed, grounded_on)


def load_digits_source(
    captions_per_image: int, samples: int, image_size: int, seed: int, grounded_on: int | None
) -> SourceData:
    """`digits`: all of them (samples, size, seed and grounded answers are shapes' own)."""
    return load_digits(captions_per_image)


def render_shapes_source(
    captions_per_image: int, samples: int, image_size: int, seed: int, grounded_on: int | None
) -> SourceData:
    return render_shapes(samples, image_size, seed, captions_per_image, grounded_on)


def render_shapes(
    samples: int, size: int, seed: int, captions_per_image: int, grounded_on: int | None = None
) -> SourceData:
    """GenEval-style scenes (nmm.data.shapes): the six tasks in turn, with caption paraphrases,
    VQA pairs (`grounded_on`: grounded position answers, shapes.vqa_pairs) and each scene's ground truth."""
    from nmm.data import shapes

    scenes = shapes.generate(samples, size, seed)
    images = np.stack([shapes.render(sc.objects, size) for sc in scenes])
    caps = [shapes.captions(sc)[:captions_per_image] for sc in scenes]
    rng = np.random.default_rng([seed, 1])
    vqa = [shapes.vqa_pairs(sc, rng, grounded_on) for sc in scenes]
    return SourceData(
        "shapes", images, np.full(samples, -1, np.int64), caps, [shapes.scene_to_dict(sc) for sc in scenes], vqa
    )
