"""Pydantic models of an `NMMPipeline` (apiVersion nmm.dev/v1alpha1). No I/O here.

Field names are camelCase in YAML (Kubernetes convention) and snake_case in Python.
Unknown fields are errors everywhere (`extra="forbid"`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from nmm.data.kinds import kind as source_kind
from nmm.modalities import MODALITIES
from nmm.spec import names
from nmm.spec.base import Model
from nmm.spec.data import Data
from nmm.spec.serving import MODEL_NAME, Serving
from nmm.spec.training import REWARDS, Phase, Training

API_VERSION = "nmm.dev/v1alpha1"
KIND = "NMMPipeline"

# Kubernetes label syntax: an optional DNS-subdomain prefix and "/", then a name; values alike.
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_LABEL_NAME}$")
LABEL_VALUE = re.compile(rf"^({_LABEL_NAME})?$")
# Labels nmm (or Kubernetes) sets itself: a user's label may not take them over.
RESERVED_LABEL_PREFIXES = ("nmm.dev/", "kubernetes.io/", "k8s.io/")
RESERVED_LABELS = ("app.kubernetes.io/managed-by",)

# A gate reads "<suite metric> <op> <threshold>", e.g. "m2t.digits.accuracy >= 0.9".
GATE_PATTERN = re.compile(r"^\s*([a-z0-9_]+\.[a-z0-9_]+\.[a-z0-9_]+)\s*(>=|<=|>|<|==)\s*(-?[0-9]*\.?[0-9]+)\s*$")

# What each evaluation suite measures, and the data source and task it needs.
GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SUITES: dict[str, dict] = {
    "m2t.digits": {"metrics": ["accuracy"], "source": "digits", "task": "m2t"},
    "m2g.digits": {"metrics": ["accuracy"], "source": "digits", "task": "m2g"},
    # GenEval's rules on held-out shapes prompts: overall = mean of the six task columns.
    # With held-out compositions (data.sources[].heldOut) the seen scenes give these and the
    # held-out ones the same names prefixed heldout_.
    "m2g.shapes_geneval": {
        "metrics": ["overall", *GENEVAL_TASKS, "plan_overall", "plan_followed"],  # data.drawPlans: layout only
        "source": "shapes",
        "task": "m2g",
    },
    # VQA exact match on held-out scenes; POPE: yes/no existence probes, F1 with "yes" positive.
    "m2t.shapes_vqa": {
        "metrics": [
            "accuracy",
            "colour_accuracy",
            "count_accuracy",
            "position_accuracy",
            "position_grounding_accuracy",
            "place_accuracy",  # data.positionAnswers: grounded only
            "pope_accuracy",
            "pope_f1",
            "pope_yes_ratio",
        ],
        "source": "shapes",
        "task": "m2t",
    },
}


# The suites whose held-out cases a canary's quality probe asks, per task the model serves
# (nmm.rollout.probe grades them as the suite does: captions and answers; drawings by the suite's judge).
PROBE_SUITES = {"m2t": ("m2t.digits", "m2t.shapes_vqa"), "m2g": ("m2g.digits", "m2g.shapes_geneval")}


class NamespaceConflict(ValueError):
    """A --namespace flag that contradicts metadata.namespace."""


# --- model ------------------------------------------------------------------------------


class TextTokenizer(Model):
    kind: Literal["bpe", "byte"] = "bpe"
    vocab_size: Annotated[int, Field(ge=64, le=65_536)] = 128


IMAGE_TOKENIZER_DEFAULTS = {"patch-vq": {"codebook_size": 128}, "colour-mask": {"colours": 16, "masks": 32}}


class ImageTokenizer(Model):
    """patch-vq: a k-means codebook of whole patches (codebookSize codes). colour-mask: each patch
    as a colour from a palette (colours, the background one of them) and a binary mask from a
    codebook (masks): codes are the colours × masks pairs, and the model embeds and draws a pair
    from its two factors, so a colour never seen on a shape in training can still be drawn on
    it. For flat-colour images (the shapes source, diagrams); photographs need patch-vq."""

    kind: Literal["patch-vq", "colour-mask"] = "patch-vq"
    patch_size: Annotated[int, Field(ge=1, le=32)] = 2
    # each kind's own settings (unset: its default below; set on the other kind: refused)
    codebook_size: Annotated[int, Field(ge=2, le=65_536)] | None = None
    colours: Annotated[int, Field(ge=2, le=256)] | None = None
    masks: Annotated[int, Field(ge=2, le=4096)] | None = None

    @model_validator(mode="after")
    def _settings_of_kind(self) -> ImageTokenizer:
        for kind, defaults in IMAGE_TOKENIZER_DEFAULTS.items():
            for name, default in defaults.items():
                if kind != self.kind and getattr(self, name) is not None:
                    raise ValueError(f"{to_camel(name)}: a setting of kind {kind}, not of {self.kind}")
                if kind == self.kind and getattr(self, name) is None:
                    object.__setattr__(self, name, default)  # frozen: filled in once, here
        return self


class Tokenizers(Model):
    text: TextTokenizer = TextTokenizer()
    image: ImageTokenizer = ImageTokenizer()


class Size(Model):
    dim: Annotated[int, Field(ge=16, le=16_384)] = 128
    layers: Annotated[int, Field(ge=1, le=256)] = 4
    heads: Annotated[int, Field(ge=1, le=256)] = 4
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> Size:
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if (self.dim // self.heads) % 2:
            raise ValueError("dim / heads must be even (rotary embeddings rotate pairs)")
        return self


class Encoder(Model):
    """late fusion only: the separately trained image encoder (masked patch reconstruction on
    the train images, then frozen)."""

    dim: Annotated[int, Field(ge=8, le=4096)] = 64
    layers: Annotated[int, Field(ge=1, le=48)] = 2
    steps: Annotated[int, Field(ge=1, le=1_000_000)] = 300

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> Encoder:
        if self.dim % 4:
            raise ValueError(f"dim ({self.dim}) must be divisible by 4 (the encoder's heads)")
        return self


class ModelSpec(Model):
    fusion: Literal["early", "mid", "late"] = Field(
        default="early",
        description="early: one shared vocabulary of text and image tokens in one transformer; "
        "mid: a patch-projection stem feeds continuous patch embeddings into the same backbone "
        "from its first layer (M2T); late: a separately trained, frozen image encoder + "
        "projector into the LM, the non-native baseline (M2T).",
    )
    tasks: Annotated[list[Literal["m2t", "m2g"]], Field(min_length=1, max_length=2)] = ["m2t", "m2g"]
    modalities: Annotated[list[Literal["text", "image"]], Field(min_length=2, max_length=2)] = [
        "text",
        "image",
    ]
    size: Size = Size()
    tokenizers: Tokenizers = Tokenizers()
    z_loss: Annotated[float, Field(ge=0.0, le=1.0)] = 1e-4
    qk_norm: bool = True
    image_attention: Literal["causal", "bidirectional"] = Field(
        default="causal",
        description="causal: every position sees only the past; bidirectional (Transfusion-style): "
        "the positions of an input image (the image of M2T/VQA, not one being generated) see the "
        "whole image. Next-token targets inside such an image are then dropped from the loss "
        "(they would be visible).",
    )
    image_positions: Literal["sequence", "grid"] = Field(
        default="sequence",
        description="sequence: an image position's only position is its place in the sequence "
        "(1-D RoPE, as Chameleon); grid: each image position also gets learned row and column "
        "embeddings of its patch in the image, so the model need not work out where a patch sits "
        "from its sequence position (relations such as 'left of' read off directly).",
    )
    loss_weights: dict[Literal[tuple(MODALITIES)], Annotated[float, Field(ge=0.0, le=100.0)]] = Field(
        default={"text": 1.0, "image": 1.0},
        description="Per-modality weights of the target tokens' loss, by modality name (one not named weighs 1).",
    )
    encoder: Encoder = Encoder()

    @model_validator(mode="after")
    def _fusion_tasks(self) -> ModelSpec:
        if self.fusion != "early" and self.tasks != ["m2t"]:
            raise ValueError(
                f"fusion {self.fusion!r} reads images through a stem and generates text only: "
                f"tasks must be [m2t], got {self.tasks}"
            )
        return self

    @property
    def category(self) -> str:
        """M2T, M2G, or M2M when one model does both."""
        return "M2M" if set(self.tasks) == {"m2t", "m2g"} else self.tasks[0].upper()


# --- evaluation and rollout -------------------------------------------------------------


class Gate(Model):
    metric: str
    op: Literal[">=", "<=", ">", "<", "=="]
    threshold: float

    def passes(self, value: float) -> bool:
        return {
            ">=": value >= self.threshold,
            "<=": value <= self.threshold,
            ">": value > self.threshold,
            "<": value < self.threshold,
            "==": value == self.threshold,
        }[self.op]

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


def parse_gate(text: str) -> Gate:
    m = GATE_PATTERN.match(text)
    if not m:
        raise ValueError(
            f"gate {text!r} must read '<suite>.<dataset>.<metric> <op> <number>', e.g. 'm2t.digits.accuracy >= 0.9'"
        )
    return Gate(metric=m.group(1), op=m.group(2), threshold=float(m.group(3)))


class Evaluation(Model):
    suites: Annotated[list[str], Field(min_length=1, max_length=32)]
    gates: Annotated[list[str], Field(max_length=64)] = []
    generations_per_class: Annotated[int, Field(ge=1, le=1000)] = 10
    prompts_per_task: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=50, description="m2g.shapes_geneval: held-out prompts per GenEval task."
    )
    vqa_images: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=300, description="m2t.shapes_vqa: held-out images whose questions are asked."
    )
    temperature: Annotated[float, Field(gt=0.0, le=5.0)] = 0.7
    seesaw: bool = Field(
        default=True,
        description="Also evaluate the weights of every interval checkpoint (on a fifth of the "
        "data): understanding and generation per step, the see-saw, as MLflow metrics and a plot.",
    )
    guidance: Annotated[float, Field(ge=0.0, le=20.0)] = Field(
        default=1.0,
        description="Classifier-free guidance scale for image tokens (1 = off; needs training "
        "with captionDropout > 0).",
    )

    @field_validator("suites")
    @classmethod
    def _known_suites(cls, suites: list[str]) -> list[str]:
        for s in suites:
            if s not in SUITES:
                raise ValueError(f"unknown suite {s!r}; expected one of {sorted(SUITES)}")
        return suites

    @field_validator("gates")
    @classmethod
    def _parse_gates(cls, gates: list[str]) -> list[str]:
        for g in gates:
            parse_gate(g)
        return gates

    @property
    def parsed_gates(self) -> list[Gate]:
        return [parse_gate(g) for g in self.gates]


class Rollout(Model):
    registered_model_name: Annotated[str, Field(pattern=MODEL_NAME)]
    serving: Serving | None = Field(
        default=None,
        description="Serve the model and roll a promoted version out as a canary (judged by "
        "SLOs and a quality probe); unset, promotion only moves the registry alias.",
    )


# --- the pipeline -----------------------------------------------------------------------


class Metadata(Model):
    name: Annotated[str, Field(min_length=1, max_length=names.MAX_PIPELINE_NAME, pattern=names.DNS1035)] = Field(
        description="A DNS-1035 label (a lowercase letter first): the names derived from it (the run, "
        "the PyTorchJob and its pods' Services) must stay within 63 characters."
    )
    namespace: Annotated[str, Field(max_length=names.MAX_LABEL, pattern=names.DNS1123_LABEL)] | None = None
    labels: Annotated[dict[str, str], Field(max_length=64)] = Field(
        default={},
        description="Kubernetes labels for the Workflow; nmm.dev/*, kubernetes.io/*, k8s.io/* "
        "and app.kubernetes.io/managed-by are reserved.",
    )

    @field_validator("labels")
    @classmethod
    def _kubernetes_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            prefix, _, name = key.rpartition("/")
            if not LABEL_KEY.match(key) or len(prefix) > 253 or len(name) > names.MAX_LABEL:
                raise ValueError(
                    f"{key!r} is not a Kubernetes label key ([prefix/]name, name ≤ 63 characters "
                    "of letters, digits, '-', '_', '.')"
                )
            if key in RESERVED_LABELS or key.startswith(RESERVED_LABEL_PREFIXES):
                raise ValueError(f"{key!r} is reserved (nmm sets it); choose another key")
            if len(value) > names.MAX_LABEL or not LABEL_VALUE.match(value):
                raise ValueError(
                    f"value of {key!r} must be ≤ 63 letters, digits, '-', '_', '.', "
                    f"starting and ending alphanumeric (got {value[:70]!r})"
                )
        return labels


class Variant(Model):
    """One arm of an ablation: its own train and evaluate steps on the same data and budget."""

    name: Annotated[str, Field(pattern=rf"^[a-z][a-z0-9]{{0,{names.MAX_VARIANT_NAME - 1}}}$")]
    model: dict[str, Any] = Field(
        default={}, description="Overrides of spec.model for this variant (merged key by key)."
    )
    seeds: Annotated[int, Field(ge=1, le=10)] = Field(
        default=1,
        description="Run the variant on this many seeds (training.seed, +1, …): steps "
        "train-<name>s<k> / evaluate-<name>s<k>, and the metrics' mean and standard deviation.",
    )

    @model_validator(mode="after")
    def _seeded_names_fit(self) -> Variant:
        if self.seeds > 1 and len(self.runs[-1][0]) > names.MAX_VARIANT_NAME:
            raise ValueError(
                f"name: {self.name!r} with {self.seeds} seeds makes step names like "
                f"{self.runs[-1][0]!r}, over {names.MAX_VARIANT_NAME} characters; shorten it"
            )
        return self

    @property
    def runs(self) -> list[tuple[str, int]]:
        """(run name, seed offset) of each seed: the name itself for one seed, else <name>s<k>."""
        return [(self.name, 0)] if self.seeds == 1 else [(f"{self.name}s{k}", k) for k in range(self.seeds)]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class PipelineBody(Model):
    data: Data
    model: ModelSpec = ModelSpec()
    training: Training
    evaluation: Evaluation
    rollout: Rollout
    variants: Annotated[list[Variant], Field(max_length=8)] = Field(
        default=[],
        description="An ablation: each variant trains and is evaluated side by side (its own "
        "train-<name> and evaluate-<name> steps, sibling runs in MLflow); the first variant is "
        "the rollout candidate.",
    )
    on_workflow_deleted: Literal["report", "recreate"] | None = Field(
        default=None,
        description="On a cluster, when this pipeline's Workflow is deleted behind the operator's "
        "back: report it (status Error) or recreate it. Unset: the operator's default.",
    )

    def for_variant(self, name: str) -> PipelineBody:
        """This body with a variant's model overrides applied (and no variants); `name` is one of
        its runs (<name>s<k> on seed training.seed + k when it has several seeds)."""
        found = next(((v, k) for v in self.variants for run, k in v.runs if run == name), None)
        if found is None:
            raise ValueError(f"no variant {name!r}; variants are {[r for v in self.variants for r, _ in v.runs]}")
        v, k = found
        body = self.model_dump(mode="json", by_alias=True)
        body.update(model=_merge(body["model"], v.model), variants=[])
        body["training"]["seed"] += k
        return PipelineBody.model_validate(body)

    @model_validator(mode="after")
    def _variants_valid(self) -> PipelineBody:
        names = [v.name for v in self.variants]
        runs = [r for v in self.variants for r, _ in v.runs]
        if len(set(names)) != len(names) or len(set(runs)) != len(runs):
            raise ValueError(f"variants: names (and their seeds' runs) must be unique, got {runs}")
        for i, v in enumerate(self.variants):
            try:
                self.for_variant(v.runs[-1][0])  # (its last seed: the seed's range is checked too)
            except ValidationError as exc:
                err = exc.errors(include_url=False)[0]
                where = ".".join(str(p) for p in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                raise ValueError(f"variants[{i}].{where}: {msg}") from None
        return self

    @model_validator(mode="after")
    def _consistent(self) -> PipelineBody:
        truths = {s.truth for s in self.data.sources}
        for suite in self.evaluation.suites:
            need = SUITES[suite]
            if need["source"] not in truths:
                raise ValueError(
                    f"evaluation.suites: {suite!r} grades samples with {need['source']} ground truth; no source "
                    f"has it (a {need['source']} source, or one of yours with groundTruth: {need['source']})"
                )
            if need["task"] not in self.model.tasks:
                raise ValueError(
                    f"evaluation.suites: {suite!r} evaluates task {need['task']!r} "
                    f"but model.tasks is {self.model.tasks}"
                )
        given = sorted({m for s in self.data.sources for m in source_kind(s.kind).modalities})
        for m in self.model.loss_weights:
            if m not in given:
                raise ValueError(f"model.lossWeights.{m}: no source gives {m} (the sources give {', '.join(given)})")
        held = any(s.held_out is not None for s in self.data.sources)
        measured = {f"{s}.{m}" for s in self.evaluation.suites for m in SUITES[s]["metrics"]}
        if held:  # the shapes suites score held-out compositions apart
            measured |= {
                f"{s}.heldout_{m}"
                for s in self.evaluation.suites
                if SUITES[s]["source"] == "shapes"
                for m in SUITES[s]["metrics"]
            }
        grounded_only = ("position_grounding_accuracy", "place_accuracy")
        if self.data.position_answers != "grounded":
            measured = {m for m in measured if not m.endswith(grounded_only)}
        planned_only = ("plan_overall", "plan_followed")
        if self.data.draw_plans == "none":
            measured = {m for m in measured if not m.endswith(planned_only)}
        for gate in self.evaluation.parsed_gates:
            if gate.metric not in measured:
                hint = "; heldout_ metrics need a shapes source with heldOut" if ".heldout_" in gate.metric else ""
                if gate.metric.endswith(grounded_only):
                    hint = "; it needs data.positionAnswers: grounded"
                if gate.metric.endswith(planned_only):
                    hint = "; it needs data.drawPlans: layout"
                raise ValueError(
                    f"evaluation.gates: {gate.metric!r} is not measured by the listed suites "
                    f"(they measure {sorted(measured)}){hint}"
                )
        probe = self.rollout.serving.canary.analysis.quality_probe if self.rollout.serving else None
        unprobed = [t for t in self.model.tasks if not set(PROBE_SUITES[t]) & set(self.evaluation.suites)]
        if probe is not None and probe.cases_uri is None and unprobed:
            raise ValueError(
                f"rollout.serving.canary.analysis.qualityProbe: the probe covers every task the model serves, and "
                f"evaluation.suites has no held-out cases of {unprobed[0]} (one of "
                f"{', '.join(PROBE_SUITES[unprobed[0]])}); add one, give casesUri, or qualityProbe: null to judge "
                "canaries on SLOs alone"
            )
        if self.training.parallelism.pack is True and self.model.fusion != "early":
            raise ValueError(
                f"training.parallelism.pack: packing needs fusion early (mid/late fusion rows each "
                f"carry one image's pixels); model.fusion is {self.model.fusion!r}"
            )
        for i, phase in enumerate(self.training.phases):
            if phase.mixture and not set(phase.mixture) <= set(self.model.tasks):
                raise ValueError(
                    f"training.phases[{i}].mixture: names tasks {sorted(phase.mixture)} "
                    f"outside model.tasks {self.model.tasks}"
                )
            self._rewards_fit(i, phase, truths)
        return self

    def _rewards_fit(self, i: int, phase: Phase, truths: set) -> None:
        """A grpo phase's rewards score the rows its mixture draws: each reward's task is in the
        mixture, each task of the mixture has a reward, and a judge's ground truth is in the data."""
        if not phase.reward:
            return
        tasks = set(phase.mixture or self.model.tasks)
        for name in phase.reward:
            need = REWARDS[name]
            if need["task"] not in tasks:
                raise ValueError(
                    f"training.phases[{i}].reward: {name!r} scores {need['task']} rows, and the phase trains "
                    f"on {sorted(tasks)}"
                )
            if need["source"] is not None and need["source"] not in truths:
                raise ValueError(
                    f"training.phases[{i}].reward: {name!r} judges with {need['source']} ground truth; no "
                    f"source has it (a {need['source']} source, or one with groundTruth: {need['source']})"
                )
        unscored = tasks - {REWARDS[n]["task"] for n in phase.reward}
        if unscored:
            raise ValueError(
                f"training.phases[{i}].reward: nothing scores the phase's {sorted(unscored)} rows; add a "
                f"reward for them or drop them from the mixture"
            )


