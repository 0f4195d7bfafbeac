"""Late fusion's separately trained image encoder: denoising patch reconstruction (a share of
the patches hidden) on the train images alone (no text, no labels), before the language model
ever sees it; frozen afterwards."""

from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)


def pretrain(
    encoder, patches: np.ndarray, steps: int, seed: int, batch_size: int = 64, lr: float = 2e-3, hide_ratio: float = 0.4
) -> float:
    """Train `encoder` (nmm.model.fusion.PatchEncoder) in place; a pure function of the seed.
    Returns the last reconstruction loss (MSE over all patches)."""
    pix = torch.from_numpy(patches.astype(np.float32))
    device = next(encoder.parameters()).device
    g = torch.Generator().manual_seed(seed + 104_729)
    opt = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=0.01)
    encoder.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        x = pix[torch.randint(len(pix), (batch_size,), generator=g)].to(device)
        hide = (torch.rand(x.shape[:2], generator=g) < hide_ratio).to(device)
        loss = encoder.reconstruction_loss(x, hide)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % max(1, steps // 5) == 0:
            logger.info("encoder step %d/%d: reconstruction loss %.5f", step + 1, steps, loss.item())
    return loss.item()
