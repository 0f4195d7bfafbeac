"""MLflow pyfunc loader module (`loader_module="nmm.serve.pyfunc"`); imports no MLflow.

`mlflow.pyfunc.load_model(uri).predict(rows)` with rows of `{"prompt": "a handwritten digit 3"}`
(draw; returns image pixels), `{"image": [[[...]]]}` (pixels H×W×C in [0, 1]; caption, or answer
`"question"` when given; returns text) or `{"image_codes": [...]}` (early fusion's codes).
Callers send the bare caption or question: the model's own prompt style (`prompts` in its
config.json; a model finished by sft or opd answers instruction turns) wraps it.
"""

from __future__ import annotations

import numpy as np

from nmm.model.generate import draw_images, generate
from nmm.serve.model_dir import LoadedModel, load_from_dir
from nmm.tokenizers.vocab import EOS


class Predictor:
    def __init__(self, loaded: LoadedModel):
        self.m = loaded

    def predict(self, model_input, params=None):
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        out = []
        v, m, prompts = self.m.vocab, self.m, self.m.prompts
        for row in rows:
            if row.get("prompt"):
                ids = draw_images(m.model, [prompts.draw(m.text.encode(row["prompt"]))], m.vq.tokens_per_image, v.image_range(),
                                  plan_range=v.text_range() if prompts.plans else None)[1][0]
                img = m.vq.decode(np.asarray([[t - v.image_offset for t in ids]]))[0]
                out.append({"image": img.tolist()})
            else:
                patches = None
                if row.get("image") is not None:
                    pixels = np.asarray(row["image"], dtype=np.float32)[None]
                    codes = m.vq.encode(pixels)[0]
                    patches = m.vq.patches(pixels) if m.model.cfg.reads_pixels else None
                else:
                    codes = np.asarray(row["image_codes"], dtype=np.int64)
                q = row.get("question")
                prompt = prompts.question(codes, m.text.encode(q)) if q else prompts.caption(codes)
                ids = generate(m.model, [prompt], 16, v.text_range(), stop=EOS, extra_allowed=(EOS,), patches=patches)[0]
                out.append({"text": m.text.decode(v.text_local(ids)).strip()})
        return out


def _load_pyfunc(data_path: str) -> Predictor:
    return Predictor(load_from_dir(data_path))
