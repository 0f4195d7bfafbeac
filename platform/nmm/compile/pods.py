"""What every pod the compiler emits shares: security contexts (PSS "restricted" + read-only
root), the /tmp emptyDir, the env that points stages at MLflow and the object store."""

from __future__ import annotations

from nmm.compile.settings import CompileSettings

TMP_VOLUME = "tmp"
TMP_MOUNT = "/tmp"
OUTPUTS_DIR = "/tmp/nmm/outputs"


def pod_security_context(s: CompileSettings) -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": s.run_as_user,
        "runAsGroup": s.run_as_user,
        "fsGroup": s.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def tmp_volume() -> dict:
    return {"name": TMP_VOLUME, "emptyDir": {}}


def tmp_mount() -> dict:
    return {"name": TMP_VOLUME, "mountPath": TMP_MOUNT}


def env(s: CompileSettings) -> list[dict]:
    """Container env: no secret values, only references (S4)."""
    out = [
        {"name": "HOME", "value": TMP_MOUNT},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if s.mlflow_tracking_uri:
        out.append({"name": "MLFLOW_TRACKING_URI", "value": s.mlflow_tracking_uri})
    if s.s3_endpoint:
        out.append({"name": "NMM_S3_ENDPOINT", "value": s.s3_endpoint})
    if s.s3_secret_name:
        for name, key in (("NMM_S3_ACCESS_KEY", "accessKey"), ("NMM_S3_SECRET_KEY", "secretKey")):
            out.append({"name": name, "valueFrom": {"secretKeyRef": {"name": s.s3_secret_name, "key": key}}})
    return out


def stage_args(stage: str, spec_json: str, s: CompileSettings) -> list[str]:
    """The arguments every `nmm stage <name>` gets."""
    return [
        "stage", stage,
        "--spec", spec_json,
        "--run-id", "{{workflow.name}}",
        "--store", s.store_uri,
        "--outputs", OUTPUTS_DIR,
    ]
