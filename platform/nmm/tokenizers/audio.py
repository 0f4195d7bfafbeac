"""The audio tokenizer: a log-mel codebook, decoded back to sound by Griffin-Lim.

Not a neural codec. Each frame of a recording (n_fft samples, every `hop`) becomes a log-mel
vector of `mels` bands, normalised band by band with the train split's mean and deviation, and
its code is the nearest entry of a k-means codebook fitted on the train split's frames only. One
code per frame, so a span's length follows the recording's (variable: the model writes `<eoa>`
itself). Decoding pastes each code's mel vector back, undoes the normalisation, inverts the mel
filterbank (librosa's `feature.inverse.mel_to_stft`) and recovers a phase with Griffin-Lim
(`librosa.griffinlim`, its starting phase seeded).

Why the normalisation is the train split's and not each utterance's: decoding needs the levels
back. Measured on spoken-digits (nicolas held out, 200 recordings each, the MFCC judge of
nmm.evaluate.speech): per-utterance normalisation kept 0.51-0.59 of round trips recognisable on
training voices, the split's 0.93; a 512-point FFT over the 256-point one 0.98 (docs/evaluation.md
has the ceilings of every fold).
"""

from __future__ import annotations

import json

import numpy as np


class LogMelVQ:
    KEY = "logmelvq"

    def __init__(self, codebook: np.ndarray, mean: np.ndarray, std: np.ndarray, config: dict):
        self.codebook = np.asarray(codebook, np.float32)  # (K, mels), normalised units
        self.mean = np.asarray(mean, np.float32)  # (mels,) the train split's log-mel mean
        self.std = np.asarray(std, np.float32)
        self.rate = int(config["rate"])
        self.n_fft = int(config["n_fft"])
        self.hop = int(config["hop"])
        self.mels = int(config["mels"])
        self.griffin_lim_iters = int(config.get("griffin_lim_iters", 32))

    @property
    def size(self) -> int:
        return len(self.codebook)

    @property
    def config(self) -> dict:
        return {
            "rate": self.rate,
            "n_fft": self.n_fft,
            "hop": self.hop,
            "mels": self.mels,
            "griffin_lim_iters": self.griffin_lim_iters,
        }

    def frames_for(self, seconds: float) -> int:
        """How many codes a recording of `seconds` becomes (librosa's centred frames; a recording
        shorter than one frame is padded to one)."""
        return 1 + max(int(seconds * self.rate), self.n_fft) // self.hop

    def log_mel(self, samples: np.ndarray) -> np.ndarray:
        """(frames, mels) log-mel energies of one recording."""
        return _log_mel(samples, self.rate, self.n_fft, self.hop, self.mels)

    def frames(self, samples: np.ndarray) -> np.ndarray:
        """(frames, mels) the normalised log-mel frames: what mid fusion's audio stem reads and what
        the codebook quantizes."""
        return ((self.log_mel(samples) - self.mean) / self.std).astype(np.float32)

    @classmethod
    def fit(
        cls,
        waves,
        rate: int,
        codebook_size: int = 512,
        n_fft: int = 512,
        hop: int = 128,
        mels: int = 40,
        fit_frames: int = 40_000,
        seed: int = 0,
    ) -> LogMelVQ:
        """Fitted on `waves` (the train split's recordings, mono at `rate`): the normalisation from
        every frame, the codebook from `fit_frames` of them drawn with `seed` (k-means)."""
        from sklearn.cluster import KMeans

        if not len(waves):
            raise ValueError("the audio tokenizer has no training recordings to fit on")
        logmels = [_log_mel(w, rate, n_fft, hop, mels) for w in waves]
        frames = np.concatenate(logmels)
        mean, std = frames.mean(0), frames.std(0) + 1e-3
        normed = (frames - mean) / std
        rng = np.random.default_rng(seed)
        pick = (
            normed if len(normed) <= fit_frames else normed[np.sort(rng.choice(len(normed), fit_frames, replace=False))]
        )
        k = min(codebook_size, len(np.unique(pick, axis=0)))
        km = KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=100).fit(pick)
        config = {"rate": rate, "n_fft": n_fft, "hop": hop, "mels": mels}
        return cls(km.cluster_centers_, mean, std, config)

    def encode(self, samples: np.ndarray) -> np.ndarray:
        """(frames,) int32 codes of one recording."""
        x = self.frames(samples)
        d = (x**2).sum(-1, keepdims=True) - 2 * x @ self.codebook.T + (self.codebook**2).sum(-1)[None, :]
        return d.argmin(-1).astype(np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(n,) float32 samples at `rate`: the codes' mel frames, inverted, phase by Griffin-Lim
        (seeded: the same codes give the same samples)."""
        import librosa

        codes = np.clip(np.asarray(codes, np.int64), 0, self.size - 1)
        if len(codes) == 0:
            return np.zeros(0, np.float32)
        mel = np.exp(self.codebook[codes] * self.std + self.mean).T  # (mels, frames) power
        magnitude = librosa.feature.inverse.mel_to_stft(mel, sr=self.rate, n_fft=self.n_fft, power=2.0)
        y = librosa.griffinlim(
            magnitude,
            n_iter=self.griffin_lim_iters,
            hop_length=self.hop,
            n_fft=self.n_fft,
            random_state=0,  # the starting phase: the same codes give the same samples
        )
        peak = float(np.abs(y).max()) if len(y) else 0.0
        return (y / peak * 0.9 if peak > 0.9 else y).astype(np.float32)

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        meta = {LogMelVQ.KEY: json.dumps(self.config, sort_keys=True)}  # one entry: its bytes are stable
        return save({"codebook": self.codebook, "mean": self.mean, "std": self.std}, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> LogMelVQ:
        from safetensors.numpy import load

        from nmm.tokenizers.image import _metadata

        meta = _metadata(data)
        if cls.KEY not in meta:
            raise ValueError(f"not an audio tokenizer: its metadata has {sorted(meta)}, expected {cls.KEY!r}")
        a = load(data)
        return cls(a["codebook"], a["mean"], a["std"], json.loads(meta[cls.KEY]))


def _log_mel(samples: np.ndarray, rate: int, n_fft: int, hop: int, mels: int) -> np.ndarray:
    import librosa

    x = np.asarray(samples, np.float32)
    if len(x) < n_fft:  # shorter than one frame: padded with silence (librosa warns otherwise)
        x = np.pad(x, (0, n_fft - len(x)))
    m = librosa.feature.melspectrogram(y=x, sr=rate, n_fft=n_fft, hop_length=hop, n_mels=mels)
    return np.log(m + 1e-6).T.astype(np.float32)