class PipelineSpec(Model):
    api_version: Literal["nmm.dev/v1alpha1"]
    kind: Literal["NMMPipeline"]
    metadata: Metadata
    spec: PipelineBody

    @model_validator(mode="after")
    def _derived_names_fit(self) -> PipelineSpec:
        longest = names.longest_derived_name(self.metadata.name, self.variant_names)
        if len(longest) > names.MAX_LABEL:
            over = len(longest) - names.MAX_LABEL
            raise ValueError(
                f"metadata.name: {self.metadata.name!r} with the variants' names makes Kubernetes names of up "
                f"to {len(longest)} characters ({longest!r}); the limit is {names.MAX_LABEL}: shorten the "
                f"name or the longest variant by {over}"
            )
        return self

    def for_variant(self, name: str | None) -> PipelineSpec:
        """The spec one variant's steps run (itself when `name` is None)."""
        if name is None:
            return self
        return self.model_copy(update={"spec": self.spec.for_variant(name)})

    def resolve_namespace(self, flag: str | None, fallback: str) -> str:
        """The one precedence for every command (compile, run, submit), kubectl's: a --namespace
        flag and metadata.namespace must agree when both are given; either wins over the
        fallback (the kube context's, or the compile settings')."""
        declared = self.metadata.namespace
        if flag and declared and flag != declared:
            raise NamespaceConflict(
                f"--namespace {flag!r} contradicts metadata.namespace {declared!r}: drop one or make them agree"
            )
        return flag or declared or fallback

    @property
    def variant_names(self) -> list[str]:
        """The variants' runs: each variant's name, or <name>s<k> per seed (its own train and
        evaluate steps)."""
        return [r for v in self.spec.variants for r, _ in v.runs]

    @property
    def seed_groups(self) -> dict[str, list[str]]:
        """Variant → its runs, when a variant runs on several seeds (else empty)."""
        if not any(v.seeds > 1 for v in self.spec.variants):
            return {}
        return {v.name: [r for r, _ in v.runs] for v in self.spec.variants}
