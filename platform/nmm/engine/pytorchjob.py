"""Local adapter for a `PyTorchJob` resource: one process per replica (Master, Workers) with the
env the Training Operator gives each pod (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, PET_*)."""

from __future__ import annotations

from pathlib import Path

import yaml

from nmm.engine.params import expand_env_refs
from nmm.engine.process import Launched, launch
from nmm.engine.sandbox import Sandbox, container_env, resolve_command
from nmm.ports import free_port


def backoff_limit(job: dict) -> int:
    """How often the job's failed processes are started again (`runPolicy.backoffLimit`)."""
    return int((job.get("spec", {}).get("runPolicy") or {}).get("backoffLimit") or 0)


def launch_job(manifest_text: str, step_dir: Path, log_dir: Path, log_prefix: str) -> tuple[list[Launched], dict]:
    job = yaml.safe_load(manifest_text)
    if job.get("kind") != "PyTorchJob":
        raise ValueError(f"the local engine can create PyTorchJob resources only, not {job.get('kind')!r}")
    spec = job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    order = [("Master", replicas["Master"])] + ([("Worker", replicas["Worker"])] if "Worker" in replicas else [])
    nodes = sum(int(r.get("replicas", 1)) for _, r in order)
    nproc = int(spec.get("nprocPerNode") or 1)
    port = free_port()
    group: list[Launched] = []
    rank = 0
    for kind, rs in order:
        for i in range(int(rs.get("replicas", 1))):
            pod = rs["template"]["spec"]
            container = next(c for c in pod["containers"] if c["name"] == "pytorch")
            sandbox = Sandbox.for_container(container, pod.get("volumes", []), step_dir / f"{kind.lower()}-{i}")
            operator_env = {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "WORLD_SIZE": str(nodes * nproc),
                "RANK": str(rank),
                "PET_NNODES": str(nodes),
                "PET_NPROC_PER_NODE": str(nproc),
                "PET_NODE_RANK": str(rank),
                "PET_MASTER_ADDR": "127.0.0.1",
                "PET_MASTER_PORT": str(port),
                "PYTHONUNBUFFERED": "1",
            }
            env = container_env(container, sandbox, operator_env)
            # The kubelet expands $(VAR) from the container's declared env only, never the host's.
            declared = {e["name"]: env[e["name"]] for e in container.get("env", []) if e["name"] in env} | operator_env
            argv = [expand_env_refs(a, declared) for a in container.get("command", []) + container.get("args", [])]
            argv = resolve_command(sandbox.map_argv(argv))
            group.append(launch(f"{kind.lower()}-{i}", argv, env, log_dir / f"{log_prefix}-{kind.lower()}-{i}.log"))
            rank += 1
    return group, job
