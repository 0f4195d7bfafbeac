"""The operator's settings: the chart's ConfigMap (`settings.json`, read once from the file that
NMM_OPERATOR_SETTINGS names), validated into one pydantic model. Its keys are the chart's values
keys (`operator.recheckSeconds`, `serving.backend`, `gpuPools`, …: no renaming), plus `resolved`,
what the chart's helpers compute from several values (the image reference, the store, MLflow's
address, the Secrets' names). What the compiler needs besides each pipeline becomes its
`CompileSettings`; a key that is not a setting, a value of the wrong type or out of range fails
the operator's start with the key named."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from nmm.compile import CompileSettings
from nmm.compile.backends import BACKENDS
from nmm.compile.backends.gateway import parent_ref
from nmm.gpu.pools import pools_from_values
from nmm.spec.base import Model

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_COMPILE = CompileSettings()  # the compiler's defaults, where the ConfigMap is silent


class GpuPool(Model):
    product: str
    memory_gi_b: Annotated[int, Field(ge=1, le=1024)] = Field(alias="memoryGiB")
    gpus_per_node: Annotated[int, Field(ge=1, le=64)]


class Operator(Model):
    """The chart's `operator` values the operator reads."""

    log_level: Literal[LOG_LEVELS] = "INFO"
    on_child_deleted: Literal["recreate", "report"] = "report"
    recheck_seconds: Annotated[float, Field(ge=1, le=86_400)] = Field(
        default=60.0, description="The recheck timer's interval."
    )
    metrics_port: Annotated[int, Field(ge=0, le=65_535)] = Field(
        default=9090, description="The operator's Prometheus metrics (canary weight, quality probe); 0: off."
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v):
        return v.upper() if isinstance(v, str) else v


class Serving(Model):
    """The chart's `serving` values the operator reads: how NMMServices are served."""

    backend: Literal[tuple(BACKENDS)] = "kserve"
    gateway: dict[str, str] | None = Field(
        default=None, description="gateway backend: the Gateway the routes attach to"
    )
    tick_seconds: Annotated[float, Field(ge=0.2, le=3600)] = Field(
        default=10.0, description="How often an NMMService's rollout is looked at."
    )
    ready_timeout_seconds: Annotated[float, Field(gt=0, le=86_400)] = Field(
        default=600.0, description="A canary that does not answer for this long fails."
    )
    service_account_name: str = _COMPILE.serving_service_account
    # {"<namespace>/<service>": {"stable": URL, "candidate": URL}}: for an operator running outside
    # the cluster (kubectl port-forward); in the cluster the Services' DNS names are used.
    endpoints: dict[str, dict[str, str]] = {}

    @field_validator("gateway")
    @classmethod
    def _names_a_gateway(cls, v):
        return None if v is None else parent_ref(v)


class Workflow(Model):
    service_account_name: str = _COMPILE.service_account


class Image(Model):
    pull_policy: str = _COMPILE.image_pull_policy


class Kueue(Model):
    enabled: bool = False
    local_queue: str | None = None


class Resolved(Model):
    """What the chart's helpers compute from several values (no values key of its own)."""

    image: str = _COMPILE.image
    store_uri: str = _COMPILE.store_uri
    mlflow_tracking_uri: str | None = _COMPILE.mlflow_tracking_uri
    s3_endpoint: str | None = _COMPILE.s3_endpoint
    s3_secret_name: str | None = _COMPILE.s3_secret_name
    serving_s3_secret_name: str | None = _COMPILE.serving_s3_secret_name
    mlflow_secret_name: str | None = _COMPILE.mlflow_secret_name

    @field_validator("mlflow_secret_name", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return v or None  # the chart renders an unset one as ""


class OperatorSettings(Model):
    """The ConfigMap's `settings.json`: the chart's values under their own keys, and what its
    helpers resolve."""

    operator: Operator = Operator()
    serving: Serving = Serving()
    workflow: Workflow = Workflow()
    image: Image = Image()
    kueue: Kueue = Kueue()
    gpu_pools: dict[str, GpuPool] = {}
    resolved: Resolved = Resolved()

    @functools.cached_property
    def compile(self) -> CompileSettings:
        pools = pools_from_values({name: p.model_dump(by_alias=True) for name, p in self.gpu_pools.items()})
        r = self.resolved
        return CompileSettings(
            image=r.image,
            image_pull_policy=self.image.pull_policy,
            service_account=self.workflow.service_account_name,
            store_uri=r.store_uri,
            mlflow_tracking_uri=r.mlflow_tracking_uri,
            s3_endpoint=r.s3_endpoint,
            s3_secret_name=r.s3_secret_name,
            gpu_pools=pools or _COMPILE.gpu_pools,
            serving_service_account=self.serving.service_account_name,
            serving_s3_secret_name=r.serving_s3_secret_name,
            default_queue=(self.kueue.local_queue or None) if self.kueue.enabled else None,
            mlflow_secret_name=r.mlflow_secret_name,
        )


def from_dict(raw: dict) -> OperatorSettings:
    """The settings of a ConfigMap's `settings.json`; ValueError naming the key when it is not one."""
    from pydantic import ValidationError

    try:
        return OperatorSettings.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"operator settings: {problems}") from None


@functools.lru_cache(maxsize=1)
def load() -> OperatorSettings:
    """Read once per process: every handler module shares the same settings."""
    path = os.environ.get("NMM_OPERATOR_SETTINGS")
    return from_dict(json.loads(Path(path).read_text()) if path else {})
