"""The spoken-digit judge: which digit a recording says, from code that knows nothing of the model.

13 MFCCs (40 mel bands, 256-point frames, hop 80: the FSDD README's yardstick), resampled to 20
frames, with their mean and deviation over the recording; standardised; an RBF SVM (C=10). Fitted
on the train split's real recordings only — never on a model's output — it is both

- the judge of what a model says (M2G: text → speech, image → speech), and
- the yardstick a model's listening is held to (M2T: `m2t.spoken_digits.vs_svm` is the model's
  accuracy on the held-out speaker over this SVM's on the same recordings).

Its ceilings are what it scores on the held-out speaker's real recordings and on their round
trip through the audio tokenizer: a model's spoken digits cannot be judged better than either.
"""

from __future__ import annotations

import numpy as np

MFCC = {"n_mfcc": 13, "n_mels": 40, "n_fft": 256, "hop_length": 80}
STEPS = 20  # MFCC frames, resampled: recordings differ in length


def features(samples: np.ndarray, rate: int) -> np.ndarray:
    """(13 * 20 + 13 + 13,) one recording's MFCC features."""
    import librosa

    x = np.asarray(samples, np.float32)
    if len(x) < MFCC["n_fft"]:
        x = np.pad(x, (0, MFCC["n_fft"] - len(x)))
    m = librosa.feature.mfcc(y=x, sr=rate, **MFCC)
    grid = np.linspace(0, m.shape[1] - 1, STEPS)
    resampled = np.stack([np.interp(grid, np.arange(m.shape[1]), row) for row in m])
    return np.concatenate([resampled.ravel(), m.mean(1), m.std(1)]).astype(np.float32)


class DigitJudge:
    """Fitted on real recordings and their digits; `predict` says which digit each recording is."""

    def __init__(self, rate: int):
        self.rate = rate
        self.model = None

    def fit(self, waves, labels) -> DigitJudge:
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        labels = np.asarray(labels)
        if len(set(labels.tolist())) < 2:
            found = sorted(set(labels.tolist()))
            raise ValueError(f"the spoken-digit judge needs recordings of at least two digits, got {found}")
        self.model = make_pipeline(StandardScaler(), SVC(C=10.0)).fit(self.featurize(waves), labels)
        return self

    def featurize(self, waves) -> np.ndarray:
        return np.stack([features(w, self.rate) for w in waves])

    def predict(self, waves) -> np.ndarray:
        """The digit each recording says; a recording too short to hear (under 256 samples of
        sound) is padded with silence, an empty one is -1 (wrong whatever it should have said)."""
        if self.model is None:
            raise RuntimeError("the judge is not fitted")
        out = np.full(len(waves), -1, np.int64)
        heard = [i for i, w in enumerate(waves) if len(w) and np.any(w)]
        if heard:
            out[heard] = self.model.predict(self.featurize([waves[i] for i in heard]))
        return out

    def accuracy(self, waves, labels) -> float:
        labels = np.asarray(labels)
        if not len(labels):
            raise ValueError("no recordings to judge")
        return float(np.mean(self.predict(waves) == labels))
