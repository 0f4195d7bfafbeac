"""A free TCP port: for the processes nmm starts on loopback (torchrun's rendezvous, local model
servers and their router) and for the tests and benchmarks that start servers."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it; the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
