"""The curate step as a KubeRay `RayJob` (ray.io/v1), when the spec sets `data.ray`.

KubeRay starts a Ray cluster of the requested size (a head and `workers` worker pods, all running
the platform image), runs `nmm stage curate` as the job's driver on it (Ray sets RAY_ADDRESS, so
the same code that runs a local Ray uses the cluster) and deletes the cluster when the job ends.
A resource step cannot hand back output parameters, so the stage also writes them to the store
(`--outputs-uri`) and the `curate-outputs` step reads them back for the rest of the DAG.
"""

from __future__ import annotations

import shlex
from importlib.metadata import version

from nmm.compile import pods
from nmm.compile.settings import CompileSettings
from nmm.spec import PipelineSpec, names

SHM = "/dev/shm"  # Ray's object store: a memory-backed emptyDir (the default is the container's 64 MiB)


def _container(name: str, s: CompileSettings, cpu: str, memory: str) -> dict:
    return {
        "name": name,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "env": pods.env(s),
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}},
        "securityContext": pods.container_security_context(),
        "volumeMounts": [pods.tmp_mount(), {"name": "shm", "mountPath": SHM}],
    }


def _pod(spec: PipelineSpec, s: CompileSettings, name: str, cpu: str, memory: str) -> dict:
    return {
        "metadata": {"labels": {"nmm.dev/pipeline": spec.metadata.name, "nmm.dev/stage": "curate"}},
        "spec": {
            "securityContext": pods.pod_security_context(s),
            "serviceAccountName": s.service_account,  # the admission policy ties the pipeline label to it (no token)
            "automountServiceAccountToken": False,
            "containers": [_container(name, s, cpu, memory)],
            "volumes": [pods.tmp_volume(), {"name": "shm", "emptyDir": {"medium": "Memory"}}],
        },
    }


def entrypoint(spec_json: str, s: CompileSettings, out_uri: str) -> str:
    """The driver's command line: the curate stage, its outputs also written to the store."""
    return shlex.join(["nmm", *pods.stage_args("curate", spec_json, s), "--outputs-uri", out_uri])


def build(spec: PipelineSpec, spec_json: str, s: CompileSettings, out_uri: str) -> dict:
    r = spec.spec.data.ray
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": names.curate_job_name(pods.RUN_ID, spec.metadata.name),
            "labels": {"nmm.dev/pipeline": spec.metadata.name, "nmm.dev/run": pods.RUN_ID},
        },
        "spec": {
            "entrypoint": entrypoint(spec_json, s, out_uri),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": s.ttl_after_success_seconds,
            "activeDeadlineSeconds": s.step_deadline_seconds,
            "backoffLimit": s.retry_limit,  # a fresh RayCluster per retry; Argo does not retry a create
            "rayClusterSpec": {
                "rayVersion": version("ray"),
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0"},  # the head schedules; the workers curate
                    "template": _pod(spec, s, "ray-head", "1", "4Gi"),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "curate",
                        "replicas": r.workers,
                        "minReplicas": r.workers,
                        "maxReplicas": r.workers,
                        "rayStartParams": {},
                        "template": _pod(spec, s, "ray-worker", r.cpu, r.memory),
                    }
                ],
            },
        },
    }
