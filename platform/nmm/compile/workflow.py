"""PipelineSpec + CompileSettings → Argo `Workflow` (argoproj.io/v1alpha1). Pure and deterministic.

DAG: curate (a container, or a KubeRay RayJob resource + a `curate-outputs` step with data.ray)
→ train (a PyTorchJob resource) → evaluate → rollout (only when the gate passed);
onExit: finalize (closes the MLflow parent run). Stages hand each other URIs as parameters.
With variants (an ablation), curate fans out to train-<v> → evaluate-<v> per variant; rollout
waits for all of them and considers the first variant.
"""

from __future__ import annotations

import hashlib
import json

import yaml

from nmm import __version__
from nmm.compile import pods, pytorchjob, rayjob
from nmm.compile.settings import CompileSettings
from nmm.identity import RunIdentity
from nmm.spec import PipelineSpec, names, step_name
from nmm.storage.layout import stage_uri

# The Argo Workflow resource the compiler emits (and the operator and the CLI read).
WF_GROUP, WF_VERSION, WF_PLURAL = "argoproj.io", "v1alpha1", "workflows"
DAG = "pipeline"
EXIT = names.EXIT_STAGE
CURATED = "curate-outputs"  # with data.ray: reads the RayJob's outputs back from the store (part of stage curate)


def spec_json(spec: PipelineSpec) -> str:
    """The canonical JSON of the spec that every stage receives, with user text made inert:
    `{{` (Argo's parameters) and `$` (Kubernetes' `$(VAR)` expansion in args) are written as JSON
    escapes, which decode to the same text but which neither Argo nor the kubelet expands."""
    text = json.dumps(spec.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":"))
    return text.replace("$", "\\u0024").replace("{{", "{\\u007b")


def _param(name: str) -> dict:
    return {"name": name}


def _out(name: str) -> dict:
    return {"name": name, "valueFrom": {"path": f"{pods.OUTPUTS_DIR}/{name}"}}


def _arg(name: str, value: str) -> dict:
    return {"name": name, "value": value}


def _retry(s: CompileSettings) -> dict:
    return {
        "limit": str(s.retry_limit),
        "retryPolicy": "OnFailure",
        "backoff": {"duration": "30s", "factor": "2", "maxDuration": "30m"},
    }


def _container_template(
    name: str, extra_args: list[str], inputs: list[str], outputs: list[str], sj: str, s: CompileSettings
) -> dict:
    t = {
        "name": name,
        "retryStrategy": _retry(s),
        "activeDeadlineSeconds": str(s.step_deadline_seconds),
        "container": {
            "name": "main",
            "image": s.image,
            "imagePullPolicy": s.image_pull_policy,
            "command": ["nmm"],
            "args": pods.stage_args(name, sj, s) + extra_args,
            "env": pods.env(s),
            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "8Gi"}},
            "securityContext": pods.container_security_context(),
            "volumeMounts": [pods.tmp_mount()],
        },
    }
    if inputs:
        t["inputs"] = {"parameters": [_param(p) for p in inputs]}
    if outputs:
        t["outputs"] = {"parameters": [_out(p) for p in outputs]}
    return t


def _train_template(spec: PipelineSpec, sj: str, s: CompileSettings, variant: str | None) -> dict:
    job = pytorchjob.build(spec, sj, s, variant)
    return {
        "name": step_name("train", variant),
        "inputs": {"parameters": [_param("dataset_uri")]},
        # No retryStrategy: Argo's retry of a `create` meets the failed job's name (AlreadyExists,
        # argo-workflows#6150). The PyTorchJob restarts its own failed pods (`training.maxRestarts`).
        "activeDeadlineSeconds": str(s.train_deadline_seconds),
        "resource": {
            "action": "create",
            "setOwnerReference": True,
            "successCondition": "status.replicaStatuses.Master.succeeded > 0",
            "failureCondition": "status.replicaStatuses.Master.failed > 0",
            "manifest": yaml.safe_dump(job, sort_keys=False, width=1 << 20),
        },
    }


def _curate_templates(spec: PipelineSpec, sj: str, s: CompileSettings) -> list[dict]:
    """The curate step: a container, or (with data.ray) a KubeRay RayJob whose outputs the
    `curate-outputs` step reads back from the store."""
    outputs = ["dataset_uri", "dataset_digest", "cache"]
    if spec.spec.data.ray is None:
        return [_container_template("curate", [], [], outputs, sj, s)]
    out_uri = rayjob_outputs_uri(spec, s)
    job = rayjob.build(spec, sj, s, out_uri)
    reader = _container_template(CURATED, [], [], outputs, sj, s)
    reader["container"]["args"] = ["stage", CURATED, "--from", out_uri, "--outputs", pods.OUTPUTS_DIR]
    reader["container"]["resources"] = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    return [
        {
            "name": "curate",  # no retryStrategy: the RayJob retries itself (backoffLimit), as train does
            "activeDeadlineSeconds": str(s.step_deadline_seconds),
            "resource": {
                "action": "create",
                "setOwnerReference": True,
                "successCondition": "status.jobStatus == SUCCEEDED",
                "failureCondition": "status.jobStatus in (FAILED, STOPPED)",
                "manifest": yaml.safe_dump(job, sort_keys=False, width=1 << 20),
            },
        },
        reader,
    ]


