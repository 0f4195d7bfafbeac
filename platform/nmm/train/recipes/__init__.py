"""Training recipes: what a phase optimises, registered by name.

A recipe is one entry of `RECIPES`: the rows it reads (the data's plain layout or instruction
turns), its own options (a frozen dataclass; the spec's `training.phases[]` fields of the same
names, which only its phases may set), whether it scores against an earlier phase's frozen
weights (opd's teacher, grpo's reference) and whether its policy samples while training; and
where its step lives (`module:attribute`, an object with `step(StepInputs) -> StepOutput`:
nmm.train.recipes.base), imported only when a phase trains. This module imports no torch, so the
spec validates phases from the same registry the trainer runs.

Adding a recipe: its module under `nmm/train/recipes/`, its options and its entry here, and its
options' fields in `nmm.spec.training.Phase`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from nmm.plugins import entry, resolve


@dataclass(frozen=True)
class NoOptions:
    """A recipe that takes no options of its own."""


@dataclass(frozen=True, kw_only=True)
class OpdOptions:
    teacher: str  # the earlier phase whose final weights teach
    temperature: float = 1.0  # the student's sampling temperature


@dataclass(frozen=True, kw_only=True)
class GrpoOptions:
    reference: str  # the earlier phase whose final weights the KL penalty keeps the policy near
    reward: tuple[tuple[str, float], ...]  # (reward name, weight) pairs, summed; a {name: weight} is sorted into it
    temperature: float = 1.0  # the sampling temperature
    group: int = 4  # completions per prompt
    clip: float = 0.2  # the ratio's clip range, 1 ± clip
    kl_weight: float = 0.04  # the KL penalty's weight
    updates: int = 1  # optimizer steps on each sampled batch
    guidance: float = 1.0  # classifier-free guidance while drawing (sampling and the ratio)
    samples_every: int = 50  # the phase's completions go to `on_samples` every this many steps

    def __post_init__(self) -> None:
        reward = self.reward.items() if isinstance(self.reward, dict) else self.reward
        object.__setattr__(self, "reward", tuple(sorted((str(k), float(v)) for k, v in reward)))


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    step: str  # "module:attribute" of its step (nmm.train.recipes.base.Recipe)
    style: Literal["plain", "instruct"]  # the rows it reads (nmm.data.sequences.STYLES)
    summary: str  # one line for the spec reference
    options: type = NoOptions
    frozen: str | None = None  # the option naming the earlier phase whose final weights it scores against
    samples: bool = False  # its policy samples while training (per rank: DDP, never FSDP; needs the text ids)

    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.options))

    def required(self) -> tuple[str, ...]:
        """The options a phase of this recipe must set (those without a default)."""
        return tuple(
            f.name
            for f in dataclasses.fields(self.options)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )


RECIPES: dict[str, RecipeInfo] = {
    r.name: r
    for r in (
        RecipeInfo(
            "pretrain",
            "nmm.train.recipes.next_token:PRETRAIN",
            "plain",
            "next-token loss on every token of the data's plain layout (text and image alike)",
        ),
        RecipeInfo(
            "sft",
            "nmm.train.recipes.next_token:SFT",
            "instruct",
            "instruction turns, loss on the answers only (caption, VQA answer, image to draw)",
        ),
        RecipeInfo(
            "opd",
            "nmm.train.recipes.opd:OPD",
            "instruct",
            "on-policy distillation: the student samples, the teacher phase's final weights score every sampled "
            "token (reverse KL)",
            OpdOptions,
            frozen="teacher",
            samples=True,
        ),
        RecipeInfo(
            "grpo",
            "nmm.train.recipes.grpo:GRPO",
            "instruct",
            "reinforcement learning with verifiable rewards: group-normalised advantages, clipped objective, KL "
            "penalty to the reference phase's final weights",
            GrpoOptions,
            frozen="reference",
            samples=True,
        ),
    )
}


def recipe(name: str) -> RecipeInfo:
    return entry(RECIPES, name, "recipe")


def implementation(name: str):
    """The recipe's step object (imports torch)."""
    return resolve(recipe(name).step)


def option_owners() -> dict[str, tuple[str, ...]]:
    """Each recipe option's name → the recipes that take it."""
    owners: dict[str, tuple[str, ...]] = {}
    for info in RECIPES.values():
        for name in info.option_names():
            owners[name] = owners.get(name, ()) + (info.name,)
    return owners
