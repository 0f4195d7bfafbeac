"""Stages archive their own log in the object store, so `nmm logs` works after pods are gone:
`<store>/runs/<pipeline>/<run>/<stage>/logs/<host>-<pid>.log`."""

from __future__ import annotations

import io
import os
import socket
import sys

from nmm import storage


class Tee(io.TextIOBase):
    """Write to the real stream and keep a copy."""

    def __init__(self, stream, copy: io.StringIO):
        self.stream, self.copy = stream, copy

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


class Archive:
    """Capture this process's stdout/stderr; upload them on exit (best effort, never fatal)."""

    def __init__(self, stage_uri: str):
        self.uri = storage.join(stage_uri, "logs", f"{socket.gethostname()}-{os.getpid()}.log")
        self.copy = io.StringIO()

    def __enter__(self) -> Archive:
        self.saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(sys.stdout, self.copy), Tee(sys.stderr, self.copy)
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout, sys.stderr = self.saved
        try:
            storage.write_bytes(self.uri, self.copy.getvalue().encode())
        except Exception as err:  # archiving must never fail the stage
            print(f"warning: could not archive the log to {self.uri}: {err}", file=sys.stderr)


def read_archived(stage_uri: str) -> list[tuple[str, str]]:
    """(file name, text) of every archived log of a stage."""
    folder = storage.join(stage_uri, "logs")
    return [
        (n, storage.read_bytes(storage.join(folder, n)).decode(errors="replace")) for n in storage.list_names(folder)
    ]
