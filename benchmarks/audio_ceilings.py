"""What the spoken-digit figures can reach, per held-out speaker: the judge's and the tokenizer's
ceilings, and the MFCC SVM yardstick a model's listening is held to.

    python benchmarks/audio_ceilings.py                # all five folds
    python benchmarks/audio_ceilings.py --held-out nicolas --page /tmp/nicolas.html

For each fold (one of FSDD's five speakers held out): the audio tokenizer (nmm.tokenizers.audio,
512 codes) fitted on the four training speakers; the judge (nmm.evaluate.speech, an MFCC SVM)
fitted on their real recordings; then the judge's accuracy on

- `svm_held_out`: the held-out speaker's real recordings (the yardstick: `m2t.spoken_digits.vs_svm`
  divides a model's accuracy by this, and the ceiling of M2G judged on an unseen voice);
- `round_trip_held_out`: the same recordings through the tokenizer and back (Griffin-Lim);
- `round_trip_train_voices`: every 4th training recording through the tokenizer and back (what a
  model that speaks in its training voices can at best be judged: the ceiling of
  `m2g.spoken_digits.accuracy`).

Writes benchmarks/results/audio-ceilings.json when it runs all five folds (a fold or two only
print). `--page PATH`: a page to listen to (nmm.evaluate.listening) of the first fold: per digit,
a held-out recording, its round trip and a training voice's round trip, each with what the judge
hears. A figure, never asserted in a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from nmm.data.speech import load_spoken_digits, speaker_split
from nmm.evaluate.listening import Clip, page
from nmm.evaluate.speech import DigitJudge
from nmm.tokenizers.audio import LogMelVQ


def listening_page(held_out: str, test, voices, trip, judge, rate: int) -> str:
    """Per digit: the held-out voice's first recording, its round trip, a training voice's round trip."""
    rows = {}
    for d in range(10):
        real, voice = (
            test.waves[int(np.flatnonzero(test.labels == d)[0])],
            voices.waves[int(np.flatnonzero(voices.labels == d)[0])],
        )
        clips = {
            "held-out voice, real": real,
            "its round trip": trip([real])[0],
            "a training voice, round trip": trip([voice])[0],
        }
        heard = judge.predict(list(clips.values()))
        rows[str(d)] = [Clip(x, f"{what}: the judge hears {h}") for (what, x), h in zip(clips.items(), heard)]
    return page(f"Spoken digits: {held_out} held out, the log-mel codebook's round trip", rows, rate)


def fold(rec, held_out: str, page_to: Path | None = None) -> dict:
    t0 = time.perf_counter()
    split = speaker_split(rec.speakers, (held_out,))
    train, test = rec.subset(split["train"]), rec.subset(split["test"])
    vq = LogMelVQ.fit(train.waves, rec.rate, codebook_size=512, seed=0)
    judge = DigitJudge(rec.rate).fit(train.waves, train.labels)
    voices = train.subset(range(0, len(train), 4))
    trip = lambda waves: [vq.decode(vq.encode(w)) for w in waves]
    out = {
        "held_out": held_out,
        "train_recordings": len(train),
        "test_recordings": len(test),
        "codebook": vq.size,
        "mean_codes_per_recording": round(float(np.mean([len(vq.encode(w)) for w in test.waves])), 1),
        "svm_held_out": judge.accuracy(test.waves, test.labels),
        "round_trip_held_out": judge.accuracy(trip(test.waves), test.labels),
        "round_trip_train_voices": judge.accuracy(trip(voices.waves), voices.labels),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if page_to is not None:
        page_to.write_text(listening_page(held_out, test, voices, trip, judge, rec.rate))
        print(f"wrote {page_to}", flush=True)
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--held-out", nargs="*", help="speakers to hold out, one fold each (default: all five)")
    ap.add_argument("--page", type=Path, help="write a page to listen to (the first fold's) here")
    args = ap.parse_args()
    rec = load_spoken_digits()
    speakers = args.held_out or sorted(set(rec.speakers))
    folds = [fold(rec, s, args.page if i == 0 else None) for i, s in enumerate(speakers)]
    mean = lambda k: round(float(np.mean([f[k] for f in folds])), 4)
    result = {
        "machine": f"{platform.node()} ({platform.machine()}, {platform.processor() or 'cpu'})",
        "date": time.strftime("%Y-%m-%d"),
        "folds": folds,
        "mean": {k: mean(k) for k in ("svm_held_out", "round_trip_held_out", "round_trip_train_voices")},
    }
    if set(speakers) != set(rec.speakers):
        print(f"mean of {len(folds)} fold(s): {result['mean']} (all five write the results file)")
        return
    out = Path(__file__).parent / "results" / "audio-ceilings.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}: mean {result['mean']}")


if __name__ == "__main__":
    main()
