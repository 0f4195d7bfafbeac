"""What every pod the compiler emits shares: security contexts (PSS "restricted" + read-only
root), the /tmp emptyDir, the env that points stages at MLflow and the object store.

The security contexts are written here once: the chart's helpers for its own pods
(`charts/nmm-platform/templates/_security.tpl`) are generated from them (`chart_helpers`), and a
test keeps the two in sync, as for the CRD."""

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


def chart_helpers(s: CompileSettings) -> str:
    """The chart's security-context helpers, generated from the contexts above."""
    import yaml

    def block(name: str, what: str, value: dict) -> str:
        body = yaml.safe_dump(value, sort_keys=False, default_flow_style=False).rstrip("\n")
        return f'{{{{/* {what} */}}}}\n{{{{- define "nmm-platform.{name}" -}}}}\n{body}\n{{{{- end -}}}}\n'

    head = "{{/* Generated from nmm.compile.pods (chart_helpers): edit there, then `make golden`. */}}\n"
    return (
        head
        + "\n"
        + block(
            "podSecurityContext", 'Pod security context: Pod Security Standards "restricted".', pod_security_context(s)
        )
        + "\n"
        + block(
            "containerSecurityContext",
            "Container security context: restricted + read-only root filesystem.",
            container_security_context(),
        )
    )


def tmp_volume() -> dict:
    return {"name": TMP_VOLUME, "emptyDir": {}}


def tmp_mount() -> dict:
    return {"name": TMP_VOLUME, "mountPath": TMP_MOUNT}


def _base_env() -> list[dict]:
    return [{"name": "HOME", "value": TMP_MOUNT}, {"name": "PYTHONUNBUFFERED", "value": "1"}]


def _s3_keys(secret: str) -> list[dict]:
    return [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        for name, key in (("NMM_S3_ACCESS_KEY", "accessKey"), ("NMM_S3_SECRET_KEY", "secretKey"))
    ]


def serving_env(s: CompileSettings) -> list[dict]:
    """A model server's env (S12): the store's endpoint and a read-only key, nothing of MLflow."""
    out = _base_env()
    if s.s3_endpoint:
        out.append({"name": "NMM_S3_ENDPOINT", "value": s.s3_endpoint})
    if s.serving_s3_secret_name:
        out += _s3_keys(s.serving_s3_secret_name)
    return out


def env(s: CompileSettings) -> list[dict]:
    """A pipeline step's env: no secret values, only references (S4)."""
    out = _base_env()
    if s.mlflow_tracking_uri:
        out.append({"name": "MLFLOW_TRACKING_URI", "value": s.mlflow_tracking_uri})
    if s.mlflow_secret_name:  # MLflow's basic auth: the client reads these two
        for name, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
            out.append({"name": name, "valueFrom": {"secretKeyRef": {"name": s.mlflow_secret_name, "key": key}}})
    if s.s3_endpoint:
        out.append({"name": "NMM_S3_ENDPOINT", "value": s.s3_endpoint})
    if s.s3_secret_name:
        out += _s3_keys(s.s3_secret_name)
    return out


NAMESPACE = "{{workflow.namespace}}"
RUN_ID = "{{workflow.name}}"


def owner_uid(s: CompileSettings) -> str:
    return s.owner_uid or "{{workflow.uid}}"


def stage_args(stage: str, spec_json: str, s: CompileSettings) -> list[str]:
    """The arguments every `nmm stage <name>` gets: the spec and the run's whole identity."""
    return [
        "stage",
        stage,
        "--spec",
        spec_json,
        "--namespace",
        NAMESPACE,
        "--owner-uid",
        owner_uid(s),
        "--run-id",
        RUN_ID,
        "--store",
        s.store_uri,
        "--outputs",
        OUTPUTS_DIR,
    ]
