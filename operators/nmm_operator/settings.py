"""The operator's compile settings, read once from the chart's ConfigMap (NMM_OPERATOR_SETTINGS)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
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
    return OperatorSettings(compile_settings, policy, recheck, level)


def load() -> OperatorSettings:
    path = os.environ.get("NMM_OPERATOR_SETTINGS")
    return from_dict(json.loads(Path(path).read_text()) if path else {})
