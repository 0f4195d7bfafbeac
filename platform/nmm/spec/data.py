"""`spec.data`: the sources (built in, or the user's at a URI), the split, curation and the Ray
workers that curate on a cluster. No I/O here."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from nmm.data.kinds import BUILT_IN as BUILT_IN_SOURCES
from nmm.data.kinds import SOURCE_KINDS
from nmm.data.kinds import YOURS as USER_SOURCES
from nmm.data.kinds import kind as source_kind
from nmm.data.locate import brace_count
from nmm.plugins import resolve
from nmm.spec.base import Model

# A source URI: store://key (in the run's store), s3://bucket/key, file:///abs/path, /abs/path, or
# a path relative to where nmm runs; a glob
# (*, ?, [..]) and brace ranges ({000000..000099}, {a,b}) in its last parts.
_URI = (
    r"^(store://[^\s$`]+|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s$`]*)?|file:///[^\s$`]*|[A-Za-z0-9_./][^\s$`:]*)$"
)


class Columns(Model):
    """parquet only: which columns hold the image bytes and the caption."""

    image: Annotated[str, Field(min_length=1, max_length=128)] = "image"
    caption: Annotated[str, Field(min_length=1, max_length=128)] = "caption"


class HeldOut(Model):
    """Compositions a shapes source keeps out of training: every scene showing one goes to the
    test split, so no training prompt or image has it; evaluation scores seen and held-out
    scenes apart (`heldout_*` metrics)."""

    colour_shape: Annotated[list[str], Field(max_length=64)] = Field(
        default=[], description='"<colour> <shape>" pairs, e.g. "red circle": no such object in any training image.'
    )
    position_pairs: Annotated[list[str], Field(max_length=64)] = Field(
        default=[], description='"<shape> <relation> <shape>", e.g. "circle left of square" (either way round).'
    )


class Source(Model):
    """One raw-data source: built in, or yours at `uri` (nmm.data.kinds)."""

    kind: Literal[tuple(SOURCE_KINDS)] = Field(
        description="; ".join(
            f"{k.name}: {k.summary}{'' if k.built_in else ' (yours, at uri)'}" for k in SOURCE_KINDS.values()
        )
        + "."
    )
    name: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$")] | None = Field(
        default=None, description="How the ledger, the mixture and the metrics name it (default: its kind)."
    )
    uri: Annotated[str, Field(max_length=1024, pattern=_URI)] | None = Field(
        default=None, description="webdataset, parquet, folder: where the data lies (a glob or brace range)."
    )
    weight: Annotated[float, Field(gt=0.0, le=1000.0)] = Field(
        default=1.0,
        description="Mixture weight: this source's share of each training epoch is weight / sum of weights.",
    )
    limit: Annotated[int, Field(ge=10, le=10_000_000)] | None = Field(
        default=None, description="Use at most this many samples (after dedup)."
    )
    samples: Annotated[int, Field(ge=10, le=1_000_000)] = Field(
        default=2000, description="shapes only: how many scenes to render."
    )
    image_size: Annotated[int, Field(ge=8, le=256)] = Field(
        default=32,
        alias="imageSize",
        description="shapes: the side it renders; yours: the side images are resized and centre-cropped to.",
    )
    channels: Literal[1, 3] = Field(default=3, description="yours: 1 decodes to grey, 3 to RGB.")
    columns: Columns = Columns()
    ground_truth: Literal["digits", "shapes"] | None = Field(
        default=None,
        description="yours: the samples carry the ground truth of the built-in suites: digits, "
        'a class 0-9 (`.cls`, or "label" in the `.json`); shapes, a "scene" in the `.json`.',
    )
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    held_out: HeldOut | None = Field(
        default=None, description="shapes only: compositions kept out of training (to the test split) and scored apart."
    )

    @model_validator(mode="after")
    def _uri_for_yours_only(self) -> Source:
        if self.kind in USER_SOURCES:
            if not self.uri:
                raise ValueError(
                    f"a {self.kind} source needs uri (store://prefix/…, s3://bucket/prefix/…, file:///…, or a path)"
                )
            try:
                brace_count(self.uri)
            except ValueError as exc:
                raise ValueError(f"uri: {exc}") from None
        else:
            if self.uri is not None:
                raise ValueError(f"uri: the built-in {self.kind} source takes no uri")
            if self.ground_truth is not None:
                raise ValueError(f"groundTruth: the built-in {self.kind} source brings its own")
        if self.held_out is not None and self.kind != "shapes":
            raise ValueError(f"heldOut: only a shapes source holds compositions out, not {self.kind}")
        kind = source_kind(self.kind)
        if kind.check:  # the kind's own options
            resolve(kind.check)(self)
        if self.image_size < kind.min_side:
            raise ValueError(f"imageSize: {self.kind} takes {kind.min_side} pixels or more, got {self.image_size}")
        return self

    @property
    def label(self) -> str:
        return self.name or self.kind

    @property
    def image_shape(self) -> tuple[int, int]:
        """(side, channels) of the images this source yields."""
        k = source_kind(self.kind)
        return k.side or self.image_size, k.channels or self.channels

    @property
    def truth(self) -> str | None:
        """Which built-in suites' ground truth its samples carry."""
        return self.kind if self.kind in BUILT_IN_SOURCES else self.ground_truth


class Split(Model):
    train: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.7
    val: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    test: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2

    @model_validator(mode="after")
    def _sums_to_one(self) -> Split:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must add up to 1.0, got {total:g}")
        return self


