"""Training objectives over the shared vocabulary, reported per modality.

- `fused_next_token_loss`: what training uses. The output layer, cross-entropy on the weighted
  targets and z-loss in one pass over chunks of CHUNK_TOKENS rows (Liger's fused linear +
  cross-entropy): each chunk's logits are made in the compute dtype, upcast to fp32, turned into
  the loss and its gradients at once, and dropped. Neither (B, T, V) logits nor their fp32 copy
  ever exist; backward only scales the gradients kept from forward. `head_loss` wraps it for
  `Transformer.forward(head=…)`, so the output layer's weight is read inside the model's
  forward (where DDP and FSDP expect it).
- `next_token_loss`: the same objective from logits the caller already holds (evaluation, tests).
- `reverse_kl_loss`: on-policy distillation; KL(student ‖ teacher) at every position that
  predicts a token the student sampled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

CHUNK_TOKENS = 2048  # rows of logits made, upcast to fp32 and differentiated at once


Ranges = Mapping[str, tuple[int, int]]  # each non-text modality → its codes' ids [lo, hi), e.g. {"image": (lo, hi)}
Weights = Mapping[str, float]  # modality → its targets' loss weight; a modality it does not name weighs 1


def _modality(targets: torch.Tensor, mask: torch.Tensor, ranges: Ranges) -> dict[str, torch.Tensor]:
    """Each modality's targets (0/1 per position, within the mask): a code of a modality's range
    is that modality's; every other target (words, markers, <eos>) is text's."""
    on = (mask > 0).float()
    codes = {m: ((targets >= lo) & (targets < hi)).float() * on for m, (lo, hi) in ranges.items()}
    text = on
    for is_m in codes.values():
        text = text - is_m
    return {"text": text, **codes}


def _parts(
    per_token: torch.Tensor, norms: torch.Tensor | None, mask: torch.Tensor, which: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Detached summaries, on the device: mean of `per_token` overall and per modality
    (`ce_<modality>`), mean logit norm per modality (Chameleon's divergence signal; when `norms`
    were computed) and target counts per modality (`tokens_<modality>`)."""
    on = (mask > 0).float()
    mean = lambda v, w: ((v.detach() * w).sum() / w.sum().clamp(min=1.0)).detach()
    out = {"ce": mean(per_token, on)}
    out |= {f"ce_{m}": mean(per_token, is_m) for m, is_m in which.items()}
    out |= {f"tokens_{m}": is_m.sum().detach() for m, is_m in which.items()}
    if norms is not None:
        out |= {f"logit_norm_{m}": mean(norms, is_m) for m, is_m in which.items()}
    return out


def _weighted(tokens: torch.Tensor, loss_mask: torch.Tensor, ranges: Ranges, weights: Weights | None):
    """(targets, mask, each modality's targets, per-target weight) for positions 0…T-2."""
    targets = tokens[:, 1:].long()
    mask = loss_mask[:, 1:].float()
    which = _modality(targets, mask, ranges)
    w = None
    for m, is_m in which.items():
        term = (weights or {}).get(m, 1.0) * is_m
        w = term if w is None else w + term
    return targets, mask, which, w


def _targets(tokens: torch.Tensor, loss_mask: torch.Tensor, ranges: Ranges, weights, total: torch.Tensor | None = None):
    """`_weighted` with the weights divided by the total weight; `total` defaults to these
    targets' own."""
    targets, mask, which, w = _weighted(tokens, loss_mask, ranges, weights)
    return targets, mask, which, w / (w.sum() if total is None else total).clamp(min=1e-9)


def target_weight(
    tokens: torch.Tensor, loss_mask: torch.Tensor, ranges: Ranges, weights: Weights | None = None
) -> torch.Tensor:
    """The summed weight of a batch's targets: the `total` that makes the losses of its
    micro-batches add up to the loss of the whole batch."""
    return _weighted(tokens, loss_mask, ranges, weights)[-1].sum()


