"""The `spec.training` section of an `NMMPipeline`: phases and their recipes, resources,
parallelism, checkpoints, restarts and Kueue admission. No I/O here."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from nmm.spec import names
from nmm.spec.base import Model
from nmm.train.recipes import RECIPES, option_owners
from nmm.train.recipes import recipe as recipe_info

# The rewards a grpo phase can score completions with: the task whose rows each scores, and the
# ground truth it reads (None: the row's own reference answer).
REWARDS: dict[str, dict] = {
    "vqa_exact": {"task": "m2t", "source": None},  # the written answer equals the row's reference answer
    "digits_judge": {"task": "m2g", "source": "digits"},  # the digits classifier reads the prompt's digit
    "shapes_geneval": {"task": "m2g", "source": "shapes"},  # the GenEval rules hold for the prompt's scene
}
RewardName = Literal[tuple(REWARDS)]
PhaseName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")]


class Phase(Model):
    name: PhaseName = "pretrain"
    recipe: Literal[tuple(RECIPES)] = Field(
        default="pretrain",
        description="; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values()) + ".",
    )
    teacher: PhaseName | None = Field(
        default=None, description="opd only: the earlier phase whose final weights teach."
    )
    temperature: Annotated[float, Field(gt=0.0, le=5.0)] = Field(
        default=1.0, description="opd and grpo: the sampling temperature."
    )
    reference: PhaseName | None = Field(
        default=None,
        description="grpo only: the earlier phase whose final weights the KL penalty keeps the policy near.",
    )
    reward: dict[RewardName, Annotated[float, Field(gt=0.0, le=100.0)]] | None = Field(
        default=None,
        description="grpo only: a reward's name, or {name: weight, …} summed: vqa_exact (M2T rows), "
        "digits_judge and shapes_geneval (M2G rows).",
    )
    group: Annotated[int, Field(ge=2, le=64)] = Field(default=4, description="grpo: completions sampled per prompt.")
    clip: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        default=0.2, description="grpo: the ratio's clip range, 1 ± clip."
    )
    kl_weight: Annotated[float, Field(ge=0.0, le=10.0)] = Field(
        default=0.04, description="grpo: the KL penalty's weight."
    )
    guidance: Annotated[float, Field(ge=1.0, le=10.0)] = Field(
        default=1.0,
        description="grpo: classifier-free guidance while the phase draws (its M2G samples, and the "
        "probabilities its ratio and KL penalty compare), as evaluation.guidance draws; 1: none. Needs a model "
        "that learned unconditional drawing (captionDropout in an earlier phase).",
    )
    updates: Annotated[int, Field(ge=1, le=8)] = Field(
        default=1,
        description="grpo: optimizer steps on each sampled batch; above 1 the ratio to the sampling "
        "policy moves off 1 and the clip can bind.",
    )
    samples_every: Annotated[int, Field(ge=1, le=10_000_000)] = Field(
        default=50,
        description="grpo: a grid of the phase's sampled images (and its sampled answers) goes to "
        "its MLflow run every this many steps, and at its last step.",
    )
    steps: Annotated[int, Field(ge=1, le=10_000_000)]
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 32
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-3
    warmup_steps: Annotated[int, Field(ge=0, le=10_000_000)] = 0
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    mixture: dict[Literal["m2t", "m2g"], Annotated[float, Field(gt=0.0, le=1.0)]] | None = None
    caption_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        default=0.0,
        description="Share of M2G sequences whose caption is blanked (padding tokens), so the "
        "model also learns unconditional generation: what classifier-free guidance needs.",
    )

    @field_validator("reward", mode="before")
    @classmethod
    def _one_reward(cls, v: Any) -> Any:
        return {v: 1.0} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _warmup_fits(self) -> Phase:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmupSteps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        return self

    @model_validator(mode="after")
    def _options_of_its_recipe(self) -> Phase:
        """A recipe's own options (nmm.train.recipes) are set on its phases only, and the ones
        it needs are set."""
        info = recipe_info(self.recipe)
        for name, owners in option_owners().items():
            alias = type(self).model_fields[name].alias or name
            if name not in info.option_names() and getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(f"{alias}: only {' and '.join(owners)} phases take it, not {self.recipe} phases")
        for name in info.required():
            if not getattr(self, name):
                alias = type(self).model_fields[name].alias or name
                raise ValueError(
                    f"{alias}: every {self.recipe} phase needs it ({type(self).model_fields[name].description})"
                )
        return self


class Resources(Model):
    """What the training step asks for. On a cluster: PyTorchJob replicas and GPUs;
    locally: processes on this machine (GPUs when present)."""

    nodes: Annotated[int, Field(ge=1, le=1024)] = 1
    processes_per_node: Annotated[int, Field(ge=1, le=64)] | None = None
    gpus_per_node: Annotated[int, Field(ge=1, le=16)] | None = None
    gpu_product: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,62}$")] | None = None
    gpu_memory_gib: Annotated[int, Field(ge=1, le=1024)] | None = Field(default=None, alias="gpuMemoryGiB")
    cpu: Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?m?$")] = "2"
    memory: Annotated[str, Field(pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)?$")] = "4Gi"

    @model_validator(mode="after")
    def _one_way_to_count(self) -> Resources:
        if self.processes_per_node and self.gpus_per_node:
            raise ValueError("set processesPerNode (CPU) or gpusPerNode (GPU), not both")
        if (self.gpu_product or self.gpu_memory_gib) and not self.gpus_per_node:
            raise ValueError("gpuProduct / gpuMemoryGiB need gpusPerNode")
        return self

    @property
    def procs_per_node(self) -> int:
        return self.gpus_per_node or self.processes_per_node or 1


class Parallelism(Model):
    """How the training step uses its devices (torchtitan's habits)."""

    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 autocast on GPUs, fp32 on CPUs."
    )
    compile: Literal["auto"] | bool = Field(
        default="auto", description="torch.compile each transformer block; auto: on GPUs, not on CPUs."
    )
    fsdp: bool = Field(
        default=False,
        description="Shard parameters, gradients and optimizer state across ranks (FSDP2) "
        "instead of replicating them (DDP): for models that do not fit one device.",
    )
    pack: Literal["auto"] | bool = Field(
        default="auto",
        description="Pack each batch's sequences end to end with document masks (FlexAttention "
        "on GPUs) instead of padding them: pretrain and sft phases of early-fusion models. "
        "auto: on GPUs for early fusion, not on CPUs.",
    )


