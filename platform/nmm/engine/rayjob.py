"""Local adapter for a KubeRay `RayJob` resource: its entrypoint runs as one local process with the
head container's env: a private local Ray (or, with RAY_ADDRESS set, that Ray cluster), as the
PyTorchJob adapter runs torchrun's processes here instead of pods."""

from __future__ import annotations

import shlex
from pathlib import Path

from nmm.engine.process import Launched, launch
from nmm.engine.sandbox import Sandbox, container_env, resolve_command


def backoff_limit(job: dict) -> int:
    """How often KubeRay submits the job again after a failure (`spec.backoffLimit`)."""
    return int(job["spec"].get("backoffLimit") or 0)


def launch_job(job: dict, step_dir: Path, log_dir: Path, log_prefix: str, cwd: str | None = None) -> list[Launched]:
    spec = job["spec"]
    pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    head = pod["containers"][0]
    sandbox = Sandbox.for_container(head, pod.get("volumes", []), step_dir / "head")
    env = container_env(head, sandbox, {"PYTHONUNBUFFERED": "1"})
    argv = resolve_command(sandbox.map_argv(shlex.split(spec["entrypoint"])))
    return [launch("ray-driver", argv, env, log_dir / f"{log_prefix}.log", cwd=cwd)]
