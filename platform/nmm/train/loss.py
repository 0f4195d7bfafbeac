"""Training objectives over the shared vocabulary, reported per modality.

- `next_token_loss`: cross-entropy on the weighted targets, plus z-loss.
- `reverse_kl_loss`: on-policy distillation; KL(student ‖ teacher) at every position that
  predicts a token the student sampled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _modality(targets: torch.Tensor, mask: torch.Tensor, image_range: tuple[int, int]):
    is_image = ((targets >= image_range[0]) & (targets < image_range[1])).float() * (mask > 0).float()
    return (mask > 0).float() - is_image, is_image


def _parts(per_token: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor, is_text, is_image) -> dict[str, torch.Tensor]:
    """Detached summaries: mean of `per_token` overall and per modality, mean logit norm per
    modality (Chameleon's divergence signal) and target counts per modality."""
    on = (mask > 0).float()
    norms = logits.detach().norm(dim=-1)
    mean = lambda v, w: ((v * w).sum() / w.sum().clamp(min=1.0)).detach()  # noqa: E731
    return {
        "ce": mean(per_token, on),
        "ce_text": mean(per_token, is_text),
        "ce_image": mean(per_token, is_image),
        "logit_norm_text": mean(norms, is_text),
        "logit_norm_image": mean(norms, is_image),
        "tokens_text": is_text.sum().detach(),
        "tokens_image": is_image.sum().detach(),
    }


def next_token_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    image_range: tuple[int, int],
    z_loss: float,
    weights: tuple[float, float] = (1.0, 1.0),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logits (B, T, V) predict tokens[:, 1:]; only targets with loss_mask > 0 count.

    `weights` = (text, image): per-modality loss weights on the targets. z-loss (PaLM/Chameleon)
    penalises log(Z)^2 to keep the softmax normaliser near 1. Returns the scalar to minimise and
    detached parts: ce (unweighted), z, ce on text and on image targets, mean logit norm per
    modality and target token counts per modality.
    """
    logits = logits[:, :-1].float()
    targets = tokens[:, 1:].long()
    mask = loss_mask[:, 1:].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    ce = ce.view_as(mask)
    is_text, is_image = _modality(targets, mask, image_range)
    w = weights[0] * is_text + weights[1] * is_image
    wsum = w.sum().clamp(min=1e-9)
    logz = torch.logsumexp(logits, dim=-1)
    z_mean = (logz.pow(2) * w).sum() / wsum
    parts = _parts(ce, logits, mask, is_text, is_image)
    parts["z"] = z_mean.detach()
    return (ce * w).sum() / wsum + z_loss * z_mean, parts


def reverse_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    sampled: torch.Tensor,
    image_range: tuple[int, int],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """On-policy distillation: at every position predicting a sampled token (`sampled[:, 1:]`),
    the exact reverse KL(student ‖ teacher) over the vocabulary. Mode-seeking: the student is
    pushed off what the teacher finds unlikely, on the sequences the student itself produces."""
    s = F.log_softmax(student_logits[:, :-1].float(), dim=-1)
    t = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1)
    kl = (s.exp() * (s - t)).sum(-1)
    mask = sampled[:, 1:].float()
    is_text, is_image = _modality(tokens[:, 1:], mask, image_range)
    parts = _parts(kl, student_logits[:, :-1], mask, is_text, is_image)
    parts["z"] = torch.zeros(())
    return (kl * mask).sum() / mask.sum().clamp(min=1.0), parts
