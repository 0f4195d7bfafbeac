"""The operator's compile settings, read once from the chart's ConfigMap (NMM_OPERATOR_SETTINGS)."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from nmm.compile import CompileSettings
from nmm.gpu.pools import pools_from_values


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class OperatorSettings:
    compile: CompileSettings
    on_child_deleted: str = "report"  # recreate | report
    recheck_seconds: float = 60.0  # the recheck timer's interval (chart: operator.recheckSeconds)
    log_level: str = "INFO"  # chart: operator.logLevel
    serving_backend: str = "kserve"  # chart: serving.backend (kserve | gateway)
    gateway_parent: dict = field(default_factory=lambda: {"name": "nmm-gateway"})  # chart: serving.gateway
    serving_tick_seconds: float = 10.0  # how often an NMMService's rollout is looked at
    serving_ready_timeout: float = 600.0  # a canary that does not answer for this long fails
    # {"<namespace>/<service>": {"stable": URL, "candidate": URL}}: for an operator running outside
    # the cluster (kubectl port-forward); in the cluster the Services' DNS names are used.
    endpoints: dict = field(default_factory=dict)
    metrics_port: int = 9090  # the operator's Prometheus metrics (canary weight, quality probe); 0: off


def from_dict(raw: dict) -> OperatorSettings:
    pools = pools_from_values(raw.get("gpuPools", {}))
    base = CompileSettings()
    compile_settings = CompileSettings(
        image=raw.get("image", base.image),
        image_pull_policy=raw.get("imagePullPolicy", base.image_pull_policy),
        service_account=raw.get("serviceAccount", base.service_account),
        store_uri=raw.get("storeUri", base.store_uri),
        mlflow_tracking_uri=raw.get("mlflowTrackingUri", base.mlflow_tracking_uri),
        s3_endpoint=raw.get("s3Endpoint", base.s3_endpoint),
        s3_secret_name=raw.get("s3SecretName", base.s3_secret_name),
        gpu_pools=pools or base.gpu_pools,
        serving_service_account=raw.get("servingServiceAccount", base.serving_service_account),
        serving_s3_secret_name=raw.get("servingS3SecretName", base.serving_s3_secret_name),
        default_queue=raw.get("defaultQueue") or None,
        mlflow_secret_name=raw.get("mlflowSecretName") or None,
    )
    policy = raw.get("onChildDeleted", "report")
    if policy not in ("recreate", "report"):
        raise ValueError(f"onChildDeleted must be 'recreate' or 'report', got {policy!r}")
    level = str(raw.get("logLevel", "INFO")).upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"logLevel must be one of {LOG_LEVELS}, got {level!r}")
    recheck = float(raw.get("recheckSeconds", 60))
    if not 1 <= recheck <= 86_400:
        raise ValueError(f"recheckSeconds must be within 1..86400, got {recheck:g}")
    serving = raw.get("serving") or {}
    backend = serving.get("backend", "kserve")
    if backend not in ("kserve", "gateway"):
        raise ValueError(f"serving.backend must be 'kserve' or 'gateway', got {backend!r}")
    tick = float(serving.get("tickSeconds", 10))
    if not 0.2 <= tick <= 3600:
        raise ValueError(f"serving.tickSeconds must be within 0.2..3600, got {tick:g}")
    gateway = serving.get("gateway") or {"name": "nmm-gateway"}
    if not isinstance(gateway, dict) or not gateway.get("name"):
        raise ValueError("serving.gateway must name the Gateway ({name, namespace?})")
    return OperatorSettings(compile_settings, policy, recheck, level, backend,
                            {k: gateway[k] for k in ("name", "namespace", "sectionName") if gateway.get(k)},
                            tick, float(serving.get("readyTimeoutSeconds", 600)), dict(serving.get("endpoints") or {}),
                            int(raw.get("metricsPort", 9090)))


@functools.lru_cache(maxsize=1)
def load() -> OperatorSettings:
    """Read once per process: every handler module shares the same settings."""
    path = os.environ.get("NMM_OPERATOR_SETTINGS")
    return from_dict(json.loads(Path(path).read_text()) if path else {})
