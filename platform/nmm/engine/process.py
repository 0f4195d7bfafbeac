"""Run local processes for a step, their output teed into a log file, with a deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Launched:
    name: str
    proc: subprocess.Popen
    log_path: Path
    log_file: object


def launch(name: str, argv: list[str], env: dict[str, str], log_path: Path, cwd: str | None = None) -> Launched:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    f = open(log_path, "ab", buffering=0)
    proc = subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    return Launched(name, proc, log_path, f)


def _kill(group: list[Launched], sig: int) -> None:
    for p in group:
        if p.proc.poll() is None:
            try:
                os.killpg(p.proc.pid, sig)
            except ProcessLookupError:
                pass


def wait_all(
    group: list[Launched], deadline_s: float | None, on_tick: Callable[[], None] | None = None
) -> dict[str, int]:
    """Wait for every process; stop all of them when one fails (a failed replica fails the job)
    or the deadline passes (exit code 124). Returns name → exit code."""
    start = time.monotonic()
    codes: dict[str, int] = {}
    try:
        while len(codes) < len(group):
            for p in group:
                if p.name not in codes and p.proc.poll() is not None:
                    codes[p.name] = p.proc.returncode
            if any(c != 0 for c in codes.values()):
                _kill(group, signal.SIGTERM)
                for p in group:
                    try:
                        codes.setdefault(p.name, p.proc.wait(timeout=20))
                    except subprocess.TimeoutExpired:
                        _kill([p], signal.SIGKILL)
                        codes.setdefault(p.name, p.proc.wait())
                break
            if deadline_s is not None and time.monotonic() - start > deadline_s:
                _kill(group, signal.SIGKILL)
                for p in group:
                    p.proc.wait()
                    codes.setdefault(p.name, 124)
                break
            if on_tick:
                on_tick()
            time.sleep(0.2)
    except BaseException:
        _kill(group, signal.SIGKILL)
        raise
    finally:
        for p in group:
            p.log_file.close()
    return codes


def tail(path: Path, lines: int = 30) -> str:
    try:
        data = path.read_bytes()[-32_000:].decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def last_line(path: Path) -> str:
    text = tail(path, 1)
    return text.strip()[:100]
