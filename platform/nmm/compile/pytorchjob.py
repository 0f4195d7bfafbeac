"""The training step's Kubeflow `PyTorchJob` (kubeflow.org/v1), built with kubeflow-training's models.

One pod per node (Master + Workers), each running torchrun with one process per GPU (or per
requested CPU process). Values `{{…}}` are Argo parameters, substituted when the step runs.
A failed worker fails its pod; the job's `backoffLimit` (spec `training.maxRestarts`) restarts
pods, each restart a fresh torchrun that resumes from the latest committed checkpoint.
"""

from __future__ import annotations

from kubeflow.training import models as kf
from kubernetes import client as k8s

from nmm.compile import pods
from nmm.compile.settings import CompileSettings
from nmm.spec import PipelineSpec


def _resources(spec: PipelineSpec) -> k8s.V1ResourceRequirements:
    r = spec.spec.training.resources
    requests = {"cpu": r.cpu, "memory": r.memory}
    limits = {"memory": r.memory}
    if r.gpusPerNode:
        limits["nvidia.com/gpu"] = str(r.gpusPerNode)
        requests["nvidia.com/gpu"] = str(r.gpusPerNode)
    return k8s.V1ResourceRequirements(requests=requests, limits=limits)


def _pod(spec: PipelineSpec, spec_json: str, s: CompileSettings) -> k8s.V1PodTemplateSpec:
    r = spec.spec.training.resources
    torchrun = [
        f"--nnodes={r.nodes}",
        f"--nproc-per-node={r.procs_per_node}",
        "--node-rank=$(RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "--no-python",
        "nmm",
    ]
    args = torchrun + pods.stage_args("train", spec_json, s) + ["--dataset-uri", "{{inputs.parameters.dataset_uri}}"]
    container = k8s.V1Container(
        name="pytorch",  # the Training Operator looks for this container name
        image=s.image,
        image_pull_policy=s.image_pull_policy,
        command=["torchrun"],
        args=args,
        env=pods.env(s),
        resources=_resources(spec),
        security_context=pods.container_security_context(),
        volume_mounts=[pods.tmp_mount(), {"name": "dshm", "mountPath": "/dev/shm"}],
    )
    return k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels={"nmm.dev/pipeline": spec.metadata.name, "nmm.dev/stage": "train"}),
        spec=k8s.V1PodSpec(
            containers=[container],
            automount_service_account_token=False,
            security_context=pods.pod_security_context(s),
            volumes=[pods.tmp_volume(), {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
        ),
    )


def build(spec: PipelineSpec, spec_json: str, s: CompileSettings) -> dict:
    r = spec.spec.training.resources
    pod = _pod(spec, spec_json, s)
    replicas = {"Master": kf.KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="OnFailure", template=pod)}
    if r.nodes > 1:
        replicas["Worker"] = kf.KubeflowOrgV1ReplicaSpec(replicas=r.nodes - 1, restart_policy="OnFailure", template=pod)
    job = kf.KubeflowOrgV1PyTorchJob(
        api_version="kubeflow.org/v1",
        kind="PyTorchJob",
        metadata=k8s.V1ObjectMeta(
            name="{{workflow.name}}-train",
            labels={"nmm.dev/pipeline": spec.metadata.name, "nmm.dev/run": "{{workflow.name}}"},
        ),
        spec=kf.KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(r.procs_per_node),
            pytorch_replica_specs=replicas,
            run_policy=kf.KubeflowOrgV1RunPolicy(
                backoff_limit=spec.spec.training.maxRestarts,
                active_deadline_seconds=s.train_deadline_seconds,
                clean_pod_policy="None",
                ttl_seconds_after_finished=s.ttl_after_success_seconds,
            ),
        ),
    )
    return k8s.ApiClient().sanitize_for_serialization(job)
