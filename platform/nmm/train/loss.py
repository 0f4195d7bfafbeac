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


def _parts(per_token: torch.Tensor, norms: torch.Tensor, mask: torch.Tensor, is_text, is_image) -> dict[str, torch.Tensor]:
    """Detached summaries: mean of `per_token` overall and per modality, mean logit norm per
    modality (Chameleon's divergence signal) and target counts per modality."""
    on = (mask > 0).float()
    mean = lambda v, w: ((v.detach() * w).sum() / w.sum().clamp(min=1.0)).detach()  # noqa: E731
    return {
        "ce": mean(per_token, on),
        "ce_text": mean(per_token, is_text),
        "ce_image": mean(per_token, is_image),
        "logit_norm_text": mean(norms, is_text),
        "logit_norm_image": mean(norms, is_image),
        "tokens_text": is_text.sum().detach(),
        "tokens_image": is_image.sum().detach(),
    }


CHUNK_TOKENS = 2048  # rows of logits upcast to fp32 at once


def _per_token(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cross-entropy, log Z, detached logit norm) per row of (N, V) logits, in fp32."""
    lf = logits.float()
    logz = torch.logsumexp(lf, dim=-1)
    ce = logz - lf.gather(-1, targets[:, None]).squeeze(-1)
    return ce, logz, lf.detach().norm(dim=-1)


def _chunked(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_per_token` over chunks of CHUNK_TOKENS rows, each recomputed in backward (activation
    checkpointing): the fp32 copy of the logits exists one chunk at a time, never as (B, T, V)."""
    if logits.shape[0] <= CHUNK_TOKENS or not torch.is_grad_enabled():
        return _per_token(logits, targets)
    from torch.utils.checkpoint import checkpoint

    outs = [checkpoint(_per_token, logits[i : i + CHUNK_TOKENS], targets[i : i + CHUNK_TOKENS], use_reentrant=False)
            for i in range(0, logits.shape[0], CHUNK_TOKENS)]
    return tuple(torch.cat(parts) for parts in zip(*outs))


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
    modality and target token counts per modality. Cross-entropy, log Z and the logit norm come
    from one fp32 pass per chunk of rows (`_chunked`), in the logits' own dtype until then.
    """
    b, t, v = logits.shape
    targets = tokens[:, 1:].long()
    mask = loss_mask[:, 1:].float()
    # Every position, so the logits are a view and not a copy; the last one predicts nothing.
    padded = torch.cat([targets, torch.zeros_like(targets[:, :1])], dim=1)
    ce, logz, norms = (x.view(b, t)[:, :-1] for x in _chunked(logits.reshape(-1, v), padded.reshape(-1)))
    is_text, is_image = _modality(targets, mask, image_range)
    w = weights[0] * is_text + weights[1] * is_image
    wsum = w.sum().clamp(min=1e-9)
    z_mean = (logz.pow(2) * w).sum() / wsum
    parts = _parts(ce, norms, mask, is_text, is_image)
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
    parts = _parts(kl, student_logits[:, :-1].detach().float().norm(dim=-1), mask, is_text, is_image)
    parts["z"] = torch.zeros(())
    return (kl * mask).sum() / mask.sum().clamp(min=1.0), parts
