"""Everything the compiler needs besides the spec, passed explicitly (the compiler reads no env)."""

from __future__ import annotations

from dataclasses import dataclass

from nmm import __version__
from nmm.gpu.pools import EXAMPLE_POOLS, GpuPool

IMAGE_REPOSITORY = "ghcr.io/nmm-dev/nmm"


@dataclass(frozen=True, kw_only=True)
class CompileSettings:
    # The platform image every step runs (pin by tag or digest; never `latest`).
    image: str = f"{IMAGE_REPOSITORY}:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    namespace: str = "nmm"
    # Whose run this is (see nmm.identity): the NMMPipeline's UID when the operator compiles;
    # None = the Workflow itself (`{{workflow.uid}}`, which Argo and the local engine fill in).
    owner_uid: str | None = None
    # Workflow pods' service account: the Argo executor's minimum rights (+ create PyTorchJobs).
    service_account: str = "nmm-workflow"
    # Serving pods' service account: they need no API rights (no token is mounted).
    serving_service_account: str = "default"
    # The Secret (keys accessKey, secretKey) of a read-only S3 key that model servers read their
    # model folder with (chart: serving.s3.existingSecret): a server holds no key that can write and
    # no MLflow credential (the operator resolves a version to its folder and digest for it).
    serving_s3_secret_name: str | None = "nmm-s3-serving"
    # Where stages publish outputs: s3://bucket/prefix on a cluster, file:///… locally.
    store_uri: str = "s3://nmm"
    # MLflow tracking server the stages log to; None leaves MLFLOW_TRACKING_URI unset.
    mlflow_tracking_uri: str | None = "http://nmm-mlflow.nmm.svc:5000"
    # MinIO/S3 endpoint and the Secret holding its credentials (keys accessKey, secretKey).
    s3_endpoint: str | None = "http://minio.nmm.svc:9000"
    s3_secret_name: str | None = "nmm-s3-credentials"
    # The Secret (keys username, password) the stages authenticate to MLflow with (chart:
    # mlflow.auth.existingSecret); None: MLflow without authentication (a laptop).
    mlflow_secret_name: str | None = None
    # Limits: per step attempt, per workflow, and retries of a failed step.
    step_deadline_seconds: int = 6 * 3600
    train_deadline_seconds: int = 48 * 3600
    workflow_deadline_seconds: int = 72 * 3600
    retry_limit: int = 2
    ttl_after_success_seconds: int = 7 * 24 * 3600
    ttl_after_failure_seconds: int = 14 * 24 * 3600
    run_as_user: int = 1000
    # GPU node pools (chart values `gpuPools`); None = no placement (the local engine).
    gpu_pools: tuple[GpuPool, ...] | None = EXAMPLE_POOLS
    # Kueue LocalQueue for training jobs whose spec names none (chart: kueue.localQueue when kueue.enabled).
    default_queue: str | None = None

    @classmethod
    def local(cls, store_uri: str) -> CompileSettings:
        """Embedded defaults for `nmm run` on a laptop: a local store, MLflow from the env/default."""
        return cls(
            store_uri=store_uri,
            mlflow_tracking_uri=None,
            s3_endpoint=None,
            s3_secret_name=None,
            serving_s3_secret_name=None,
            namespace="default",
            gpu_pools=None,
        )
