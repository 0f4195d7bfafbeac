"""`spoken-digits`: the Free Spoken Digit Dataset's 2,500 real recordings, shipped inside nmm.

Five speakers say each digit 50 times; 8 kHz mono 16-bit. The recordings live in
`nmm/data/spoken_digits/` as one lossless FLAC stream with an index (scripts/pack_fsdd.py wrote it
from the published WAVs and checked every recording reads back sample for sample), beside their
license notice (CC BY-SA 4.0). Nothing is downloaded.

Captions name the digit as a word and as a numeral; the ground truth is the digit and the speaker.
`speaker_split` holds whole speakers out, so a test measures a voice the model never heard: the
dataset's own split puts every speaker in both halves, where an MFCC SVM scores 0.99 and says
nothing about an unseen voice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

from nmm.data.sources import DIGIT_WORDS

RATE = 8000
SPEECH_TEMPLATES = ("the spoken digit {w}", "someone saying {d}", "a recording of the number {w}", "{w}")


@dataclass(frozen=True)
class Recordings:
    waves: tuple[np.ndarray, ...]  # each (n,) float32 in [-1, 1] at `rate`
    rate: int
    labels: np.ndarray  # (N,) the digit said
    speakers: tuple[str, ...]  # who said it
    names: tuple[str, ...]  # the published file name: {digit}_{speaker}_{take}.wav

    def __len__(self) -> int:
        return len(self.waves)

    def subset(self, idx) -> Recordings:
        idx = [int(i) for i in idx]
        return Recordings(
            tuple(self.waves[i] for i in idx),
            self.rate,
            self.labels[idx],
            tuple(self.speakers[i] for i in idx),
            tuple(self.names[i] for i in idx),
        )


@cache
def load_spoken_digits() -> Recordings:
    """All 2,500 recordings, in the published order (digit, speaker, take)."""
    import soundfile as sf

    folder = resources.files("nmm.data") / "spoken_digits"
    index = json.loads((folder / "index.json").read_text())
    with (folder / "recordings.flac").open("rb") as f:
        stream, rate = sf.read(f, dtype="float32")
    if rate != index["rate"]:
        raise RuntimeError(f"spoken_digits/recordings.flac is {rate} Hz, its index says {index['rate']}")
    ends = np.cumsum(index["length"])
    if ends[-1] != len(stream):
        raise RuntimeError(f"spoken_digits/recordings.flac holds {len(stream)} samples, its index {ends[-1]}")
    waves = tuple(np.split(stream, ends[:-1]))
    speakers = tuple(index["speakers"][s] for s in index["speaker"])
    names = tuple(f"{d}_{s}_{t}.wav" for d, s, t in zip(index["digit"], speakers, index["take"]))
    return Recordings(waves, rate, np.asarray(index["digit"], np.int64), speakers, names)


def speech_captions(label: int, k: int) -> list[str]:
    """The first `k` captions of a recording of `label`: the digit as a word, then as a numeral."""
    return [t.format(d=label, w=DIGIT_WORDS[label]) for t in SPEECH_TEMPLATES[:k]]


def speaker_split(speakers, held_out: tuple[str, ...], val_share: float = 0.1) -> dict[str, np.ndarray]:
    """train / val / test indices: the held-out speakers' recordings are the test split; of the
    rest, every 1/val_share-th recording of each speaker (in digit order: every digit alike) is
    validation (the same voices as train: what the loss curve sees)."""
    speakers = list(speakers)
    unknown = sorted(set(held_out) - set(speakers))
    if unknown:
        raise ValueError(
            f"split.heldOut: {unknown} are not speakers of this source; expected some of {sorted(set(speakers))}"
        )
    if set(held_out) >= set(speakers):
        raise ValueError("split.heldOut: holds every speaker out; at least one must stay to train on")
    every = max(2, round(1 / val_share)) if val_share > 0 else 0
    seen: dict[str, int] = {}
    out = {"train": [], "val": [], "test": []}
    for i, s in enumerate(speakers):
        if s in held_out:
            out["test"].append(i)
            continue
        seen[s] = seen.get(s, 0) + 1
        out["val" if every and seen[s] % every == 0 else "train"].append(i)
    return {k: np.asarray(v, np.int64) for k, v in out.items()}
