"""Next-token loss over the shared vocabulary with z-loss, reported per modality."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    image_range: tuple[int, int],
    z_loss: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logits (B, T, V) predict tokens[:, 1:]; only targets with loss_mask = 1 count.

    z-loss (PaLM/Chameleon) penalises log(Z)^2 to keep the softmax normaliser near 1.
    Returns the scalar to minimise and detached parts: ce, z, ce on text and on image targets,
    mean logit norm on text and on image targets, and target token counts per modality.
    """
    logits = logits[:, :-1].float()
    targets = tokens[:, 1:].long()
    mask = loss_mask[:, 1:].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    ce = ce.view_as(mask)
    logz = torch.logsumexp(logits, dim=-1)
    denom = mask.sum().clamp(min=1.0)
    ce_mean = (ce * mask).sum() / denom
    z_mean = (logz.pow(2) * mask).sum() / denom
    is_image = ((targets >= image_range[0]) & (targets < image_range[1])).float() * mask
    is_text = mask - is_image
    norms = logits.detach().norm(dim=-1)  # Chameleon's divergence signal, per modality
    parts = {
        "ce": ce_mean.detach(),
        "z": z_mean.detach(),
        "ce_text": ((ce * is_text).sum() / is_text.sum().clamp(min=1.0)).detach(),
        "ce_image": ((ce * is_image).sum() / is_image.sum().clamp(min=1.0)).detach(),
        "logit_norm_text": (norms * is_text).sum() / is_text.sum().clamp(min=1.0),
        "logit_norm_image": (norms * is_image).sum() / is_image.sum().clamp(min=1.0),
        "tokens_text": is_text.sum().detach(),
        "tokens_image": is_image.sum().detach(),
    }
    return ce_mean + z_loss * z_mean, parts
