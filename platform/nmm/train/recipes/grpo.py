"""`grpo`: reinforcement learning with verifiable rewards. The policy completes each prompt
`group` times (the answer for M2T rows, the image for M2G rows, after the plan when the rows have
drawing plans); each completion is scored by the phase's rewards (nmm.train.rewards), advantages
are standardised within each group, and the loss is GRPO's clipped objective with a KL penalty
to a frozen reference (an earlier phase's final weights): nmm.train.grpo. With `guidance` the M2G
rows' images are drawn with classifier-free guidance, and the ratio and the KL penalty compare
guided probabilities there (a plan is sampled and compared unguided)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nmm.tokenizers.vocab import PAD
from nmm.train import grpo
from nmm.train.batches import Batch
from nmm.train.recipes import GrpoOptions
from nmm.train.recipes.base import StepInputs, StepOutput
from nmm.train.recipes.common import input_image_spans, student_samples
from nmm.train.rewards import Reward


def score(
    opts: GrpoOptions, rewards: dict[str, Reward], b: Batch, x: torch.Tensor, sampled: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """Each completion's reward: the phase's weighted sum of the rewards of its row's task (on
    the host). Also each component's scores, NaN on the rows it does not score."""
    xs, ss, given = x.cpu(), sampled.cpu(), b.given.cpu()
    total = torch.zeros(len(xs))
    parts = {}
    for name, weight in opts.reward:
        r = rewards[name]
        mine = (given if r.task == "m2t" else ~given).nonzero().flatten()
        got = torch.full((len(xs),), float("nan"))
        if len(mine):
            got[mine] = r.fn(b.rows[mine.numpy()], xs[mine], ss[mine]).float()
            total[mine] += weight * got[mine]
        parts[name] = got
    return total, parts


def unconditional(x: torch.Tensor, sampled: torch.Tensor, image_range, text_range) -> torch.Tensor:
    """The unconditional twins of the rows that drew an image: the text before the first image
    code they sampled (their prompt, and the plan they wrote) padded out, as `blank_text` pads
    a prompt. Rows that wrote text stay as they are (their guided logits are then their own)."""
    drawn = sampled.bool() & (x >= image_range[0]) & (x < image_range[1])
    first = torch.where(drawn.any(1), drawn.float().argmax(1), 0)[:, None]  # 0: a row that drew nothing
    at = torch.arange(x.shape[1], device=x.device)[None]
    text = (x >= text_range[0]) & (x < text_range[1])
    return torch.where((at < first) & text, torch.full_like(x, PAD), x)


def guided_logits(
    net, x: torch.Tensor, blank: torch.Tensor | None, guidance: float, patches, spans, image_range=None
) -> torch.Tensor:
    """`net`'s logits for `x`; with `blank` (the rows' unconditional twins) those of
    classifier-free guidance, uncond + guidance · (cond − uncond), as generation samples them:
    where the next token is an image code of a row that has a twin (with `image_range`; else
    everywhere); a plan written before the image is sampled without guidance. One forward over
    both halves: DDP allows one forward per backward."""
    if blank is None:
        return net(x, patches=patches, spans=spans)
    twice = lambda t: None if t is None else torch.cat([t, t])
    cond, uncond = net(torch.cat([x, blank]), patches=twice(patches), spans=twice(spans)).chunk(2)
    guided = uncond + guidance * (cond - uncond)
    if image_range is None:
        return guided
    code_next = F.pad((x[:, 1:] >= image_range[0]) & (x[:, 1:] < image_range[1]), (0, 1))
    return torch.where(code_next[..., None], guided, cond)


class PolicyOptimisation:
    """`phase.options.group` completions per prompt, scored, and the clipped policy-gradient loss
    with the KL penalty to the reference. Parts: the loss's (pg, kl, clip_fraction), the reward's
    mean and per-group spread, and each reward's mean and per-group spread over the prompts it
    scores. Also returns the completed sequences and the mask of the sampled positions.

    `updates` > 1 reuses the samples: `s.update(loss)` (backward and optimizer step) runs for each
    but the last update, whose loss is returned; the ratio is then taken against the policy that
    sampled, so the clip can bind (its share: `clip_fraction`, of the last update)."""

    def step(self, s: StepInputs) -> StepOutput:
        opts: GrpoOptions = s.phase.options
        group = s.batch.to(s.device).repeat(opts.group)
        x, sampled = student_samples(
            s.model,
            group.x,
            group.m,
            group.patches,
            s.image_range,
            s.text_range,
            opts.temperature,
            opts.guidance,
            drawing=~group.given,
        )
        total, components = score(opts, s.rewards, group, x, sampled)
        advantages = grpo.group_advantages(total, opts.group).to(x.device)
        s.model.train()
        spans = input_image_spans(x, s.cfg.model, group.given)
        blank = unconditional(x, sampled, s.image_range, s.text_range) if opts.guidance != 1.0 else None

        def logprobs(net) -> torch.Tensor:
            logits = guided_logits(net, x, blank, opts.guidance, group.patches, spans, s.image_range)
            return grpo.token_logprobs(logits, x, opts.temperature)

        with torch.no_grad(), s.amp():
            ref = logprobs(s.frozen)
        old = None
        for u in range(opts.updates):
            with s.amp():
                logp = logprobs(s.ddp)
            old = logp.detach() if old is None else old  # the sampling policy's (the first pass's)
            loss, parts = grpo.policy_loss(logp, old, ref, advantages, sampled, opts.clip, opts.kl_weight)
            if u < opts.updates - 1:
                s.update(loss)
        loss.backward()
        parts |= _reward_parts(total, components, opts.group, x.device) | {
            "ce": loss.detach(),
            **_sampled_tokens(x, sampled, s.ranges),
        }
        return StepOutput(parts, x, samples=(x.detach(), sampled))


def _reward_parts(total: torch.Tensor, components: dict, group: int, device) -> dict:
    """The reward's mean and per-group spread, and each reward's over the prompts it scores."""
    on_host = {
        "reward": total.mean(),
        "reward_std": total.view(-1, group).std(dim=1).mean() if group > 1 else torch.zeros(()),
    }
    nan = torch.tensor(float("nan"))
    for name, got in components.items():
        groups = got.view(-1, group)
        groups = groups[~groups.isnan().any(1)]  # the prompts this reward scores (a whole group, or none of it)
        on_host[f"reward/{name}"] = groups.mean() if len(groups) else nan
        on_host[f"reward_std/{name}"] = groups.std(dim=1).mean() if len(groups) and group > 1 else nan
    return {k: v.to(device) for k, v in on_host.items()}


def _sampled_tokens(x: torch.Tensor, sampled: torch.Tensor, ranges) -> dict:
    """The sampled tokens per modality (`tokens_<modality>`: a code of its range; text: the rest)."""
    on = sampled.bool()
    codes = {m: on & (x >= lo) & (x < hi) for m, (lo, hi) in ranges.items()}
    text = on
    for is_m in codes.values():
        text = text & ~is_m
    return {f"tokens_{m}": v.sum().float() for m, v in {"text": text, **codes}.items()}


GRPO = PolicyOptimisation()
