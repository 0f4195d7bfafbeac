"""A published model folder loads through the pyfunc loader and serves."""

import json

import numpy as np
import pytest

from nmm.model import ModelConfig


@pytest.mark.parametrize("kind", ["patch-vq", "colour-mask"])
def test_published_model_folder_serves_through_the_pyfunc_loader(tmp_path, kind):
    from nmm.serve.model_dir import model_files
    from nmm.serve.pyfunc import _load_pyfunc
    from nmm.tokenizers import ColourMaskVQ, PatchVQ, SharedVocab, TextTokenizer

    text = TextTokenizer.train("bpe", ["a handwritten digit 3", "the number seven"], 64)
    images = np.random.default_rng(0).random((20, 8, 8, 1), dtype=np.float32).round(1)
    vq = PatchVQ.fit(images, 2, 8) if kind == "patch-vq" else ColourMaskVQ.fit(images, 2, 4, 6)
    vocab = SharedVocab(text_size=text.size, image_size=vq.size)
    cfg = ModelConfig(vocab_size=vocab.size, dim=32, layers=1, heads=2, max_seq_len=40, image_factors=vq.factors)
    config = {"model": json.loads(cfg.to_json()), "vocab": {"text_size": text.size, "image_size": vq.size}}
    model = cfg.build()
    for name, data in model_files(model, config, {"text": text.to_bytes(), "image": vq.to_bytes()}).items():
        (tmp_path / name).write_bytes(data)
    predictor = _load_pyfunc(str(tmp_path))
    drawn, captioned = predictor.predict([{"prompt": "a handwritten digit 3"}, {"image_codes": [0] * 16}])
    assert np.asarray(drawn["image"]).shape == (8, 8, 1)
    assert isinstance(captioned["text"], str)
    assert type(predictor.m.vq) is type(vq) and predictor.m.model.cfg.image_factors == vq.factors