def merge_parts(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The parts of a whole batch from its micro-batches' (each a mean over its own targets):
    means weighted by target counts, counts summed, z summed (each micro-batch's z is already a
    share of the batch's)."""
    if len(parts) == 1:
        return parts[0]
    names = [k.removeprefix("tokens_") for k in parts[0] if k.startswith("tokens_")]
    counts = {m: torch.stack([p[f"tokens_{m}"] for p in parts]) for m in names}
    weighted = lambda k, n: (torch.stack([p[k] for p in parts]) * n).sum() / n.sum().clamp(min=1.0)
    everything = None
    for n in counts.values():
        everything = n if everything is None else everything + n
    out = {"ce": weighted("ce", everything)}
    out |= {f"ce_{m}": weighted(f"ce_{m}", n) for m, n in counts.items()}
    out |= {f"tokens_{m}": n.sum() for m, n in counts.items()}
    out["z"] = torch.stack([p["z"] for p in parts]).sum()
    if f"logit_norm_{names[0]}" in parts[0]:
        out |= {f"logit_norm_{m}": weighted(f"logit_norm_{m}", n) for m, n in counts.items()}
    return out


def next_token_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    ranges: Ranges,
    z_loss: float,
    weights: Weights | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logits (B, T, V) predict tokens[:, 1:]; only targets with loss_mask > 0 count.

    `ranges`: each non-text modality's code ids (its targets are that modality's, the rest are
    text's); `weights`: per-modality loss weights on the targets, by name. z-loss (PaLM/Chameleon)
    penalises log(Z)^2 to keep the softmax normaliser near 1. Returns the scalar to minimise and
    detached parts: ce (unweighted), z, and per modality its ce, mean logit norm and target token
    count. In fp32 over all the logits: for logits already held; training uses
    `fused_next_token_loss`."""
    targets, mask, which, scale = _targets(tokens, loss_mask, ranges, weights)
    lf = logits[:, :-1].float()
    logz = torch.logsumexp(lf, dim=-1)
    ce = logz - lf.gather(-1, targets[..., None]).squeeze(-1)
    z_mean = (logz.pow(2) * scale).sum()
    parts = _parts(ce, lf.detach().norm(dim=-1), mask, which)
    parts["z"] = z_mean.detach()
    return (ce * scale).sum() + z_loss * z_mean, parts


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = Σ scale·(log Z − logit[target]) + z_loss · Σ scale·(log Z)², logits = hidden @ Wᵀ.

    Forward walks the rows chunk by chunk and computes, with the chunk's logits still at hand,
    d loss / d logits = scale · (softmax · (1 + 2·z_loss·log Z) − onehot), then the gradients of
    the hidden states and of W from it. Also returns per row: cross-entropy, log Z and (when
    asked) the logit norm, detached."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, z_loss: float, norms: bool):
        dtype = _compute_dtype(weight)
        grads = hidden.requires_grad or weight.requires_grad
        n = hidden.shape[0]
        ce = torch.empty(n, dtype=torch.float32, device=hidden.device)
        logz = torch.empty_like(ce)
        norm = torch.empty_like(ce) if norms else None
        grad_h = torch.empty_like(hidden) if grads else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
        w = weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, n, CHUNK_TOKENS):
                h, t, s = (
                    hidden[i : i + CHUNK_TOKENS].to(dtype),
                    targets[i : i + CHUNK_TOKENS],
                    scale[i : i + CHUNK_TOKENS],
                )
                lf = (h @ w.t()).float()
                lz = torch.logsumexp(lf, dim=-1)
                ce[i : i + len(t)] = lz - lf.gather(-1, t[:, None]).squeeze(-1)
                logz[i : i + len(t)] = lz
                if norm is not None:
                    norm[i : i + len(t)] = lf.norm(dim=-1)
                if grads:
                    g = torch.exp(lf - lz[:, None]).mul_((s * (1 + 2 * z_loss * lz))[:, None])
                    g.scatter_add_(1, t[:, None], -s[:, None])
                    g = g.to(dtype)
                    grad_h[i : i + len(t)] = g @ w
                    grad_w += (g.t() @ h).float()
        loss = (ce * scale).sum() + z_loss * (logz.pow(2) * scale).sum()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce, logz, *([norm] if norm is not None else []))
        return loss, ce, logz, norm

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), (grad_w * grad_loss).to(ctx.weight_dtype), None, None, None, None


def fused_next_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    ranges: Ranges,
    z_loss: float,
    weights: Weights | None = None,
    *,
    norms: bool = True,
    total: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`next_token_loss` of the logits `hidden @ weight.T` (hidden (B, T, D): the final normed
    states; weight (V, D): the output layer), without ever holding them: see
    `_LinearCrossEntropy`. `norms=False` skips the logit norms (a full-vocabulary reduction
    the trainer needs only at logging steps). `total`: see `target_weight`."""
    b, t, d = hidden.shape
    targets, mask, which, scale = _targets(tokens, loss_mask, ranges, weights, total)
    # Every position, so the hidden states are a view and not a copy; the last one weighs 0.
    pad = lambda v: torch.cat([v, torch.zeros_like(v[:, :1])], dim=1).reshape(-1)
    loss, ce, logz, norm = _LinearCrossEntropy.apply(
        hidden.reshape(-1, d), weight, pad(targets), pad(scale), z_loss, norms
    )
    per_row = lambda v: None if v is None else v.view(b, t)[:, :-1]
    parts = _parts(per_row(ce), per_row(norm), mask, which)
    parts["z"] = (per_row(logz).pow(2) * scale).sum().detach()
    return loss, parts


def head_loss(
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    ranges: Ranges,
    z_loss: float,
    weights: Weights | None = None,
    *,
    norms: bool = True,
    total: torch.Tensor | None = None,
) -> Callable:
    """The `head` a model's forward applies in place of its output layer: (hidden, weight) →
    (loss, parts) of `fused_next_token_loss`."""
    return lambda hidden, weight: fused_next_token_loss(
        hidden, weight, tokens, loss_mask, ranges, z_loss, weights, norms=norms, total=total
    )


def reverse_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    sampled: torch.Tensor,
    ranges: Ranges,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """On-policy distillation: at every position predicting a sampled token (`sampled[:, 1:]`),
    the exact reverse KL(student ‖ teacher) over the vocabulary. Mode-seeking: the student is
    pushed off what the teacher finds unlikely, on the sequences the student itself produces."""
    s = F.log_softmax(student_logits[:, :-1].float(), dim=-1)
    t = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1)
    kl = (s.exp() * (s - t)).sum(-1)
    mask = sampled[:, 1:].float()
    parts = _parts(
        kl, student_logits[:, :-1].detach().float().norm(dim=-1), mask, _modality(tokens[:, 1:], mask, ranges)
    )
    parts["z"] = torch.zeros(())
    return (kl * mask).sum() / mask.sum().clamp(min=1.0), parts
