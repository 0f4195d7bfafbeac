"""Image–caption alignment under an nmm model: the caption's mean log-likelihood per token given
the image, under the model's own tokenizers and prompt style (the model-based filter of
curation: DataComp's CLIP score, with the platform's native model)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nmm.data.sequences import pack_rows


def caption_scores(m, images: np.ndarray, captions: list[str], batch: int = 128) -> np.ndarray:
    """(N,) mean log-probability of each caption's tokens (and its end) given its image, under a
    loaded model `m` (nmm.serve.model_dir.LoadedModel); `images` (N, H, W, C) float in [0, 1],
    at the model's image shape."""
    codes = m.vq.encode(images)
    out = np.empty(len(captions), np.float64)
    for start in range(0, len(captions), batch):
        end = min(start + batch, len(captions))
        rows = [m.prompts.row(codes[i], m.text.encode(captions[i]), "m2t") for i in range(start, end)]
        tokens, mask = pack_rows(rows)
        x = torch.from_numpy(tokens.astype(np.int64))
        target = torch.from_numpy(mask[:, 1:].astype(np.float32))
        patches = (
            torch.from_numpy(m.vq.patches(images[start:end]).astype(np.float32)) if m.model.cfg.reads_pixels else None
        )
        with torch.no_grad():
            logits = m.model(x[:, :-1], patches=patches).float()
        logp = F.log_softmax(logits, -1).gather(-1, x[:, 1:, None])[..., 0]
        out[start:end] = ((logp * target).sum(1) / target.sum(1).clamp(min=1)).numpy()
    return out


def keep_top(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Which of the scored samples to keep: the best `fraction` (at least one; ties broken by
    position, so the choice is deterministic)."""
    k = max(1, int(np.ceil(fraction * len(scores))))
    order = np.lexsort((np.arange(len(scores)), -scores))
    keep = np.zeros(len(scores), bool)
    keep[order[:k]] = True
    return keep
