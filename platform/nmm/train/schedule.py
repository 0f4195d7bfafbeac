"""A phase's learning-rate schedule: linear warmup, then cosine decay to `LR_FLOOR` of the peak,
applied by torch's `LambdaLR`."""

from __future__ import annotations

import math

import torch

LR_FLOOR = 0.1  # the cosine decays to this share of the phase's peak rate


def lr_at(phase, step_in_phase: int) -> float:
    """The rate at `step_in_phase` (0-based) of a phase with `lr`, `warmup_steps` and `steps`."""
    if step_in_phase < phase.warmup_steps:
        return phase.lr * (step_in_phase + 1) / phase.warmup_steps
    span = max(1, phase.steps - phase.warmup_steps)
    progress = (step_in_phase - phase.warmup_steps) / span
    return phase.lr * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


def prepare(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Give a new optimizer's groups the base rate 1 that `scheduler` multiplies (LambdaLR's
    `initial_lr`): before its state is loaded, so a checkpoint's groups and the new ones have the
    same keys (torch.distributed.checkpoint insists)."""
    for group in opt.param_groups:
        group["initial_lr"] = 1.0
    return opt


def scheduler(opt: torch.optim.Optimizer, phase, first_step_in_phase: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Step i of the phase (counting from `first_step_in_phase`, where a resumed run starts) runs
    at `lr_at(phase, first + i)`; call `.step()` after each optimizer step. The groups' base rate
    is 1 (`prepare`), so LambdaLR's factor is the rate itself, bit for bit."""
    if any(group.get("initial_lr") != 1.0 for group in opt.param_groups):
        raise ValueError("scheduler: prepare(optimizer) first (base rate 1)")
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_at(phase, first_step_in_phase + i))
