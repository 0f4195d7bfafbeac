"""A page to listen to: recordings side by side, each with its player, its spectrogram and a line
under it (the judge's verdict), in one self-contained HTML file. MLflow shows an HTML artifact in
its UI, so an audio suite logs this page beside its WAV files: real and generated speech per digit,
heard and looked at without leaving the run.

Everything is inside the page (data: URLs: 16-bit WAV, a PNG log-mel spectrogram); every text is
escaped. A clip longer than MAX_SECONDS is cut there, so a page's size is bounded by its clips.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass

import numpy as np

from nmm.data.audio import to_wav

MAX_SECONDS = 4.0  # a clip's length on the page at most
SPECTROGRAM_HEIGHT = 40  # mel bands; each drawn 2 pixels high, each frame 2 pixels wide


@dataclass(frozen=True)
class Clip:
    samples: np.ndarray  # mono float32 in [-1, 1]
    caption: str  # the line under it: whose it is, what the judge heard


def page(title: str, rows: dict[str, list[Clip]], rate: int) -> str:
    """The HTML page: one row per key of `rows` (e.g. a digit), its clips left to right."""
    body = [f"<h1>{html.escape(title)}</h1>", "<table>"]
    for name, clips in rows.items():
        cells = "".join(_cell(c, rate) for c in clips)
        body.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    body.append("</table>")
    style = (
        "body{font-family:sans-serif}td,th{padding:6px;vertical-align:top;text-align:center}"
        "img{image-rendering:pixelated;display:block;margin:4px auto}"
    )
    return (
        '<!doctype html><html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
    )


def _cell(clip: Clip, rate: int) -> str:
    x = np.asarray(clip.samples, np.float32)[: int(MAX_SECONDS * rate)]
    wav = base64.b64encode(to_wav(x, rate)).decode()
    png = base64.b64encode(spectrogram_png(x, rate)).decode()
    return (
        f'<td><audio controls preload="none" src="data:audio/wav;base64,{wav}"></audio>'
        f'<img alt="log-mel spectrogram" src="data:image/png;base64,{png}">'
        f"<div>{html.escape(clip.caption)}</div></td>"
    )


def spectrogram_png(samples: np.ndarray, rate: int) -> bytes:
    """A log-mel spectrogram as a greyscale PNG: time left to right, low frequencies at the bottom,
    each recording scaled to its own loudest band (80 dB of range)."""
    import librosa
    from PIL import Image

    x = np.asarray(samples, np.float32)
    if len(x) < 512:
        x = np.pad(x, (0, 512 - len(x)))
    mel = librosa.feature.melspectrogram(y=x, sr=rate, n_fft=512, hop_length=128, n_mels=SPECTROGRAM_HEIGHT)
    db = librosa.power_to_db(mel, ref=np.max, top_db=80.0)  # 0 at the loudest, down to -80
    grey = np.clip((db + 80.0) / 80.0 * 255.0, 0, 255).astype(np.uint8)[::-1]
    img = Image.fromarray(grey, "L").resize((grey.shape[1] * 2, grey.shape[0] * 2), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
