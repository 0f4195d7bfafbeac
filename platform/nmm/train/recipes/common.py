"""What the recipes share: target masks, the image spans bidirectional attention sees whole,
the student's on-policy samples (opd, grpo), and a pretrain/sft batch laid out the way the model
reads it.

With bidirectional image attention the M2T rows' images are inputs seen whole (M2G rows draw
theirs causally), and the targets inside such an image leave every recipe's loss.
"""

from __future__ import annotations

import torch

from nmm.model import ModelConfig
from nmm.model.generate import draw_images, generate
from nmm.model.transformer import image_spans
from nmm.tokenizers.vocab import BOI, EOI, EOS, PAD, blank_text


def pretrain_mask(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Every token is a target except padding (and, for mid/late fusion, the image positions,
    whose inputs are pixels rather than tokens)."""
    m = x != PAD
    if cfg.reads_pixels:
        m &= ~((x >= cfg.image_lo) & (x < cfg.image_hi))
    return m.long()


def input_image_spans(x: torch.Tensor, cfg: ModelConfig, given: torch.Tensor) -> torch.Tensor | None:
    """The input images of the batch's `given` rows, seen whole under bidirectional image
    attention (nmm.model.transformer.image_spans); None when attention is causal."""
    if cfg.image_attention != "bidirectional":
        return None
    return image_spans(x, cfg.image_range, cfg.tokens_per_image, given)


def hide_seen_targets(m: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Drop the targets a bidirectional image gives away: a code predicted from a position of
    its own image, which already sees it. (The image's first code, predicted from <boi>, stays.)"""
    m = m.clone()
    m[:, 1:] *= ~((spans[:, 1:] > 0) & (spans[:, 1:] == spans[:, :-1]))
    return m


@torch.no_grad()
def student_samples(
    model,
    x: torch.Tensor,
    m: torch.Tensor,
    patches: torch.Tensor | None,
    image_range,
    text_range,
    temperature: float,
    guidance: float = 1.0,
    drawing: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """On-policy rollouts: each row's prompt (the tokens before its first target) continued by
    the student, text rows until <eos>, drawing rows for a whole image then <eoi> (with
    classifier-free `guidance` against the prompt with its text padded out). `drawing`: the rows
    that draw (M2G), a drawing row whose first target is not an image code writes its plan first
    (nmm.model.generate.draw_images); by default the rows whose first target is an image code.
    Returns the right-padded sequences and a mask of the positions the student sampled (the plan
    and its <boi> when the student wrote them, the image's codes)."""
    first = m.argmax(1).tolist()
    lengths = m.sum(1).tolist()
    opens_image = [image_range[0] <= int(x[i, first[i]]) < image_range[1] for i in range(len(x))]
    is_image = opens_image if drawing is None else [bool(d) for d in drawing.tolist()]
    per_image = ((x >= image_range[0]) & (x < image_range[1]) & (m > 0)).sum(1).tolist()
    # each row: its prompt, then (tokens, whether the student sampled them) pieces
    pieces: list[list[tuple[list[int], int]]] = [[] for _ in range(len(x))]
    for want_image in (False, True):
        idx = [i for i in range(len(x)) if is_image[i] == want_image]
        if not idx:
            continue
        prompts = [x[i, : first[i]].tolist() for i in idx]
        pix = None if patches is None else patches[idx].cpu().numpy()
        if want_image:
            plans = not all(opens_image[i] for i in idx)
            heads, outs = draw_images(
                model,
                prompts,
                int(max(per_image[i] for i in idx)),
                image_range,
                plan_range=text_range if plans else None,
                blank=lambda p: blank_text(p, text_range),
                temperature=temperature,
                guidance=guidance,
                patches=pix,
            )
            tails = [
                [(h, 1), ([BOI] if plans and h[-1:] != [BOI] else [], 0), (o, 1), ([EOI], 0)]
                for h, o in zip(heads, outs)
            ]
        else:
            n = int(max(lengths[i] for i in idx))
            outs = generate(
                model, prompts, n, text_range, stop=EOS, extra_allowed=(EOS,), temperature=temperature, patches=pix
            )
            tails = [[(o + [EOS], 1)] if len(o) < n else [(o, 1)] for o in outs]
        for i, p, tail in zip(idx, prompts, tails):
            pieces[i] = [(p, 0), *tail]
    return _right_padded(pieces, model.cfg.max_seq_len, x.device)


def _right_padded(pieces: list[list[tuple[list[int], int]]], max_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (tokens, sampled or not) pieces → the right-padded sequences (cut at `max_len`)
    and the mask of the sampled positions."""
    seqs = [[t for toks, _ in row for t in toks] for row in pieces]
    sampled = [[s for toks, s in row for _ in toks] for row in pieces]
    width = min(max(len(q) for q in seqs), max_len)
    out = torch.full((len(pieces), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(pieces), width), dtype=torch.long)
    for i, (q, sm) in enumerate(zip(seqs, sampled)):
        out[i, : len(q[:width])] = torch.tensor(q[:width])
        mask[i, : len(sm[:width])] = torch.tensor(sm[:width])
    return out.to(device), mask.to(device)
