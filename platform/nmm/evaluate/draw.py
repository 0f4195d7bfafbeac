"""Draw images from captions (M2G) for the generation suites: the caption prompts, constrained
sampling of one image's codes, optional classifier-free guidance, codes decoded to pixels."""

from __future__ import annotations

import numpy as np
import torch

from nmm.data.sequences import Prompts, blank_text
from nmm.model.generate import generate
from nmm.tokenizers import ImageTokenizer, TextTokenizer


def draw(model, prompts: Prompts, text: TextTokenizer, vq: ImageTokenizer, captions: list[str], temperature: float,
         seed: int, guidance: float = 1.0) -> np.ndarray:
    """One image (N, H, W, C) per caption (instruction prompts cycle through the paraphrases).
    With guidance ≠ 1 each prompt's unconditional twin is the same prompt with its text padded
    out, as caption dropout trained it."""
    vocab = prompts.vocab
    asked = [prompts.draw(text.encode(c), k=i) for i, c in enumerate(captions)]
    blank = [blank_text(p, vocab.text_range()) for p in asked]
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    outs = generate(model, asked, max_new=vq.tokens_per_image, allowed=vocab.image_range(),
                    temperature=temperature, generator=g, guidance=guidance, uncond=blank)
    codes = np.array([[t - vocab.image_offset for t in o] for o in outs], dtype=np.int64)
    return vq.decode(codes)
