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


def run_folder(runs: Path, name: str) -> Path | None:
    """The folder of the local run `name` under `runs`; None for a name that is no run's (one that
    would leave `runs`: a path, `.` or `..`)."""
    return None if "/" in name or name in ("", ".", "..") else runs / name


class CorruptRecord(ValueError):
    """A run's status.json that is not a record nmm wrote (truncated, edited, or not JSON)."""


MAX_RECORD_BYTES = 16 << 20  # a status.json or workflow.yaml is kilobytes; more is not ours


def read_text(path: Path) -> str:
    """A run file's text, opened without following a symlink and read at most MAX_RECORD_BYTES."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_RECORD_BYTES + 1)
    if len(data) > MAX_RECORD_BYTES:
        raise CorruptRecord(f"{path} is over {MAX_RECORD_BYTES} bytes")
    return data.decode("utf-8")


def read_status(folder: Path) -> dict | None:
    """The run's record; None when it has none; CorruptRecord when it is not one."""
    try:
        record = json.loads(read_text(folder / STATUS))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:  # a symlink (ELOOP), not UTF-8, not JSON
        raise CorruptRecord(f"{folder / STATUS} is not a run record ({type(exc).__name__})") from None
    if not isinstance(record, dict):
        raise CorruptRecord(f"{folder / STATUS} is not a run record (a JSON {type(record).__name__})")
    return record


def write_status(folder: Path, record: dict) -> None:
    """Atomically: a new file (never through a symlink planted at its name), then renamed over."""
    tmp = folder / f".{STATUS}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record, indent=2))
    os.replace(tmp, folder / STATUS)


@contextlib.contextmanager
def locked(folder: Path):
    """Hold the run's lock file (flock); opened without following a symlink, so a lock planted as
    a link to another file never truncates that file."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunBusy(f"run {folder.name}: {folder / LOCK} is a symlink, not nmm's lock file; remove it") from None
        raise
    with os.fdopen(fd, "r+") as f:
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
