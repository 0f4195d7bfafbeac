"""Draw images from captions (M2G) for the generation suites: the caption prompts, the model's
plan when it writes one, constrained sampling of one image's codes, optional classifier-free
guidance, codes decoded to pixels."""

from __future__ import annotations

import numpy as np
import torch

from nmm.data.sequences import Prompts, blank_text
from nmm.model.generate import draw_images
from nmm.tokenizers import ImageTokenizer, TextTokenizer
from nmm.tokenizers.vocab import BOI


def draw_planned(model, prompts: Prompts, text: TextTokenizer, vq: ImageTokenizer, captions: list[str],
                 temperature: float, seed: int, guidance: float = 1.0) -> tuple[np.ndarray, list[str]]:
    """One image (N, H, W, C) per caption (instruction prompts cycle through the paraphrases),
    and the plan the model wrote before each ("" when it writes none). With guidance ≠ 1 each
    prompt's unconditional twin is the same prompt with its text padded out, as caption dropout
    trained it."""
    vocab = prompts.vocab
    asked = [prompts.draw(text.encode(c), k=i) for i, c in enumerate(captions)]
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    heads, outs = draw_images(model, asked, vq.tokens_per_image, vocab.image_range(),
                              plan_range=vocab.text_range() if prompts.plans else None,
                              blank=lambda p: blank_text(p, vocab.text_range()), temperature=temperature, generator=g,
                              guidance=guidance)
    codes = np.array([[t - vocab.image_offset for t in o] for o in outs], dtype=np.int64)
    plans = [text.decode(vocab.text_local(t for t in h if t != BOI)).strip() for h in heads]
    return vq.decode(codes), plans


def draw(model, prompts: Prompts, text: TextTokenizer, vq: ImageTokenizer, captions: list[str], temperature: float,
         seed: int, guidance: float = 1.0) -> np.ndarray:
    """The images of `draw_planned`."""
    return draw_planned(model, prompts, text, vq, captions, temperature, seed, guidance)[0]
