"""What a recipe's step gets and gives (torchtitan's `TrainSpec` habit: the trainer knows the
interface, each recipe its loss).

The trainer zeroes the gradients, calls `step`, then clips and takes the optimizer step. A step
runs its forward and backward passes itself (a recipe may split the batch into micro-batches, or,
like grpo with several updates per sample, step the optimizer in between through `update`), and
reads nothing from the device: parts and token counts stay tensors until a logging step."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from nmm.train.batches import Batch


@dataclass(frozen=True)
class StepInputs:
    phase: object  # nmm.train.trainer.PhaseConfig; its recipe's options are `phase.options`
    batch: Batch  # on the host
    model: torch.nn.Module  # unwrapped: sampling, and the parameters
    ddp: torch.nn.Module  # wrapped (DDP/FSDP): every forward that trains
    frozen: torch.nn.Module | None  # the teacher or reference (RecipeInfo.frozen), else None
    cfg: object  # nmm.train.trainer.TrainConfig
    image_range: tuple[int, int]
    text_range: tuple[int, int] | None
    ranges: Mapping[str, tuple[int, int]]  # each non-text modality's codes (the loss's modalities, by name)
    amp: Callable  # the autocast context of the run
    device: torch.device
    micro: int | None  # rows per forward (None: the whole batch)
    norms: bool  # also compute the logit norms (a logging step)
    rewards: dict  # name → nmm.train.rewards.Reward, for the recipes that score completions
    update: Callable[[torch.Tensor], None]  # backward of a loss, clip, optimizer step, zero the gradients


@dataclass(frozen=True)
class StepOutput:
    parts: dict  # loss parts (tensors), with `tokens_<modality>` the target tokens trained on, per modality
    x: torch.Tensor  # the sequences trained on (B, T)
    samples: tuple[torch.Tensor, torch.Tensor] | None = None  # a sampling recipe's (sequences, sampled mask)


class Recipe(Protocol):
    def step(self, s: StepInputs) -> StepOutput: ...
