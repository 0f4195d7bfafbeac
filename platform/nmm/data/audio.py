"""Audio bytes in, checked mono float32 samples out: one decoder for curation and serving.

`decode(data, limits)` reads WAV, FLAC, OGG/Vorbis and MP3 through libsndfile (the `soundfile`
wheel), mixes channels down to mono, resamples to the model's rate with soxr, and either returns
the samples with notes on what it converted, or raises `AudioRejected` with a ledger reason:

    decode_error   not audio, truncated, zero bytes, or a header that claims more than the data
    too_long       longer than limits.max_seconds (refused from the header, before the samples are read)
    too_short      shorter than limits.min_seconds
    silence        RMS below limits.silence_rms (dBFS below -50 by default)
    clipping       more than limits.clipping_share of samples at full scale

What a file may cost is bounded before it is spent (S14): its byte size (limits.max_bytes) and
the duration its header claims are checked before any sample is decoded.

Two signatures make duplicate decisions: `pcm_hash` (exact: the decoded samples, not the file's
bytes, so a re-encoding of the same PCM is the same) and `fingerprint` (near: a 64-bit sign
pattern of band-energy differences over time, as Haitsma and Kalker's audio fingerprint, which
survives gain changes and lossy re-encoding; compare with a Hamming distance).
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass

import numpy as np

REASONS = ("decode_error", "too_long", "too_short", "silence", "clipping")


class AudioRejected(ValueError):
    """The bytes are not audio a model can take; `reason` is the ledger's word for why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class AudioLimits:
    rate: int = 8000  # the model's sample rate: everything is resampled to it
    min_seconds: float = 0.1
    max_seconds: float = 2.0
    max_bytes: int = 16 << 20
    silence_rms: float = 10 ** (-50 / 20)  # -50 dBFS
    clipping_share: float = 0.01  # of samples at |x| >= 0.999


@dataclass(frozen=True)
class Decoded:
    samples: np.ndarray  # (n,) float32 in [-1, 1] at limits.rate
    source_rate: int
    source_channels: int
    notes: tuple[str, ...]  # what was converted: "resampled 16000->8000 Hz", "mixed 2 channels to mono"


def decode(data: bytes, limits: AudioLimits = AudioLimits()) -> Decoded:
    """The checked, mono samples at `limits.rate`; AudioRejected naming the problem otherwise."""
    import soundfile as sf

    if not data:
        raise AudioRejected("decode_error", "zero bytes")
    if len(data) > limits.max_bytes:
        raise AudioRejected(
            "decode_error", f"{len(data)} bytes, more than the {limits.max_bytes} an audio file may have"
        )
    _check_riff(data)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels, frames = f.samplerate, f.channels, f.frames
            if rate <= 0 or channels <= 0:
                raise AudioRejected("decode_error", f"header says {rate} Hz, {channels} channels")
            if frames > 0 and frames / rate > limits.max_seconds:
                raise AudioRejected("too_long", f"{frames / rate:.1f} s, longer than {limits.max_seconds:g} s")
            # read at most what the limit allows (a header may not say, or may lie): one more
            # frame than the limit tells "too long" from "exactly the limit"
            cap = int(limits.max_seconds * rate) + 1
            x = f.read(frames=cap, dtype="float32", always_2d=True)
    except AudioRejected:
        raise
    except Exception as e:  # libsndfile's errors (sf.LibsndfileError, RuntimeError) name the problem
        raise AudioRejected("decode_error", _first_line(e)) from None
    if len(x) >= int(limits.max_seconds * rate) + 1:
        raise AudioRejected("too_long", f"longer than {limits.max_seconds:g} s")
    if frames > 0 and len(x) < frames:
        raise AudioRejected("decode_error", f"truncated: the header claims {frames} frames, the data holds {len(x)}")
    notes = []
    if channels > 1:
        notes.append(f"mixed {channels} channels to mono")
    mono = x.mean(axis=1, dtype=np.float32)
    if rate != limits.rate:
        import soxr

        mono = soxr.resample(mono, rate, limits.rate).astype(np.float32)
        notes.append(f"resampled {rate}->{limits.rate} Hz")
    check(mono, limits)
    return Decoded(mono, rate, channels, tuple(notes))


