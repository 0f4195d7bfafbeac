"""Map a pod's emptyDir mounts onto per-step local folders and build the process env."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Sandbox:
    """Mount paths (e.g. /tmp) → local folders for one step attempt."""

    mounts: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def for_container(cls, container: dict, volumes: list[dict], root: Path) -> Sandbox:
        empty = {v["name"] for v in volumes if "emptyDir" in v}
        mounts = {}
        for m in container.get("volumeMounts", []):
            if m["name"] in empty:
                local = root / m["name"]
                local.mkdir(parents=True, exist_ok=True)
                mounts[m["mountPath"].rstrip("/")] = local
        return cls(mounts)

    def map_path(self, path: str) -> str:
        for mount, local in sorted(self.mounts.items(), key=lambda kv: -len(kv[0])):
            if path == mount or path.startswith(mount + "/"):
                return str(local) + path[len(mount) :]
        return path

    def map_argv(self, argv: list[str]) -> list[str]:
        """Map container paths in the arguments; the command itself is resolved on the host."""
        return argv[:1] + [self.map_path(a) if a.startswith("/") else a for a in argv[1:]]


def container_env(container: dict, sandbox: Sandbox, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Host env + the container's env (paths mapped); secretKeyRef values come from a host
    variable of the same name when one is set (the local stand-in for a Kubernetes Secret)."""
    env = dict(os.environ)
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = sandbox.map_path(e["value"]) if e["value"].startswith("/") else e["value"]
        elif "valueFrom" in e and e["name"] in os.environ:
            env[e["name"]] = os.environ[e["name"]]
    env.update(extra or {})
    # Commands the step runs by name (nmm, torchrun --no-python nmm) resolve to this venv first.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def resolve_command(argv: list[str]) -> list[str]:
    """Find the executable next to this interpreter first (the venv's `nmm`, `torchrun`)."""
    exe = argv[0]
    local = shutil.which(exe, path=str(Path(sys.executable).parent)) or shutil.which(exe)
    if local is None:
        raise FileNotFoundError(f"command {exe!r} not found in this environment")
    return [local, *argv[1:]]
