"""Draw images from captions (M2G) for the generation suites, through the one drawing path
(nmm.model.generate.draw): the caption prompts, the model's plan when it writes one,
constrained sampling of one image's codes, optional classifier-free guidance, pixels."""

from __future__ import annotations

import numpy as np
import torch

from nmm.data.sequences import Prompts
from nmm.model.generate import draw as draw_path
from nmm.tokenizers import ImageTokenizer, TextTokenizer
from nmm.tokenizers.vocab import BOI


def draw_planned(
    model,
    prompts: Prompts,
    text: TextTokenizer,
    vq: ImageTokenizer,
    captions: list[str],
    temperature: float,
    seed: int,
    guidance: float = 1.0,
) -> tuple[np.ndarray, list[str]]:
    """One image (N, H, W, C) per caption (instruction prompts cycle through the paraphrases),
    and the plan the model wrote before each ("" when it writes none). With guidance ≠ 1 each
    prompt's unconditional twin is the same prompt with its text padded out, as caption dropout
    trained it."""
    vocab = prompts.vocab
    asked = [prompts.draw(text.encode(c), k=i) for i, c in enumerate(captions)]
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    drawn = draw_path(
        model, asked, vq, vocab, plans=prompts.plans, temperature=temperature, generator=g, guidance=guidance
    )
    plans = [text.decode(vocab.text_local(t for t in h if t != BOI)).strip() for h in drawn.plans]
    return drawn.pixels, plans


def draw(
    model,
    prompts: Prompts,
    text: TextTokenizer,
    vq: ImageTokenizer,
    captions: list[str],
    temperature: float,
    seed: int,
    guidance: float = 1.0,
) -> np.ndarray:
    """The images of `draw_planned`."""
    return draw_planned(model, prompts, text, vq, captions, temperature, seed, guidance)[0]