class ModelFilter(Model):
    """Model-based filtering (DataComp's CLIP filter, with nmm's own model): score each kept pair as
    the caption's mean log-likelihood given the image under a registered nmm model; keep the top
    fraction, drop the rest as `low_alignment_score`."""

    model: Annotated[str, Field(pattern=r"^models:/[A-Za-z0-9][-A-Za-z0-9_.]{0,127}@[a-z][-a-z0-9_]{0,62}$")] = Field(
        description="models:/<registered model>@<alias>, e.g. models:/nmm-quickstart@champion"
    )
    keep_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9

    @property
    def name_alias(self) -> tuple[str, str]:
        name, _, alias = self.model.removeprefix("models:/").partition("@")
        return name, alias


class Curation(Model):
    """What curation drops. Undecodable images and empty captions always go; the rest is tuned here.
    Every dropped sample is a row of the dataset's ledger, with its reason."""

    dedup: Literal["exact", "near", "none"] | None = Field(
        default=None,
        description="exact: identical decoded pixels; near: exact, then near-duplicate images "
        "(perceptual hash) and captions (MinHash). Default: near when a source is yours, else exact.",
    )
    min_side: Annotated[int, Field(ge=1, le=8192)] = Field(default=16, description="pixels, before resizing")
    max_aspect: Annotated[float, Field(ge=1.0, le=100.0)] = 3.0
    blank_std: Annotated[float, Field(ge=0.0, le=0.5)] = Field(
        default=0.02, description="drop near-constant images: pixel standard deviation (0..1) under this"
    )
    min_words: Annotated[int, Field(ge=0, le=1000)] = 1
    max_words: Annotated[int, Field(ge=1, le=10_000)] = 64
    image_radius: Annotated[int, Field(ge=0, le=16)] = Field(
        default=6, description="near: images whose 64-bit perceptual hashes differ in at most this many bits"
    )
    caption_dedup: bool = Field(default=True, description="near: also drop near-duplicate captions")
    caption_threshold: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        default=0.9, description="near: captions whose word-bigram Jaccard similarity is at least this"
    )
    model_filter: ModelFilter | None = None

    @model_validator(mode="after")
    def _words(self) -> Curation:
        if self.min_words > self.max_words:
            raise ValueError(f"minWords ({self.min_words}) is over maxWords ({self.max_words})")
        return self


class RayWorkers(Model):
    """On Kubernetes, curate runs as a KubeRay RayJob of this size (locally: a local Ray)."""

    workers: Annotated[int, Field(ge=1, le=1000)] = 2
    cpu: Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?m?$")] = "2"
    memory: Annotated[str, Field(pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)?$")] = "4Gi"


class Data(Model):
    sources: Annotated[list[Source], Field(min_length=1, max_length=16)]
    split: Split = Split()
    curation: Curation = Curation()
    captions_per_image: Annotated[int, Field(ge=1, le=8)] = 1
    position_answers: Literal["verdict", "grounded"] = Field(
        default="verdict",
        description="shapes scenes' position questions: `verdict` answers yes or no; `grounded` "
        "places both objects on the asked axis of an 8×8 grid over the image and says the relation there first "
        '("is the circle right of the square?" → "circle x1 square x6 left of no"), asks each axis both ways, '
        'and adds "where is the circle?" pairs. Evaluation scores the verdict, and the grounding apart.',
    )
    draw_plans: Literal["none", "layout"] = Field(
        default="none",
        description="shapes scenes: `layout` starts every drawing (M2G) target "
        "with the scene's layout in words — each object's colour, shape and grid cell, \"red triangle x1 y5 blue "
        'square x6 y1" — then the image. The model writes that plan before it draws (evaluation, grpo and the '
        "server alike), so binding a colour or a relation to a shape is done in words, and the image follows the "
        "plan. Every source must carry shapes ground truth.",
    )
    ray: RayWorkers | None = None

    @model_validator(mode="after")
    def _plans_need_scenes(self) -> Data:
        if self.draw_plans != "none":
            without = [s.label for s in self.sources if s.truth != "shapes"]
            if without:
                raise ValueError(
                    f"drawPlans: {self.draw_plans} needs every source to carry shapes scenes "
                    f"(a shapes source, or groundTruth: shapes); {', '.join(without)} does not"
                )
        return self

    @field_validator("sources")
    @classmethod
    def _one_image_shape(cls, sources: list[Source]) -> list[Source]:
        labels = [s.label for s in sources]
        if len(set(labels)) != len(labels):
            raise ValueError(f"each source needs its own name (default: its kind), got {labels}")
        for kind in BUILT_IN_SOURCES:
            if sum(s.kind == kind for s in sources) > 1:
                raise ValueError(f"the built-in {kind} source may appear once")
        shapes = {s.label: s.image_shape for s in sources}
        if len(set(shapes.values())) > 1:
            raise ValueError(
                "all sources must give images of one shape (one image tokenizer): "
                + ", ".join(f"{k} {side}x{side}x{c}" for k, (side, c) in shapes.items())
            )
        return sources

    @property
    def dedup(self) -> str:
        """The dedup in force: as set, else near when a source is the user's, else exact."""
        if self.curation.dedup:
            return self.curation.dedup
        return "near" if any(s.kind in USER_SOURCES for s in self.sources) else "exact"

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.sources[0].image_shape

    @property
    def grounded_on(self) -> int | None:
        """The images' side when position answers are grounded (nmm.data.shapes.vqa_pairs), else None."""
        return self.image_shape[0] if self.position_answers == "grounded" else None
