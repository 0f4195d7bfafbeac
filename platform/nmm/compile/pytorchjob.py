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
from nmm.gpu import memory, pools
from nmm.model.config import ModelConfig
from nmm.spec import PipelineSpec, names
from nmm.tokenizers.vocab import SharedVocab

CAPTION_TOKENS = 32  # room for a caption, an instruction and the special tokens in a sequence


def estimated_seq_len(spec: PipelineSpec) -> int:
    side, _ = spec.spec.data.image_shape
    patch = spec.spec.model.tokenizers.image.patch_size
    return (side // patch) ** 2 + CAPTION_TOKENS


def check_memory(spec: PipelineSpec, gpu_memory_gib: float) -> memory.MemoryEstimate:
    """Reject a model that cannot train on one GPU of `gpu_memory_gib` (data parallel: a full
    replica per GPU) even one row at a time; a batch bigger than what fits trains in
    micro-batches (the trainer accumulates gradients). Returns the estimate of the micro-batch
    the trainer will choose. The model's shape comes from nmm.model's own config, the
    vocabulary's from nmm.tokenizers: nothing is re-derived here."""
    m, t, r = spec.spec.model, spec.spec.training, spec.spec.training.resources
    vocab = SharedVocab(m.tokenizers.text.vocab_size, m.tokenizers.image.codebook_size).size
    cfg = ModelConfig(vocab_size=vocab, dim=m.size.dim, layers=m.size.layers, heads=m.size.heads, qk_norm=m.qk_norm)
    rows = -(-max(p.batch_size for p in t.phases) // (r.nodes * r.procs_per_node))
    shape = memory.model_shape(cfg, estimated_seq_len(spec))
    micro = memory.largest_micro_batch(rows, gpu_memory_gib, **shape)
    if micro is None:
        raise pools.PlacementError(
            f"spec.model.size: the model does not fit a {gpu_memory_gib:g} GiB GPU even one row at a time: "
            f"{memory.estimate(micro_batch=1, **shape).describe()}; shrink the model, or ask for GPUs with more memory"
        )
    return memory.estimate(micro_batch=micro, **shape)


KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY = "kueue.x-k8s.io/priority-class"


def queue_labels(spec: PipelineSpec, s: CompileSettings) -> dict[str, str]:
    """Kueue's labels: the LocalQueue (the spec's, else the platform default) makes Kueue hold the
    PyTorchJob suspended until the whole gang is admitted on the queue's quota (admission counts
    requests: GPU requests equal limits); the WorkloadPriorityClass orders the queue."""
    t = spec.spec.training
    queue = t.queue or s.default_queue
    if t.priority_class and not queue:
        raise pools.PlacementError(
            "spec.training.priorityClass: a priority orders a Kueue queue; set "
            "spec.training.queue (or the chart's kueue.localQueue)"
        )
    labels = {KUEUE_QUEUE: queue} if queue else {}
    if t.priority_class:
        labels[KUEUE_PRIORITY] = t.priority_class
    return labels


def _resources(spec: PipelineSpec) -> k8s.V1ResourceRequirements:
    r = spec.spec.training.resources
    requests = {"cpu": r.cpu, "memory": r.memory}
    limits = {"memory": r.memory}
    if r.gpus_per_node:
        limits["nvidia.com/gpu"] = str(r.gpus_per_node)
        requests["nvidia.com/gpu"] = str(r.gpus_per_node)
    return k8s.V1ResourceRequirements(requests=requests, limits=limits)


def _pod(spec: PipelineSpec, spec_json: str, s: CompileSettings, variant: str | None) -> k8s.V1PodTemplateSpec:
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
    if variant:
        args += ["--variant", variant]
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
    pod = k8s.V1PodSpec(
        containers=[container],
        service_account_name=s.service_account,  # the admission policy ties the pipeline label to it (no token)
        automount_service_account_token=False,
        security_context=pods.pod_security_context(s),
        volumes=[pods.tmp_volume(), {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    )
    if r.gpus_per_node:
        chosen = None
        if s.gpu_pools is not None:
            chosen = pools.choose(s.gpu_pools, r.gpus_per_node, r.gpu_memory_gib, r.gpu_product)
            pod.affinity = pools.affinity(chosen)
            pod.tolerations = pools.tolerations(chosen)
        smallest = r.gpu_memory_gib or (min(p.memory_gib for p in chosen) if chosen else None)
        if smallest:
            check_memory(spec, smallest)
    return k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels={"nmm.dev/pipeline": spec.metadata.name, "nmm.dev/stage": "train"}),
        spec=pod,
    )


def build(spec: PipelineSpec, spec_json: str, s: CompileSettings, variant: str | None = None) -> dict:
    """The PyTorchJob of the train step (of one variant, when the spec has variants)."""
    spec = spec.for_variant(variant)
    r = spec.spec.training.resources
    pod = _pod(spec, spec_json, s, variant)
    replicas = {"Master": kf.KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="OnFailure", template=pod)}
    if r.nodes > 1:
        replicas["Worker"] = kf.KubeflowOrgV1ReplicaSpec(replicas=r.nodes - 1, restart_policy="OnFailure", template=pod)
    job = kf.KubeflowOrgV1PyTorchJob(
        api_version="kubeflow.org/v1",
        kind="PyTorchJob",
        metadata=k8s.V1ObjectMeta(
            name=names.train_job_name(pods.RUN_ID, variant),
            labels={"nmm.dev/pipeline": spec.metadata.name, "nmm.dev/run": pods.RUN_ID} | queue_labels(spec, s),
        ),
        spec=kf.KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(r.procs_per_node),
            pytorch_replica_specs=replicas,
            run_policy=kf.KubeflowOrgV1RunPolicy(
                backoff_limit=spec.spec.training.max_restarts,
                active_deadline_seconds=s.train_deadline_seconds,
                clean_pod_policy="None",
                ttl_seconds_after_finished=s.ttl_after_success_seconds,
            ),
        ),
    )
    return k8s.ApiClient().sanitize_for_serialization(job)
