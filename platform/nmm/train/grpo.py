"""Group Relative Policy Optimisation (GRPO; DeepSeekMath, arXiv:2402.03300): the objective of
the `grpo` recipe, apart from sampling and rewards (nmm.train.recipes).

Each prompt is completed `group` times by the policy. A completion's advantage is its reward
standardised within its group, (r - mean) / (std + eps), so the update needs no value model and
a group whose completions all score alike teaches nothing. The loss at each sampled token is the
clipped policy-gradient objective (PPO's) with a KL penalty to a frozen reference model, the
unbiased, always non-negative "k3" estimator exp(ref - logp) - (ref - logp) - 1 (Schulman's),
which is zero where policy and reference agree. Tokens are averaged over the whole batch (Dr.
GRPO / DAPO's token-level mean), so a long completion does not weigh less per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ADV_EPS = 1e-4  # added to a group's standard deviation (TRL's constant)


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """(N,) rewards of N/group prompts' completions, each prompt's `group` completions adjacent
    → their advantages: standardised within each group (Bessel-corrected std, as TRL)."""
    if rewards.dim() != 1 or len(rewards) % group:
        raise ValueError(f"rewards: expected (N,) with N a multiple of group={group}, got {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group)
    std = r.std(dim=1, keepdim=True) if group > 1 else torch.zeros_like(r[:, :1])
    return ((r - r.mean(dim=1, keepdim=True)) / (std + ADV_EPS)).view(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) logits, (B, T) tokens → (B, T) the log-probability of each token given what came
    before it (position 0, which has no predecessor, gets 0), at the sampling temperature."""
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    picked = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return F.pad(picked, (1, 0))


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    sampled: torch.Tensor,
    clip: float,
    kl_weight: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss over the sampled tokens. `logp` (B, T): the policy's log-probabilities
    (with gradient); `old_logp`: the policy's when it sampled; `ref_logp`: the reference's;
    `advantages` (B,): one per completion; `sampled` (B, T): 1 where the policy chose the token.
    Returns (loss, parts): `pg` the clipped objective's loss, `kl` the mean k3 estimate,
    `clip_fraction` the share of tokens where the clip bound the objective."""
    mask = sampled.float()
    n = mask.sum().clamp(min=1.0)
    a = advantages.float()[:, None]
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * a
    objective = torch.minimum(unclipped, clipped)
    d = ref_logp - logp
    kl = torch.exp(d) - d - 1.0
    per_token = -objective + kl_weight * kl
    loss = (per_token * mask).sum() / n
    parts = {
        "pg": ((-objective) * mask).sum().detach() / n,
        "kl": (kl * mask).sum().detach() / n,
        "clip_fraction": ((clipped < unclipped).float() * mask).sum().detach() / n,
    }
    return loss, parts
