"""The loss of one step, per recipe:

- `pretrain`: next-token loss on every token of each sequence in the data's plain layout (text
  and image alike; the image positions of mid/late fusion, which hold pixels, excepted);
- `sft`: instruction-formatted rows (a user turn with the instruction, the assistant's turn
  with the answer: nmm.data.sequences), loss on the answers only (the caption, the VQA answer,
  or the image to draw), with the phase's own mixture;
- `opd`: on-policy distillation. The student samples continuations of the batch's prompts and
  a frozen teacher (an earlier phase's final weights) scores every sampled token: loss is the
  reverse KL(student ‖ teacher) at each of those positions. Its prompts are the instruction ones.
- `grpo`: reinforcement learning with verifiable rewards. The policy completes each prompt
  `group` times (the answer for M2T rows, the image for M2G rows, after the plan when the rows
  have drawing plans); each completion is scored by
  the phase's rewards (nmm.train.rewards), advantages are standardised within each group, and
  the loss is GRPO's clipped objective with a KL penalty to a frozen reference (an earlier
  phase's final weights): nmm.train.grpo. One update per sampled batch, so the policy that
  sampled is the one updated (its ratio starts at 1). With `guidance` the M2G rows' images are
  drawn with classifier-free guidance, and the ratio and the KL penalty compare guided
  probabilities there (a plan is sampled and compared unguided).

With bidirectional image attention the M2T rows' images are inputs seen whole (M2G rows draw
theirs causally), and the targets inside such an image leave every recipe's loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from nmm.tokenizers.vocab import blank_text
from nmm.model import ModelConfig
from nmm.model.generate import draw_images, generate
from nmm.model.transformer import image_spans
from nmm.tokenizers.vocab import BOI, EOI, EOS, PAD
from nmm.train import grpo
from nmm.train.batches import Batch, pack_batch, to_device
from nmm.train.loss import head_loss, reverse_kl_loss
from nmm.train.rewards import Reward


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
def student_samples(model, x: torch.Tensor, m: torch.Tensor, patches: torch.Tensor | None, image_range, text_range,
                    temperature: float, guidance: float = 1.0,
                    drawing: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
            heads, outs = draw_images(model, prompts, int(max(per_image[i] for i in idx)), image_range,
                                      plan_range=text_range if plans else None, blank=lambda p: blank_text(p, text_range),
                                      temperature=temperature, guidance=guidance, patches=pix)
            tails = [[(h, 1), ([BOI] if plans and h[-1:] != [BOI] else [], 0), (o, 1), ([EOI], 0)]
                     for h, o in zip(heads, outs)]
        else:
            n = int(max(lengths[i] for i in idx))
            outs = generate(model, prompts, n, text_range, stop=EOS, extra_allowed=(EOS,), temperature=temperature, patches=pix)
            tails = [[(o + [EOS], 1)] if len(o) < n else [(o, 1)] for o in outs]
        for i, p, tail in zip(idx, prompts, tails):
            pieces[i] = [(p, 0), *tail]
    seqs = [[t for toks, _ in row for t in toks] for row in pieces]
    sampled = [[s for toks, s in row for _ in toks] for row in pieces]
    width = min(max(len(q) for q in seqs), model.cfg.max_seq_len)
    out = torch.full((len(x), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(x), width), dtype=torch.long)
    for i, (q, sm) in enumerate(zip(seqs, sampled)):
        out[i, : len(q[:width])] = torch.tensor(q[:width])
        mask[i, : len(sm[:width])] = torch.tensor(sm[:width])
    return out.to(x.device), mask.to(x.device)


@dataclass
class Laid:
    """A pretrain/sft batch the way the model reads it: tokens, targets (the recipe's mask, the
    seen image codes hidden), pixels, and the packing and image-span masks (`extra`)."""

    x: torch.Tensor
    m: torch.Tensor
    patches: torch.Tensor | None
    extra: dict

    def to(self, device) -> "Laid":
        return Laid(*(to_device(t, device) for t in (self.x, self.m, self.patches)),
                    {k: to_device(v, device) for k, v in self.extra.items()})

    def split(self, rows: int) -> list["Laid"]:
        """Micro-batches of `rows` rows each (the last may be smaller)."""
        cut = lambda t, i: None if t is None else t[i : i + rows]  # noqa: E731
        return [Laid(self.x[i : i + rows], self.m[i : i + rows], cut(self.patches, i), {k: cut(v, i) for k, v in self.extra.items()})
                for i in range(0, len(self.x), rows)]


def lay_out(recipe: str, b: Batch, cfg) -> Laid:
    """pretrain / sft: the batch's targets and masks, packed when the run packs. On the host
    (packing reads row lengths): the step itself then never waits on the device."""
    x, m = b.x, b.m
    if recipe == "pretrain":
        m = pretrain_mask(x, cfg.model)
    spans = input_image_spans(x, cfg.model, b.given)
    if spans is not None:
        m = hide_seen_targets(m, spans)
    extra = {"spans": spans}
    if cfg.parallel.pack:
        x, m, extra = pack_batch(x, m, cfg.model.max_seq_len, spans)
    return Laid(x, m, b.patches, extra)


def next_token_step(laid: Laid, ddp, cfg, image_range, amp: Callable, *, norms: bool = True,
                    total: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """pretrain / sft: (loss, its parts) of a laid-out batch (or micro-batch: `total`, the whole
    batch's target weight, makes the micro-batches' losses add up to the batch's). The loss is
    fused with the output layer (nmm.train.loss.head_loss); `norms`: the logit norms too."""
    head = head_loss(laid.x, laid.m, image_range, cfg.z_loss, cfg.loss_weights, norms=norms, total=total)
    with amp():
        return ddp(laid.x, patches=laid.patches, head=head, **laid.extra)


def distillation_step(phase, b: Batch, model, ddp, teacher, cfg, image_range, text_range,
                      amp: Callable) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """opd: the student samples, the teacher scores (reverse KL at the sampled positions)."""
    x, m = student_samples(model, b.x, b.m, b.patches, image_range, text_range, phase.temperature, drawing=~b.given)
    model.train()
    spans = input_image_spans(x, cfg.model, b.given)
    with torch.no_grad(), amp():
        scores = teacher(x, patches=b.patches, spans=spans)
    with amp():
        loss, parts = reverse_kl_loss(ddp(x, patches=b.patches, spans=spans), scores, x, m, image_range)
    return loss, parts, x


def score(phase, rewards: dict[str, Reward], b: Batch, x: torch.Tensor, sampled: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Each completion's reward: the phase's weighted sum of the rewards of its row's task (on
    the host). Also each component's scores, NaN on the rows it does not score."""
    xs, ss, given = x.cpu(), sampled.cpu(), b.given.cpu()
    total = torch.zeros(len(xs))
    parts = {}
    for name, weight in phase.reward:
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


def guided_logits(net, x: torch.Tensor, blank: torch.Tensor | None, guidance: float, patches, spans,
                  image_range=None) -> torch.Tensor:
    """`net`'s logits for `x`; with `blank` (the rows' unconditional twins) those of
    classifier-free guidance, uncond + guidance · (cond − uncond), as generation samples them:
    where the next token is an image code of a row that has a twin (with `image_range`; else
    everywhere); a plan written before the image is sampled without guidance. One forward over
    both halves: DDP allows one forward per backward."""
    if blank is None:
        return net(x, patches=patches, spans=spans)
    twice = (lambda t: None if t is None else torch.cat([t, t]))  # noqa: E731
    cond, uncond = net(torch.cat([x, blank]), patches=twice(patches), spans=twice(spans)).chunk(2)
    guided = uncond + guidance * (cond - uncond)
    if image_range is None:
        return guided
    code_next = F.pad((x[:, 1:] >= image_range[0]) & (x[:, 1:] < image_range[1]), (0, 1))
    return torch.where(code_next[..., None], guided, cond)


def policy_step(phase, b: Batch, model, ddp, reference, cfg, image_range, text_range, amp: Callable,
                rewards: dict[str, Reward], update: Callable[[torch.Tensor], None] | None = None,
                ) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """grpo: `phase.group` completions per prompt, scored, and the clipped policy-gradient loss
    with the KL penalty to the reference. Parts: the loss's (pg, kl, clip_fraction), the reward's
    mean and per-group spread, and each reward's mean and per-group spread over the prompts it
    scores. Also returns the completed sequences and the mask of the sampled positions.

    `phase.updates` > 1 reuses the samples: `update(loss)` (backward and optimizer step) runs
    for each but the last update, whose loss is returned; the ratio is then taken against the
    policy that sampled, so the clip can bind (its share: `clip_fraction`, of the last update)."""
    group = b.repeat(phase.group)
    x, sampled = student_samples(model, group.x, group.m, group.patches, image_range, text_range, phase.temperature,
                                 phase.guidance, drawing=~group.given)
    total, components = score(phase, rewards, group, x, sampled)
    advantages = grpo.group_advantages(total, phase.group).to(x.device)
    model.train()
    spans = input_image_spans(x, cfg.model, group.given)
    blank = unconditional(x, sampled, image_range, text_range) if phase.guidance != 1.0 else None
    with torch.no_grad(), amp():
        ref = grpo.token_logprobs(guided_logits(reference, x, blank, phase.guidance, group.patches, spans, image_range),
                                  x, phase.temperature)
    old = None
    for u in range(phase.updates):
        with amp():
            logp = grpo.token_logprobs(guided_logits(ddp, x, blank, phase.guidance, group.patches, spans, image_range),
                                       x, phase.temperature)
        old = logp.detach() if old is None else old  # the sampling policy's (the first pass's)
        loss, parts = grpo.policy_loss(logp, old, ref, advantages, sampled, phase.clip, phase.kl_weight)
        if u < phase.updates - 1:
            update(loss)
    is_image = (x >= image_range[0]) & (x < image_range[1])
    on_host = {
        "reward": total.mean(),
        "reward_std": total.view(-1, phase.group).std(dim=1).mean() if phase.group > 1 else torch.zeros(()),
    }
    for name, got in components.items():
        groups = got.view(-1, phase.group)
        groups = groups[~groups.isnan().any(1)]  # the prompts this reward scores (a whole group, or none of it)
        nan = torch.tensor(float("nan"))
        on_host[f"reward/{name}"] = groups.mean() if len(groups) else nan
        on_host[f"reward_std/{name}"] = groups.std(dim=1).mean() if len(groups) and phase.group > 1 else nan
    parts |= {k: v.to(x.device) for k, v in on_host.items()} | {
        "ce": loss.detach(),
        "tokens_text": (sampled.bool() & ~is_image).sum().float(),
        "tokens_image": (sampled.bool() & is_image).sum().float(),
    }
    return loss, parts, x, sampled