class Checkpoint(Model):
    interval_steps: Annotated[int, Field(ge=1, le=10_000_000)] = 500
    keep_latest: Annotated[int, Field(ge=1, le=100)] = 2


class Training(Model):
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    phases: Annotated[list[Phase], Field(min_length=1, max_length=8)]
    resources: Resources = Resources()
    parallelism: Parallelism = Parallelism()
    checkpoint: Checkpoint = Checkpoint()
    max_restarts: Annotated[int, Field(ge=0, le=100)] = 2
    queue: Annotated[str, Field(max_length=names.MAX_LABEL, pattern=names.DNS1123_LABEL)] | None = Field(
        default=None,
        description="Kueue LocalQueue of the training job (cluster only): the PyTorchJob waits, suspended, until "
        "Kueue admits the whole gang on the queue's quota. Default: the chart's kueue.localQueue when Kueue is on.",
    )
    priority_class: Annotated[str, Field(max_length=names.MAX_LABEL, pattern=names.DNS1123_LABEL)] | None = Field(
        default=None, description="Kueue WorkloadPriorityClass of the training job (cluster only; needs a queue)."
    )

    @field_validator("phases")
    @classmethod
    def _unique_names(cls, phases: list[Phase]) -> list[Phase]:
        names = [p.name for p in phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        return phases

    @model_validator(mode="after")
    def _fsdp_without_opd(self) -> Training:
        sampling = [p.name for p in self.phases if recipe_info(p.recipe).samples]
        if self.parallelism.fsdp and sampling:
            raise ValueError(
                f"parallelism.fsdp: phases that sample while training ({sampling}) sample per rank and "
                "run with DDP; turn fsdp off or drop them"
            )
        return self

    @model_validator(mode="after")
    def _teachers_come_first(self) -> Training:
        names = [p.name for p in self.phases]
        for i, p in enumerate(self.phases):
            field = recipe_info(p.recipe).frozen
            frozen = getattr(p, field) if field else None
            if frozen is not None and frozen not in names[:i]:
                raise ValueError(f"phases[{i}].{field}: {frozen!r} must name an earlier phase, one of {names[:i]}")
        return self
