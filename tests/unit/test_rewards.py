"""The grpo rewards the train stage builds (nmm.stages.train.rewards) on real digits and shapes:
a completion that draws the prompt's own image scores, one that draws another image does not."""

import dataclasses

import numpy as np
import torch

from nmm.data.sources import load_digits, render_shapes
from nmm.model import ModelConfig
from nmm.stages.train import rewards
from nmm.tokenizers.image import PatchVQ
from nmm.tokenizers.vocab import BOS, EOI, SharedVocab
from nmm.train.recipes import GrpoOptions
from nmm.train.trainer import PhaseConfig, TrainConfig


@dataclasses.dataclass
class Split:
    arrays: dict
    scenes: list | None


class Dataset:
    """What `rewards` reads of a curated dataset: the train split, the image tokenizer, the vocabulary."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, scenes, patch: int, codebook: int):
        self.images = (images * 255).round().astype(np.uint8)  # as curate stores them
        self._split = Split({"images": self.images, "labels": labels}, scenes)
        self.vq = PatchVQ.fit(self.images.astype(np.float32) / 255.0, patch, codebook)
        self.vocab = SharedVocab(text_size=20, image_size=self.vq.size)

    def split(self, name):
        return self._split

    def image_tokenizer(self):
        return self.vq


def cfg(reward: str, tokens_per_image: int) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(vocab_size=64, dim=8, layers=1, heads=1, max_seq_len=8, tokens_per_image=tokens_per_image),
        phases=(
            PhaseConfig(
                name="rl",
                steps=1,
                batch_size=1,
                lr=1e-3,
                mixture={"m2g": 1.0},
                recipe="grpo",
                options=GrpoOptions(reference="pre", reward=((reward, 1.0),)),
            ),
        ),
    )


def completions(ds: Dataset, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """<bos> <prompt word> then the codes of `images`, then <eoi>; the codes marked as sampled."""
    codes = ds.vocab.image_ids(ds.vq.encode(images.astype(np.float32) / 255.0).astype(np.int64))
    n, t = codes.shape
    x = torch.cat(
        [
            torch.full((n, 1), BOS),
            torch.full((n, 1), ds.vocab.text_offset),
            torch.from_numpy(codes),
            torch.full((n, 1), EOI),
        ],
        1,
    )
    sampled = torch.zeros_like(x)
    sampled[:, 2 : 2 + t] = 1
    return x, sampled


def score(ds: Dataset, name: str, drawn: np.ndarray, rows: np.ndarray) -> float:
    fn = rewards(cfg(name, ds.vq.tokens_per_image), ds, {"row_image": np.arange(len(ds.images))})[name].fn
    x, sampled = completions(ds, drawn)
    return float(fn(rows, x, sampled).mean())


def test_digits_judge_scores_the_prompted_digit_and_not_another():
    src = load_digits(1)
    ds = Dataset(src.images, src.labels, None, patch=2, codebook=32)
    rows = np.arange(0, 400, 2)
    own = score(ds, "digits_judge", ds.images[rows], rows)
    other = np.array([next(j for j in range(len(src.labels)) if src.labels[j] != src.labels[r]) for r in rows])
    wrong = score(ds, "digits_judge", ds.images[other], rows)
    assert own > 0.8 and wrong < 0.15, (own, wrong)  # measured 1.0 and 0.0


def test_shapes_geneval_scores_the_prompted_scene_and_not_another():
    src = render_shapes(120, 32, 0, 1)
    ds = Dataset(src.images, src.labels, src.scenes, patch=2, codebook=64)  # (rendered as floats in [0, 1])
    rows = np.arange(120)
    own = score(ds, "shapes_geneval", ds.images, rows)
    wrong = score(ds, "shapes_geneval", ds.images[np.roll(rows, 7)], rows)
    assert own > 0.9 and wrong < 0.3, (own, wrong)  # measured 0.97 and 0.13
