"""Rewards of the `grpo` recipe: verifiable scores of the policy's completions.

A reward scores the completions of one task's rows (M2T: the answer written; M2G: the image
drawn): `fn(rows, tokens, sampled)` gets each completion's row in the training data, the whole
sequences (prompt and completion, right-padded) and the mask of the sampled positions, all on
the host, and returns one float per completion. The trainer scores each row with the rewards of
its task and sums them with the phase's weights.

The scores that need a judge (the digits classifier, the shapes GenEval rules) are built by the
train stage from nmm.evaluate and handed in; `answer_exact` needs only the data's tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from nmm.tokenizers.vocab import EOS, PAD

RewardFn = Callable[[np.ndarray, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Reward:
    name: str
    task: str  # "m2t" or "m2g": the rows it scores
    fn: RewardFn


def _answer(tokens) -> list[int]:
    return [int(t) for t in tokens if int(t) not in (EOS, PAD)]


def answer_exact(data_tokens: np.ndarray, data_mask: np.ndarray) -> RewardFn:
    """`vqa_exact`: 1 when the written answer is exactly the row's reference answer (the data's
    targets: the VQA answer, or the caption), else 0. Tokens are compared, so the match is
    exact-string (the tokenizer is lossless) and costs nothing."""

    def score(rows: np.ndarray, tokens: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(rows))
        for i, r in enumerate(rows):
            want = _answer(data_tokens[r][data_mask[r] == 1])
            got = _answer(tokens[i][sampled[i] == 1].tolist())
            out[i] = float(got == want)
        return out

    return score


def drawn_images(
    tokens: torch.Tensor, sampled: torch.Tensor, image_range: tuple[int, int], tokens_per_image: int
) -> np.ndarray:
    """The image codes each completion drew, (N, tokens_per_image), shifted to 0-based codes;
    a completion cut short by the context is padded with code 0."""
    out = np.zeros((len(tokens), tokens_per_image), np.int64)
    for i in range(len(tokens)):
        codes = [
            int(t) - image_range[0]
            for t in tokens[i][sampled[i] == 1].tolist()
            if image_range[0] <= int(t) < image_range[1]
        ]
        codes = codes[:tokens_per_image]
        out[i, : len(codes)] = codes
    return out
