"""Pack the Free Spoken Digit Dataset's 2,500 WAVs into the package: one FLAC stream (lossless)
and an index of where each recording starts. Run once by a maintainer, from a copy of FSDD:

    python scripts/pack_fsdd.py ../shared/data/fsdd platform/nmm/data/spoken_digits

Checks that every recording reads back sample for sample before it writes anything.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


def main(src: Path, out: Path) -> None:
    files = sorted((src / "recordings").glob("*.wav"), key=lambda p: _order(p.name))
    waves, index, at = [], [], 0
    for p in files:
        x, rate = sf.read(p, dtype="int16")
        if rate != 8000 or x.ndim != 1:
            raise SystemExit(f"{p.name}: expected 8 kHz mono, found {rate} Hz, shape {x.shape}")
        digit, speaker, take = _order(p.name)
        index.append({"name": p.name, "digit": digit, "speaker": speaker, "take": take, "start": at, "length": len(x)})
        waves.append(x)
        at += len(x)
    stream = np.concatenate(waves)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "recordings.flac.tmp"
    sf.write(tmp, stream, 8000, format="FLAC", subtype="PCM_16")
    back, _ = sf.read(tmp, dtype="int16")
    for e, w in zip(index, waves):
        if not np.array_equal(back[e["start"] : e["start"] + e["length"]], w):
            raise SystemExit(f"{e['name']} does not read back equal")
    tmp.rename(out / "recordings.flac")
    speakers = sorted({e["speaker"] for e in index})
    columns = {
        "rate": 8000,
        "speakers": speakers,
        # one entry per recording, in the stream's order (digit, speaker, take); each starts where
        # the one before it ends
        "digit": [e["digit"] for e in index],
        "speaker": [speakers.index(e["speaker"]) for e in index],
        "take": [e["take"] for e in index],
        "length": [e["length"] for e in index],
    }
    (out / "index.json").write_text(json.dumps(columns, separators=(",", ":")) + "\n")
    print(f"{len(index)} recordings, {len(stream)} samples -> {(out / 'recordings.flac').stat().st_size} bytes")


def _order(name: str) -> tuple[int, str, int]:
    m = NAME.match(name)
    if not m:
        raise SystemExit(f"{name}: not a {{digit}}_{{speaker}}_{{index}}.wav name")
    return int(m[1]), m[2], int(m[3])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
