"""Where embedded defaults live on a laptop: `$NMM_HOME`, else `.nmm` under the working folder."""

from __future__ import annotations

import os
from pathlib import Path


def home_dir() -> Path:
    return Path(os.environ.get("NMM_HOME") or Path.cwd() / ".nmm").resolve()
