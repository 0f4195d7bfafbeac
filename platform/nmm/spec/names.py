"""Every Kubernetes name nmm derives from a pipeline's name, and the budget that keeps each of them
valid. Pure string work, no I/O: the spec validates against it, the compiler and the operator build
names with it, the CLI finds pods with it.

The longest name derived from a pipeline is a Training Operator pod's Service:

    <pipeline>-g<generation>-train-<variant>-worker-<index>
    └─ run (Workflow) name ─┘
    └──────── PyTorchJob name ──────────┘

which must be a DNS-1035 label: at most 63 characters, a lowercase letter first.
"""

from __future__ import annotations

MAX_LABEL = 63  # a DNS-1035 / DNS-1123 label, a label value
DNS1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # Services (the Training Operator's per-pod ones) need it
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # namespaces

MAX_GENERATION = 999_999  # the operator's run names: "<name>-g<generation>"
RUN_SUFFIX = len("-g") + len(str(MAX_GENERATION))  # also covers nmm run's "<name>-<5 random>"
STAGES = ("curate", "train", "evaluate", "rollout")  # the DAG's stages, in order
EXIT_STAGE = "finalize"  # the Workflow's onExit handler
TRAIN = "train"
# The Training Operator names each replica's pod and Service "<job>-<type>-<index>"; nodes ≤ 1024.
REPLICA_SUFFIX = len("-worker-") + len("1023")
MAX_PIPELINE_NAME = MAX_LABEL - REPLICA_SUFFIX - RUN_SUFFIX - len("-" + TRAIN)  # 37
MAX_VARIANT_NAME = 15


def step_name(stage: str, variant: str | None) -> str:
    """A stage's Workflow step (and store folder, MLflow run): `train`, or `train-<variant>`."""
    return f"{stage}-{variant}" if variant else stage


def split_step(step: str) -> tuple[str, str | None]:
    """`train-mid` → ("train", "mid"); `train` → ("train", None). Inverse of step_name."""
    stage, _, variant = step.partition("-")
    return stage, variant or None


def run_name(pipeline: str, generation: int) -> str:
    """The operator's Workflow (= run) of one spec generation: deterministic, so a replayed
    handler finds the same child (409)."""
    if not 1 <= generation <= MAX_GENERATION:
        raise ValueError(f"metadata.generation: expected 1..{MAX_GENERATION}, got {generation}")
    return f"{pipeline}-g{generation}"


def train_job_name(run: str, variant: str | None) -> str:
    """The PyTorchJob of a run's (variant's) train step. `run` may be `{{workflow.name}}`."""
    return f"{run}-{step_name(TRAIN, variant)}"


def longest_derived_name(pipeline: str, variants: list[str]) -> str:
    """The longest Kubernetes name this pipeline will ever make (what the budget checks)."""
    run = f"{pipeline}-g{MAX_GENERATION}"
    longest = max([None, *variants], key=lambda v: len(v or ""))
    return f"{train_job_name(run, longest)}-worker-1023"


MAX_RAYJOB_NAME = 47  # KubeRay rejects longer RayJob names (its RayCluster, pods and Services derive from it)


def curate_job_name(run: str, pipeline: str) -> str:
    """The RayJob of a run's curate step (`data.ray`). `run` may be `{{workflow.name}}`: the suffix
    is chosen from the longest run name the pipeline can have, so the name always fits."""
    suffix = "-curate" if len(pipeline) + RUN_SUFFIX + len("-curate") <= MAX_RAYJOB_NAME else "-c"
    return f"{run}{suffix}"


# An NMMService's children: KServe's InferenceService "<service>" (its predictor Deployments add
# "-predictor-00001-deployment-<hash>"), or the gateway backend's "<service>-stable" and
# "<service>-canary" Deployments and Services plus an HTTPRoute "<service>".
MAX_SERVICE_NAME = 40


def serving_backend_name(service: str, track: str) -> str:
    """The gateway backend's Deployment and Service of a track (stable | canary)."""
    return f"{service}-{track}"