def check(samples: np.ndarray, limits: AudioLimits) -> None:
    """AudioRejected when the samples (mono, at limits.rate) are too short, silent or clipped."""
    seconds = len(samples) / limits.rate
    if seconds < limits.min_seconds:
        raise AudioRejected("too_short", f"{seconds:.3f} s, shorter than {limits.min_seconds:g} s")
    if seconds > limits.max_seconds:
        raise AudioRejected("too_long", f"{seconds:.1f} s, longer than {limits.max_seconds:g} s")
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    if rms < limits.silence_rms:
        raise AudioRejected("silence", f"RMS {_dbfs(rms):.0f} dBFS, below {_dbfs(limits.silence_rms):.0f} dBFS")
    clipped = float(np.mean(np.abs(samples) >= 0.999))
    if clipped > limits.clipping_share:
        raise AudioRejected(
            "clipping", f"{clipped:.1%} of samples at full scale, more than {limits.clipping_share:.0%}"
        )


def to_wav(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    """16-bit PCM WAV bytes (what `/v1/audio/speech` answers and MLflow stores); `fmt="FLAC"`:
    the same samples, losslessly compressed."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def pcm_hash(samples: np.ndarray) -> str:
    """The exact-duplicate signature: a hash of the samples as 16-bit PCM (the file's container,
    tags and compression do not enter)."""
    pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    return hashlib.sha256(pcm.tobytes()).hexdigest()


FINGERPRINT_BANDS = 9  # 8 band differences per time step
FINGERPRINT_STEPS = 9  # 8 time differences: 64 bits


def fingerprint(samples: np.ndarray, rate: int) -> int:
    """A 64-bit near-duplicate signature: the log energies of 9 bands over 9 equal stretches of
    the recording; bit (t, b) is the sign of the change of band b's difference to band b+1 from
    stretch t to t+1. Gain cancels (differences of log energies), and re-encoding moves energies
    too little to flip most signs."""
    n = len(samples)
    if n < FINGERPRINT_STEPS * 32:
        samples = np.pad(samples, (0, FINGERPRINT_STEPS * 32 - n))
    stretches = np.array_split(samples.astype(np.float64), FINGERPRINT_STEPS)
    edges = np.geomspace(100, rate / 2, FINGERPRINT_BANDS + 1)
    energies = np.empty((FINGERPRINT_STEPS, FINGERPRINT_BANDS))
    for t, s in enumerate(stretches):
        spec = np.abs(np.fft.rfft(s * np.hanning(len(s)))) ** 2
        freqs = np.fft.rfftfreq(len(s), 1 / rate)
        for b in range(FINGERPRINT_BANDS):
            sel = (freqs >= edges[b]) & (freqs < edges[b + 1])
            energies[t, b] = np.log(spec[sel].sum() + 1e-10)
    band_diff = energies[:, :-1] - energies[:, 1:]  # (9, 8)
    bits = (band_diff[1:] - band_diff[:-1]) > 0  # (8, 8)
    return int(np.packbits(bits.ravel()).view(">u8")[0])


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _dbfs(rms: float) -> float:
    return 20 * np.log10(max(rms, 1e-12))


def _check_riff(data: bytes) -> None:
    """A WAV's data chunk must hold what its header claims: libsndfile quietly reads a truncated
    file, or one whose header claims 4 GB, as shorter audio."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    at = 12
    while at + 8 <= len(data):
        chunk, size = data[at : at + 4], int.from_bytes(data[at + 4 : at + 8], "little")
        if chunk == b"data":
            held = len(data) - at - 8
            if size > held:
                raise AudioRejected(
                    "decode_error", f"truncated WAV: its header claims {size} bytes of samples, the file holds {held}"
                )
            return
        at += 8 + size + (size & 1)
    raise AudioRejected("decode_error", "WAV without a data chunk")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return re.sub(r"^Error opening <[^>]*>: ", "", line)  # the BytesIO's address says nothing
