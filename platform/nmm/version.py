"""The code version recorded in lineage and cache keys: package version + a hash of its sources."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from nmm import __version__


@lru_cache(maxsize=1)
def code_version() -> str:
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"
