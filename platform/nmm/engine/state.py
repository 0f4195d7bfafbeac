"""A local run's record on disk, so that a run that failed or was killed half-way can be resumed.

- `status.json`: the run's name, UID (the `{{workflow.uid}}` its outputs are filed under), phase,
  every step's phase and outputs, and the process groups of the step running now. Rewritten
  atomically (temporary file + rename) after every transition: a kill at any moment leaves the
  last whole record, never half of one.
- `lock`: held (flock) by the engine for as long as it runs the run. The kernel drops it when the
  engine dies, however it dies; a second engine on the same run is refused, not interleaved.
- Process groups: every step runs in its own session (`process.launch`), so a SIGKILL of the
  engine leaves the step's processes running. Before a resume they are stopped: a training
  process of the dead attempt must not write checkpoints next to the resumed one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import time
from pathlib import Path

STATUS = "status.json"
LOCK = "lock"
GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long


class RunBusy(Exception):
    """Another nmm process is running this run now."""


def read_status(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STATUS).read_text())
    except FileNotFoundError:
        return None


def write_status(folder: Path, record: dict) -> None:
    tmp = folder / f".{STATUS}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, folder / STATUS)


@contextlib.contextmanager
def locked(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise RunBusy(f"run {folder.name} is being run by another nmm process now") from None
            raise
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields from `state` on (the command name may hold spaces and ')')."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rindex(")") + 2 :].split()


def start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, it names one process."""
    fields = _stat(pid)
    return fields[19] if fields else None


def _members(pgid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and fields[0] != "Z" and int(fields[2]) == pgid:
                out.append(int(entry.name))
    return out


def ours(group: dict) -> bool:
    """Whether the recorded process group still has live members. A group outlives its leader
    (torchrun's workers); its id cannot be reused while any member lives, and a leader that is
    alive must be the very process recorded (same start time)."""
    pgid = group["pgid"]
    leader = start_time(pgid)
    if leader is not None and leader != group.get("start"):
        return False  # the id now belongs to another process: the recorded group is gone
    return bool(_members(pgid))


def stop_groups(groups: list[dict], grace_s: float = GRACE_S) -> list[int]:
    """Stop what is left of an earlier attempt's process groups: SIGTERM (a trainer checkpoints
    on it), then SIGKILL after `grace_s`. Returns the groups that were still alive."""
    alive = [g for g in groups if ours(g)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for g in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(g["pgid"], sig)
        end = time.monotonic() + grace_s
        while sig == signal.SIGTERM and time.monotonic() < end and any(_members(g["pgid"]) for g in alive):
            time.sleep(0.2)
    return [g["pgid"] for g in alive]
