"""Pydantic models of serving: the canary policy (steps and analysis), shared by a pipeline's
`spec.rollout.serving` and an `NMMService` (apiVersion nmm.dev/v1alpha1). No I/O here."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from nmm.serve.batcher import BATCHING
from nmm.spec import names
from nmm.spec.base import Model

SERVICE_KIND = "NMMService"
ANNOTATION_PROMOTE = "nmm.dev/promote"  # `nmm promote` / `nmm rollback`: the operator serves this version at once
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ALIAS = r"^[A-Za-z][A-Za-z0-9_-]{0,62}$"


class CanaryStep(Model):
    weight: Annotated[int, Field(ge=1, le=100)] = Field(description="Percent of traffic the candidate takes.")
    pause_seconds: Annotated[float, Field(ge=0, le=86_400)] = Field(
        default=0, description="How long traffic flows at this weight before the analysis judges it."
    )


class QualityProbe(Model):
    """A slice of the evaluation suite's held-out cases, sent to both versions at each step: the
    candidate must not score below the stable version by more than `maxQualityDrop`."""

    cases: Annotated[int, Field(ge=1, le=2_000)] = 40
    max_quality_drop: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    cases_uri: Annotated[str, Field(max_length=2048, pattern=r"^(s3|store|file)://[^\s$`{}]+$")] | None = Field(
        default=None,
        description="The probe's cases (JSON lines); a pipeline's rollout writes them from the "
        "evaluation split and fills this in.",
    )


class Analysis(Model):
    max_error_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.02
    max_p95_latency_ms: Annotated[float, Field(gt=0, le=600_000)] = 5_000
    max_time_to_first_token_ms: Annotated[float, Field(gt=0, le=600_000)] = 5_000
    min_requests: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=10,
        description="Fewer candidate requests than this in a step is no evidence: the step fails.",
    )
    quality_probe: QualityProbe | None = QualityProbe()


def _default_steps() -> list[CanaryStep]:
    return [CanaryStep(weight=10, pause_seconds=60), CanaryStep(weight=50, pause_seconds=120), CanaryStep(weight=100)]


class Canary(Model):
    steps: Annotated[list[CanaryStep], Field(min_length=1, max_length=20)] = Field(default_factory=_default_steps)
    analysis: Analysis = Analysis()

    @field_validator("steps")
    @classmethod
    def _rising_to_all(cls, steps: list[CanaryStep]) -> list[CanaryStep]:
        weights = [s.weight for s in steps]
        if any(b <= a for a, b in zip(weights, weights[1:])):
            raise ValueError(f"step weights must rise strictly, got {weights}")
        if weights[-1] != 100:
            raise ValueError(f"the last step must send all traffic to the candidate (weight 100), got {weights[-1]}")
        return steps


class ServingResources(Model):
    cpu: Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?m?$")] = "1"
    memory: Annotated[str, Field(pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)?$")] = "2Gi"
    gpus: Annotated[int, Field(ge=0, le=16)] = 0
    gpu_pool: Annotated[str, Field(pattern=names.DNS1123_LABEL, max_length=names.MAX_LABEL)] | None = Field(
        default=None,
        description="A chart gpuPools entry: its nodeSelector and tolerations, as for training.",
    )


def _knob(name: str, kind: type):
    k = BATCHING[name]
    return Annotated[kind, Field(ge=k.lo, le=k.hi, description=k.help + ".")]


class Batching(Model):
    """Dynamic batching of each model server (`nmm serve`'s options of the same names)."""

    max_batch: _knob("max_batch", int) = BATCHING["max_batch"].default
    max_wait_ms: _knob("max_wait_ms", float) = BATCHING["max_wait_ms"].default
    max_queue: _knob("max_queue", int) = BATCHING["max_queue"].default


class Serving(Model):
    """How a model is served and rolled out (`spec.rollout.serving` of a pipeline)."""

    replicas: Annotated[int, Field(ge=1, le=100)] = 1
    resources: ServingResources = ServingResources()
    batching: Batching = Batching()
    canary: Canary = Canary()

    @model_validator(mode="after")
    def _gpus_need_pool_or_none(self) -> Serving:
        if self.resources.gpu_pool and not self.resources.gpus:
            raise ValueError("resources.gpuPool names a GPU pool but resources.gpus is 0")
        return self


class ServedModel(Model):
    name: Annotated[str, Field(pattern=MODEL_NAME)] = Field(description="The registered model.")
    alias: Annotated[str, Field(pattern=ALIAS)] | None = None
    version: Annotated[int, Field(ge=1, le=10**9)] | None = None

    @model_validator(mode="after")
    def _alias_or_version(self) -> ServedModel:
        if (self.alias is None) == (self.version is None):
            raise ValueError("give exactly one of alias and version")
        return self

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


class ServiceAnalysis(Analysis):
    """An NMMService's analysis: the quality probe runs when it is given, with its cases (a
    pipeline's rollout writes them and fills `casesUri` in)."""

    quality_probe: QualityProbe | None = None

    @model_validator(mode="after")
    def _probe_has_cases(self) -> ServiceAnalysis:
        if self.quality_probe is not None and not self.quality_probe.cases_uri:
            raise ValueError(
                "qualityProbe.casesUri: an NMMService's probe needs its cases (JSON lines of "
                "{image, question, expect}; a pipeline's rollout writes them)"
            )
        return self


class ServiceCanary(Canary):
    analysis: ServiceAnalysis = ServiceAnalysis()


class ServiceSpec(Serving):
    """An `NMMService`: the model to serve; a change of model is rolled out as a canary."""

    model: ServedModel
    canary: ServiceCanary = ServiceCanary()


class ServiceMetadata(Model):
    name: Annotated[str, Field(min_length=1, max_length=names.MAX_SERVICE_NAME, pattern=names.DNS1035)]
    namespace: Annotated[str, Field(max_length=names.MAX_LABEL, pattern=names.DNS1123_LABEL)] | None = None


class ServiceBody(Model):
    """The document: apiVersion, kind, metadata, spec (for the CRD's schema and the operator)."""

    spec: ServiceSpec