def rayjob_outputs_uri(spec: PipelineSpec, s: CompileSettings) -> str:
    run = RunIdentity(pods.NAMESPACE, spec.metadata.name, pods.owner_uid(s), pods.RUN_ID)
    return stage_uri(s.store_uri, run, "curate") + "/outputs.json"


def _dag(spec: PipelineSpec, s: CompileSettings) -> dict:
    variants = spec.variant_names or [None]
    source = CURATED if spec.spec.data.ray is not None else "curate"
    curate_out = f"{{{{tasks.{source}.outputs.parameters.dataset_uri}}}}"
    run = RunIdentity(pods.NAMESPACE, spec.metadata.name, pods.owner_uid(s), pods.RUN_ID)
    model_uris = {v: stage_uri(s.store_uri, run, step_name("train", v)) for v in variants}
    tasks: list[dict] = [{"name": "curate", "template": "curate"}]
    if source == CURATED:
        tasks.append({"name": CURATED, "template": CURATED, "dependencies": ["curate"]})
    for v in variants:
        tasks.append(
            {
                "name": step_name("train", v),
                "template": step_name("train", v),
                "dependencies": [source],
                "arguments": {"parameters": [_arg("dataset_uri", curate_out)]},
            }
        )
        params = [_arg("dataset_uri", curate_out), _arg("model_uri", model_uris[v])]
        if v:
            params.append(_arg("variant", v))
        tasks.append(
            {
                "name": step_name("evaluate", v),
                "template": "evaluate",
                "dependencies": [step_name("train", v)],
                "arguments": {"parameters": params},
            }
        )
    first = step_name("evaluate", variants[0])
    gate = f"{{{{tasks.{first}.outputs.parameters.gate}}}}"
    tasks.append(
        {
            "name": "rollout",
            "template": "rollout",
            "dependencies": [step_name("evaluate", v) for v in variants],
            "when": f"{gate} == pass",
            "arguments": {
                "parameters": [
                    _arg("model_uri", model_uris[variants[0]]),
                    _arg("metrics", f"{{{{tasks.{first}.outputs.parameters.metrics}}}}"),
                    _arg("gate", gate),
                ]
            },
        }
    )
    return {"name": DAG, "dag": {"tasks": tasks}}


def build(spec: PipelineSpec, s: CompileSettings) -> dict:
    """The Workflow as plain data (camelCase keys), before the typed round-trip."""
    sj = spec_json(spec)
    name = spec.metadata.name
    # The user's labels first, nmm's last: a reserved label always says what nmm means by it.
    labels = dict(sorted(spec.metadata.labels.items())) | {
        "app.kubernetes.io/managed-by": "nmm",
        "nmm.dev/pipeline": name,
    }
    variant_in = ["variant"] if spec.variant_names else []
    variant_args = ["--variant", "{{inputs.parameters.variant}}"] if spec.variant_names else []
    templates = [
        _dag(spec, s),
        *_curate_templates(spec, sj, s),
        *[_train_template(spec, sj, s, v) for v in (spec.variant_names or [None])],
        _container_template(
            "evaluate",
            [
                "--dataset-uri",
                "{{inputs.parameters.dataset_uri}}",
                "--model-uri",
                "{{inputs.parameters.model_uri}}",
                *variant_args,
            ],
            ["dataset_uri", "model_uri", *variant_in],
            ["gate", "metrics"],
            sj,
            s,
        ),
        _container_template(
            "rollout",
            [
                "--model-uri",
                "{{inputs.parameters.model_uri}}",
                "--metrics",
                "{{inputs.parameters.metrics}}",
                "--gate",
                "{{inputs.parameters.gate}}",
            ],
            ["model_uri", "metrics", "gate"],
            ["decision", "version"],
            sj,
            s,
        ),
        _container_template(EXIT, ["--status", "{{workflow.status}}"], [], ["mlflow_run_id"], sj, s),
    ]
    return {
        "apiVersion": f"{WF_GROUP}/{WF_VERSION}",
        "kind": "Workflow",
        "metadata": {
            "generateName": f"{name}-",
            "namespace": s.namespace,  # resolved by the caller (PipelineSpec.resolve_namespace)
            "labels": labels,
            "annotations": {
                "nmm.dev/spec-sha256": hashlib.sha256(sj.encode()).hexdigest(),
                "nmm.dev/compiler-version": __version__,
            },
        },
        "spec": {
            "entrypoint": DAG,
            "onExit": EXIT,
            "serviceAccountName": s.service_account,
            "activeDeadlineSeconds": s.workflow_deadline_seconds,
            "podGC": {"strategy": "OnPodSuccess"},
            "ttlStrategy": {
                "secondsAfterSuccess": s.ttl_after_success_seconds,
                "secondsAfterFailure": s.ttl_after_failure_seconds,
            },
            "securityContext": pods.pod_security_context(s),
            "volumes": [pods.tmp_volume()],
            "podMetadata": {"labels": {"nmm.dev/pipeline": name}},
            "templates": templates,
        },
    }
