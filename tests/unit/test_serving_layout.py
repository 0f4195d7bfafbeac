"""A request is laid out the way the model was trained, or refused saying what the model does
(issue 27 item 7), with one layout for `nmm serve` and the MLflow pyfunc (item 12): a caption
ask is the caption prompt, a question goes only to a model trained to answer, a prompt that leaves
no room for an image is refused at parse time; the pyfunc reads a frame whose rows mix kinds."""

from __future__ import annotations

import numpy as np
import pytest

from nmm.data.sequences import INSTRUCTIONS, caption_ask
from nmm.serve.model_dir import Refused, load_from_files


def small(style: str = "instruct", serves: dict | None = None, max_seq_len: int = 96, source: str = "digits"):
    from nmm.data.sources import load_digits
    from tests.serving_fixture import small_model_files

    extra = {"serves": serves} if serves is not None else {}
    return load_from_files(small_model_files(max_seq_len, source=source, prompts=style, **extra)), load_digits(1)


@pytest.mark.parametrize(
    "text, k",
    [
        (None, 0),
        ("Describe the image.", 0),
        ("what is shown", 1),
        ("Caption this image.", 2),
        ("What's in this image?", 0),
        ("  DESCRIBE   the image!! ", 0),
    ],
)
def test_a_caption_ask_is_laid_out_as_the_caption_prompt_the_model_trained_on(text, k):
    m, d = small()
    codes = m.vq.encode(d.images[:1])[0]
    assert m.read_prompt(codes, text) == m.prompts.caption(codes, k)
    assert (caption_ask(text) if text else 0) == k


def test_a_question_to_a_model_that_never_learned_to_answer_is_refused_saying_what_it_does():
    m, d = small(serves={"caption": True, "answer": False, "draw": True})
    with pytest.raises(Refused) as refused:
        m.read_prompt(m.vq.encode(d.images[:1])[0], "Describe the image. What digit is this?")
    assert refused.value.param == "messages" and "captions images and answers no questions" in str(refused.value)
    assert INSTRUCTIONS["caption"][0] in str(refused.value)


def test_a_question_to_a_model_that_answers_is_laid_out_as_vqa():
    m, d = small(serves={"caption": True, "answer": True, "draw": True})
    codes = m.vq.encode(d.images[:1])[0]
    asked = "what colour is the circle?"
    assert m.read_prompt(codes, asked) == m.prompts.question(codes, m.text.encode(asked))


def test_folders_published_before_serves_was_recorded_answer_as_they_were_trained():
    digits, _ = small(source="digits")
    shapes, _ = small(source="shapes")
    assert digits.serves == {"caption": True, "answer": False, "draw": True, "transcribe": False, "speak": False}
    assert shapes.serves["answer"]


def test_a_model_that_does_not_draw_refuses_a_drawing_and_a_prompt_with_no_room_for_an_image_is_refused():
    m, _ = small(serves={"caption": True, "answer": False, "draw": False})
    with pytest.raises(Refused, match="does not draw"):
        m.draw_prompt("a handwritten digit 3")
    short, _ = small(max_seq_len=24)  # an image is 16 codes: 8 tokens of prompt at most
    with pytest.raises(Refused) as refused:
        short.draw_prompt("a handwritten digit three drawn with a thick pen")
    assert refused.value.param == "prompt" and "draws after at most 8" in str(refused.value)
    assert len(short.draw_prompt("3")) <= 8


def test_the_pyfunc_answers_a_frame_whose_rows_mix_kinds_and_refuses_a_row_alone(monkeypatch):
    import pandas as pd

    import nmm.serve.pyfunc as pyfunc

    m, d = small(serves={"caption": True, "answer": False, "draw": True})
    calls = []
    real = pyfunc.draw
    monkeypatch.setattr(pyfunc, "draw", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    from nmm.rollout.probe import _data_url

    url = _data_url((d.images[1] * 255).astype(np.uint8))
    frame = pd.DataFrame(
        [
            {"prompt": "a handwritten digit 3"},
            {"image": url},
            {"image": url, "question": "what digit is this?"},
            {"image_codes": " ".join(map(str, m.vq.encode(d.images[:1])[0]))},
            {"image": "data:image/png;base64,bm90IGFuIGltYWdl"},
            {"image_codes": "1 2"},
        ]
    )
    assert frame["prompt"].isna().sum() == 5  # what pandas does to a mixed frame: NaN in the other kinds' cells
    out = pyfunc.Predictor(m).predict(frame, params={"guidance": 2.0, "max_tokens": 3})
    assert np.asarray(out[0]["image"]).shape == (8, 8, 1)
    assert isinstance(out[1]["text"], str) and isinstance(out[3]["text"], str)
    assert "answers no questions" in out[2]["error"]
    assert "not a usable image" in out[4]["error"] and "expected 16 codes" in out[5]["error"]  # each bad row alone
    assert calls == [{"plans": False, "temperature": 0.7, "generator": calls[0]["generator"], "guidance": 2.0}]


def test_a_chat_batch_key_never_equals_a_draw_batch_key_of_the_same_numbers():
    """The batcher runs equal keys together: a chat job and a drawing job must never share a batch."""
    from nmm.serve.server import ChatKey, DrawKey, SpeakKey

    assert ChatKey(2, 1.0, None) != DrawKey(2.0, 1.0, None)
    assert ChatKey(16, 0.7, 3) == ChatKey(16, 0.7, 3) and hash(ChatKey(16, 0.7, 3)) == hash(ChatKey(16, 0.7, 3))
    # a recording's prompt and an image's never share a batch (a model reading pixels needs them for every row)
    assert ChatKey(16, 0.7, 3, "audio") != ChatKey(16, 0.7, 3) and SpeakKey(0.7, 3) != DrawKey(0.7, 0.7, 3)
