"""MLflow pyfunc loader module (`loader_module="nmm.serve.pyfunc"`); imports no MLflow.

`mlflow.pyfunc.load_model(uri).predict(frame)` with rows of `{"prompt": "a handwritten digit 3"}`
(draw; returns the image's pixels), `{"image": "data:image/png;base64,…"}` (caption it, or answer
`"question"` when given; returns text), `{"image_codes": "3 17 5 …"}` (early fusion's codes),
`{"audio": "<base64 WAV, FLAC, OGG or MP3>"}` (transcribe it; returns text) or
`{"speech": "seven"}` (say it, greedily; returns `{"audio": <base64 WAV>}`).
Rows of different kinds may share one frame (pandas fills the other kinds' columns with NaN: a
missing cell is missing). A row the model cannot serve gets `{"error": …}` in its place, the other
rows their answers. `params`: `max_tokens`, `temperature`, `guidance`, `seed` (the server's
defaults). The model's MLflow signature (`SIGNATURE`, logged with it) says all this; called
directly, `image` may also be pixels (H×W×C in [0, 1]).

The pyfunc lays a request out and draws exactly as `nmm serve` does: the model's own prompt style
and tasks (`LoadedModel.read_prompt` / `draw_prompt`), the one drawing path
(nmm.model.generate.draw).
"""

from __future__ import annotations

import base64
import binascii
import math

import numpy as np
import torch

from nmm.data.audio import to_wav
from nmm.model.generate import draw, generate, speak
from nmm.serve import openai_api
from nmm.serve.model_dir import LoadedModel, Refused, load_from_dir
from nmm.tokenizers.vocab import EOS

DEFAULTS = {
    "max_tokens": openai_api.CHAT_MAX_TOKENS,
    "temperature": openai_api.DRAW_TEMPERATURE,
    "guidance": openai_api.DRAW_GUIDANCE,
    "seed": 0,
}
# The MLflow signature (nmm.lineage makes MLflow's objects of it): every column optional, strings
# only — an array column's NaN (another kind's row) fails MLflow's own schema check.
SIGNATURE = {
    "inputs": {
        "prompt": "string",
        "question": "string",
        "image": "string",
        "image_codes": "string",
        "audio": "string",
        "speech": "string",
    },
    "params": {
        "max_tokens": ("long", DEFAULTS["max_tokens"]),
        "temperature": ("double", DEFAULTS["temperature"]),
        "guidance": ("double", DEFAULTS["guidance"]),
        "seed": ("long", DEFAULTS["seed"]),
    },
}


def present(value) -> bool:
    """A cell that holds something: not None, not NaN (pandas' filler for another kind's column)."""
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return not (isinstance(value, str) and not value)


class Predictor:
    def __init__(self, loaded: LoadedModel):
        self.m = loaded

    def predict(self, model_input, params=None):
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        p = DEFAULTS | {k: v for k, v in (params or {}).items() if k in DEFAULTS and v is not None}
        out = []
        for row in rows:
            try:
                if present(row.get("prompt")):
                    out.append(self._draw(row["prompt"], p))
                elif present(row.get("speech")):
                    out.append(self._say(str(row["speech"])))
                elif present(row.get("audio")):
                    out.append(self._listen(row["audio"], p))
                else:
                    out.append(self._read(row, p))
            except Refused as exc:
                out.append({"error": str(exc)})
        return out

    def _draw(self, prompt: str, p: dict) -> dict:
        m = self.m
        if m.vq is None:
            raise Refused("prompt", "this model has no images (its vocabulary holds none)")
        g = torch.Generator().manual_seed(int(p["seed"]))
        drawn = draw(
            m.model,
            [m.draw_prompt(str(prompt))],
            m.vq,
            m.vocab,
            plans=m.prompts.plans,
            temperature=openai_api.greedy_below_floor(float(p["temperature"])),
            generator=g,
            guidance=float(p["guidance"]),
        )
        return {"image": drawn.pixels[0].tolist()}

    def _read(self, row: dict, p: dict) -> dict:
        m, v = self.m, self.m.vocab
        if m.vq is None:
            raise Refused("image", "this model has no images (its vocabulary holds none)")
        patches = None
        if present(row.get("image")):
            pixels = self._pixels(row["image"])[None]
            codes = m.vq.encode(pixels)[0]
            patches = torch.from_numpy(m.vq.patches(pixels)) if m.model.cfg.reads_pixels else None
        elif present(row.get("image_codes")):
            codes = self._codes(row["image_codes"])
        else:
            raise Refused("image", "a row needs a prompt (to draw), an image or image_codes (to read)")
        question = str(row["question"]) if present(row.get("question")) else None
        ids = generate(
            m.model,
            [m.read_prompt(codes, question)],
            int(p["max_tokens"]),
            v.text_range(),
            stop=EOS,
            extra_allowed=(EOS,),
            patches=patches,
        )[0]
        return {"text": m.text.decode(v.text_local(ids)).strip()}

    def _audio(self):
        if self.m.audio is None:
            raise Refused("audio", "this model has no speech (its vocabulary holds none)")
        return self.m.audio

    def _listen(self, recording, p: dict) -> dict:
        """A recording (base64, or a data: URL of one) → the model's transcription."""
        tok, m = self._audio(), self.m
        text = str(recording)
        try:
            data = base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
            samples = openai_api.decode_audio(data, tok.rate, "audio")
        except (binascii.Error, ValueError):
            raise Refused("audio", "expected a recording as base64 (or a data: URL)") from None
        except openai_api.APIError as exc:
            raise Refused("audio", exc.message) from None
        ids = generate(
            m.model,
            [m.listen_prompt(tok.encode(samples))],
            int(p["max_tokens"]),
            m.vocab.text_range(),
            stop=EOS,
            extra_allowed=(EOS,),
        )[0]
        return {"text": m.text.decode(m.vocab.text_local(t for t in ids if t != EOS)).strip()}

    def _say(self, text: str) -> dict:
        tok, m = self._audio(), self.m
        prompt, room = m.say_prompt(text)
        codes = speak(m.model, [prompt], m.vocab, max_codes=room)[0]
        return {"audio": base64.b64encode(to_wav(tok.decode(codes), tok.rate)).decode()}

    def _pixels(self, image) -> np.ndarray:
        """A data URL (or bare base64) of a PNG/JPEG/WebP/GIF, checked as the server checks it; or pixels."""
        if not isinstance(image, str):
            return np.asarray(image, dtype=np.float32)
        side, _, channels = self.m.vq.image_shape
        url = image if image.startswith("data:") else "data:image/png;base64," + image
        try:
            data, fmt = openai_api.image_url_bytes(url)
            return openai_api.decode_image(data, fmt, channels, side)
        except openai_api.APIError as exc:
            raise Refused("image", exc.message) from None

    def _codes(self, codes) -> np.ndarray:
        try:
            out = np.asarray(codes.split() if isinstance(codes, str) else codes, dtype=np.int64)
        except ValueError:
            raise Refused("image_codes", "expected the image's codes as integers") from None
        if out.shape != (self.m.vq.tokens_per_image,) or out.min() < 0 or out.max() >= self.m.vq.size:
            raise Refused("image_codes", f"expected {self.m.vq.tokens_per_image} codes in 0..{self.m.vq.size - 1}")
        return out


def _load_pyfunc(data_path: str) -> Predictor:
    return Predictor(load_from_dir(data_path))
