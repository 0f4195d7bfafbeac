"""The operator's settings: the chart's ConfigMap (`settings.json`, read once from the file that
NMM_OPERATOR_SETTINGS names), validated into one pydantic model whose keys are the ConfigMap's.
What the compiler needs besides each pipeline (image, store, MLflow, GPU pools) becomes its
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
    product: str | None = None
    memory_gi_b: Annotated[int, Field(ge=1, le=1024)] | None = Field(default=None, alias="memoryGiB")
    gpus_per_node: Annotated[int, Field(ge=1, le=64)] | None = None


class Serving(Model):
    """How NMMServices are served (the chart's `serving` values)."""

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
    # {"<namespace>/<service>": {"stable": URL, "candidate": URL}}: for an operator running outside
    # the cluster (kubectl port-forward); in the cluster the Services' DNS names are used.
    endpoints: dict[str, dict[str, str]] = {}

    @field_validator("gateway")
    @classmethod
    def _names_a_gateway(cls, v):
        return None if v is None else parent_ref(v)


class OperatorSettings(Model):
    image: str = _COMPILE.image
    image_pull_policy: str = _COMPILE.image_pull_policy
    service_account: str = _COMPILE.service_account
    store_uri: str = _COMPILE.store_uri
    mlflow_tracking_uri: str | None = _COMPILE.mlflow_tracking_uri
    s3_endpoint: str | None = _COMPILE.s3_endpoint
    s3_secret_name: str | None = _COMPILE.s3_secret_name
    gpu_pools: dict[str, GpuPool] = {}
    serving_service_account: str = _COMPILE.serving_service_account
    serving_s3_secret_name: str | None = _COMPILE.serving_s3_secret_name
    default_queue: str | None = _COMPILE.default_queue
    mlflow_secret_name: str | None = _COMPILE.mlflow_secret_name
    on_child_deleted: Literal["recreate", "report"] = "report"
    recheck_seconds: Annotated[float, Field(ge=1, le=86_400)] = Field(
        default=60.0, description="The recheck timer's interval (chart: operator.recheckSeconds)."
    )
    log_level: Literal[LOG_LEVELS] = "INFO"
    serving: Serving = Serving()
    metrics_port: Annotated[int, Field(ge=0, le=65_535)] = Field(
        default=9090, description="The operator's Prometheus metrics (canary weight, quality probe); 0: off."
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v):
        return v.upper() if isinstance(v, str) else v

    @field_validator("default_queue", "mlflow_secret_name", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return v or None  # the chart renders an unset one as ""

    @functools.cached_property
    def compile(self) -> CompileSettings:
        pools = pools_from_values(
            {name: p.model_dump(by_alias=True, exclude_none=True) for name, p in self.gpu_pools.items()}
        )
        return CompileSettings(
            image=self.image,
            image_pull_policy=self.image_pull_policy,
            service_account=self.service_account,
            store_uri=self.store_uri,
            mlflow_tracking_uri=self.mlflow_tracking_uri,
            s3_endpoint=self.s3_endpoint,
            s3_secret_name=self.s3_secret_name,
            gpu_pools=pools or _COMPILE.gpu_pools,
            serving_service_account=self.serving_service_account,
            serving_s3_secret_name=self.serving_s3_secret_name,
            default_queue=self.default_queue,
            mlflow_secret_name=self.mlflow_secret_name,
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
