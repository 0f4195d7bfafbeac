"""`opd`: on-policy distillation. The student samples continuations of the batch's prompts (the
instruction ones: text until <eos>, whole images) and a frozen teacher (an earlier phase's final
weights) scores every sampled token: the loss is the exact reverse KL(student ‖ teacher) over the
vocabulary at each of those positions."""

from __future__ import annotations

import torch

from nmm.train.loss import reverse_kl_loss
from nmm.train.recipes.base import StepInputs, StepOutput
from nmm.train.recipes.common import input_image_spans, student_samples


class Distillation:
    def step(self, s: StepInputs) -> StepOutput:
        b, opts = s.batch.to(s.device), s.phase.options
        x, sampled = student_samples(
            s.model, b.x, b.m, b.patches, s.image_range, s.text_range, opts.temperature, drawing=~b.given
        )
        s.model.train()
        spans = input_image_spans(x, s.cfg.model, b.given)
        with torch.no_grad(), s.amp():
            scores = s.frozen(x, patches=b.patches, spans=spans)
        with s.amp():
            loss, parts = reverse_kl_loss(s.ddp(x, patches=b.patches, spans=spans), scores, x, sampled, s.ranges)
        loss.backward()
        return StepOutput(parts, x)


OPD = Distillation()
