"""`pretrain` and `sft`: next-token loss on the batch's targets.

- `pretrain`: every token of the data's plain layout is a target (text and image alike; the image
  positions of mid/late fusion, which hold pixels, excepted);
- `sft`: instruction-formatted rows (nmm.data.sequences), loss on the answers only (the caption,
  the VQA answer, or the image to draw): the rows' own loss mask.

The batch is laid out on the host (targets, packing), then run in micro-batches of `micro` rows
with gradients accumulated (synchronised across ranks on the last one only); each micro-batch's
loss is scaled by the whole batch's target weight, so the gradients are the whole batch's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nmm.train import parallelize
from nmm.train.batches import Batch, pack_batch, to_device
from nmm.train.loss import head_loss, merge_parts, target_weight
from nmm.train.recipes.base import StepInputs, StepOutput
from nmm.train.recipes.common import hide_seen_targets, input_image_spans, pretrain_mask


@dataclass
class LaidOutBatch:
    """A pretrain/sft batch the way the model reads it: tokens, targets (the recipe's mask, the
    seen image codes hidden), pixels, and the packing and image-span masks (`extra`)."""

    x: torch.Tensor
    targets: torch.Tensor
    patches: torch.Tensor | None
    extra: dict

    def to(self, device) -> LaidOutBatch:
        return LaidOutBatch(
            *(to_device(t, device) for t in (self.x, self.targets, self.patches)),
            {k: to_device(v, device) for k, v in self.extra.items()},
        )

    def split(self, rows: int) -> list[LaidOutBatch]:
        """Micro-batches of `rows` rows each (the last may be smaller)."""

        def cut(t, i):
            return None if t is None else t[i : i + rows]

        return [
            LaidOutBatch(
                cut(self.x, i),
                cut(self.targets, i),
                cut(self.patches, i),
                {k: cut(v, i) for k, v in self.extra.items()},
            )
            for i in range(0, len(self.x), rows)
        ]


def lay_out(b: Batch, cfg, every_token: bool) -> LaidOutBatch:
    """The batch's targets and masks, packed when the run packs (`every_token`: pretrain's
    targets, else the rows' own). On the host (packing reads row lengths): the step itself then
    never waits on the device."""
    x, targets = b.x, b.m
    if every_token:
        targets = pretrain_mask(x, cfg.model)
    spans = input_image_spans(x, cfg.model, b.given)
    if spans is not None:
        targets = hide_seen_targets(targets, spans)
    extra = {"spans": spans}
    if cfg.parallel.pack:
        x, targets, extra = pack_batch(x, targets, cfg.model.max_seq_len, spans)
    return LaidOutBatch(x, targets, b.patches, extra)


def next_token_step(
    laid: LaidOutBatch, ddp, cfg, ranges, amp: Callable, *, norms: bool = True, total: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict]:
    """(loss, its parts) of a laid-out batch (or micro-batch: `total`, the whole batch's target
    weight, makes the micro-batches' losses add up to the batch's). The loss is fused with the
    output layer (nmm.train.loss.head_loss); `norms`: the logit norms too."""
    head = head_loss(laid.x, laid.targets, ranges, cfg.z_loss, cfg.loss_weights, norms=norms, total=total)
    with amp():
        return ddp(laid.x, patches=laid.patches, head=head, **laid.extra)


@dataclass(frozen=True)
class NextToken:
    every_token: bool  # pretrain: every token is a target; sft: the rows' answers only

    def step(self, s: StepInputs) -> StepOutput:
        laid = lay_out(s.batch, s.cfg, self.every_token).to(s.device)
        chunks = laid.split(s.micro) if s.micro and s.micro < len(laid.x) else [laid]
        total = target_weight(laid.x, laid.targets, s.ranges, s.cfg.loss_weights) if len(chunks) > 1 else None
        parts = []
        for i, chunk in enumerate(chunks):
            with parallelize.gradient_sync(s.ddp, i == len(chunks) - 1):
                loss, p = next_token_step(chunk, s.ddp, s.cfg, s.ranges, s.amp, norms=s.norms, total=total)
                loss.backward()
            parts.append(p)
        return StepOutput(merge_parts(parts), laid.x)


PRETRAIN = NextToken(every_token=True)
SFT = NextToken(every_token=False)
