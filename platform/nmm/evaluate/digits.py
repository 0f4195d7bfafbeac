"""The digits suites.

- `m2t.digits.accuracy`: caption held-out real digits; the parsed digit must be the label.
- `m2g.digits.accuracy`: draw an image for "digit k"; the independent judge must read k.
"""

from __future__ import annotations

import numpy as np

from nmm.data.sequences import Prompts
from nmm.data.sources import digit_prompt, parse_digit
from nmm.evaluate.draw import draw
from nmm.model.generate import generate
from nmm.tokenizers import ImageTokenizer, TextTokenizer
from nmm.tokenizers.vocab import EOS


def m2t_accuracy(
    model,
    prompts: Prompts,
    text: TextTokenizer,
    codes: np.ndarray,
    labels: np.ndarray,
    patches: np.ndarray | None = None,
):
    """`patches`: the images' raw patch pixels, for mid and late fusion (their codes then only
    mark where the image sits). Instruction prompts cycle through the paraphrases."""
    vocab = prompts.vocab
    asked = [prompts.caption(c, k=i) for i, c in enumerate(codes)]
    outs = generate(
        model, asked, max_new=24, allowed=vocab.text_range(), stop=EOS, extra_allowed=(EOS,), patches=patches
    )
    captions = [text.decode(vocab.text_local(o)) for o in outs]
    parsed = [parse_digit(c) for c in captions]
    correct = [p == int(y) for p, y in zip(parsed, labels)]
    return float(np.mean(correct)) if correct else 0.0, captions


def m2g_generate(
    model, prompts: Prompts, text: TextTokenizer, vq: ImageTokenizer, per_class: int, temperature: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Generate `per_class` images for each digit 0-9, prompts cycling the caption templates."""
    labels = np.repeat(np.arange(10), per_class)
    captions = [digit_prompt(int(k), i) for i, k in enumerate(labels)]
    return draw(model, prompts, text, vq, captions, temperature, seed), labels
