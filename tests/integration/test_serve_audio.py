"""`nmm serve` hears and speaks, the OpenAI way: the official `openai` client against
`/v1/audio/transcriptions` (a multipart upload), `/v1/audio/speech` (WAV bytes back) and chat
completions with an `input_audio` part — each answer the one the model gives in this process.
Hostile recordings get a 400 naming the problem, every response is counted, and a model without
audio says so instead of guessing."""

from __future__ import annotations

import base64
import io
import json
import struct
import urllib.request

import numpy as np
import openai
import pytest
import soundfile as sf

from nmm import storage
from nmm.data.audio import to_wav
from nmm.data.sources import DIGIT_WORDS, parse_digit
from nmm.model.generate import generate, speak
from nmm.serve.model_dir import MAX_SPEECH_CODES
from nmm.tokenizers.vocab import EOS
from tests.audio_fixture import audio_model_files
from tests.serving_fixture import InProcess, counts, png_url, publish_small_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(hearing, tmp_path_factory):
    h = hearing
    folder = tmp_path_factory.mktemp("audio-model")
    storage.publish(folder.as_uri(), audio_model_files(h), {"kind": "nmm.model"})
    with InProcess(folder) as server:
        yield h, server, openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0), folder


def wav(h, i: int) -> bytes:
    return to_wav(h.waves[i], h.vq.rate)


def test_transcriptions_with_the_openai_client_are_the_model_s_own_answers(served):
    h, _, client, _ = served
    local = generate(
        h.model,
        [h.prompts.listen(h.vq.encode(w)) for w in h.waves],
        32,
        h.vocab.text_range(),
        stop=EOS,
        extra_allowed=(EOS,),
    )
    expected = [h.text.decode(h.vocab.text_local([t for t in o if t != EOS])).strip() for o in local]
    got = [
        client.audio.transcriptions.create(model="nmm", file=(f"{i}.wav", wav(h, i))).text for i in range(len(h.waves))
    ]
    assert got == expected
    assert np.mean([parse_digit(t) == y for t, y in zip(got, h.labels)]) >= 0.9, got
    as_text = client.audio.transcriptions.create(model="nmm", file=("0.wav", wav(h, 0)), response_format="text")
    assert as_text.strip() == expected[0]
    flac = io.BytesIO()
    sf.write(flac, h.waves[3], h.vq.rate, format="FLAC")
    assert client.audio.transcriptions.create(model="nmm", file=("3.flac", flac.getvalue())).text == expected[3]


def test_a_chat_with_an_input_audio_part_is_answered_as_its_transcription(served):
    h, _, client, _ = served
    for i in (0, 7):
        data = base64.b64encode(wav(h, i)).decode()
        reply = client.chat.completions.create(
            model="nmm",
            messages=[
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]}
            ],
        )
        heard = client.audio.transcriptions.create(model="nmm", file=("x.wav", wav(h, i))).text
        assert reply.choices[0].message.content == heard


def test_speech_with_the_openai_client_is_the_model_s_speech_and_the_judge_hears_the_digit(served):
    h, _, client, _ = served
    room = min(MAX_SPEECH_CODES, h.model.cfg.max_seq_len - len(h.prompts.say(h.text.encode("seven"))) - 1)
    heard = []
    for d, word in enumerate(DIGIT_WORDS):
        data = client.audio.speech.create(model="nmm", voice="alloy", input=word, response_format="wav").read()
        samples, rate = sf.read(io.BytesIO(data), dtype="float32")
        assert rate == h.vq.rate and samples.ndim == 1 and len(samples) > 0
        if d == 7:  # the bytes are the model's greedy speech, decoded as the library decodes it
            codes = speak(h.model, [h.prompts.say(h.text.encode(word))], h.vocab, max_codes=room)[0]
            assert data == to_wav(h.vq.decode(codes), h.vq.rate)
        heard.append(samples)
    verdict = h.judge.predict(heard)
    assert np.mean(verdict == np.arange(10)) >= 0.7, verdict
    flac = client.audio.speech.create(model="nmm", voice="alloy", input="two", response_format="flac").read()
    assert sf.info(io.BytesIO(flac)).format == "FLAC"


def riff(claimed_data: int, rate: int = 8000, data: bytes = b"") -> bytes:
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + claimed_data)
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", claimed_data)
        + data
    )


def test_hostile_recordings_get_a_400_naming_the_problem_and_every_response_is_counted(served):
    h, server, client, _ = served
    before = counts(server.url)
    good = wav(h, 0)
    ten_minutes = to_wav(np.full(8000 * 600, 0.1, np.float32), 8000, "FLAC")  # small: refused from its header
    cases = {
        "zero bytes": (b"", "zero bytes"),
        "not audio": (b"%PDF-1.4 not a recording" * 20, "decode_error"),
        "truncated": (good[: len(good) // 2], "truncated"),
        "claims 4 GB": (riff(0xFFFFFF00, data=b"\0" * 800), "decode_error"),
        "ten minutes": (ten_minutes, "too_long"),
        "a rate of 1 Hz": (riff(16000, rate=1, data=b"\1\0" * 8000), "too_long"),
        "too short": (to_wav(np.full(80, 0.2, np.float32), 8000), "too_short"),
    }
    for what, (data, reason) in cases.items():
        with pytest.raises(openai.BadRequestError) as err:
            client.audio.transcriptions.create(model="nmm", file=("x.wav", data))
        assert err.value.status_code == 400 and reason in err.value.message, (what, err.value.message)
        assert "not usable audio" in err.value.message or "zero bytes" in err.value.message, what
    with pytest.raises(openai.BadRequestError, match="input_audio: not usable audio"):
        client.chat.completions.create(
            model="nmm",
            messages=[
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}
            ],
        )
    with pytest.raises(openai.APIStatusError, match="the limit is") as err:  # ten minutes as WAV: 9.6 MB
        client.audio.transcriptions.create(model="nmm", file=("x.wav", to_wav(np.full(8000 * 600, 0.1), 8000)))
    assert err.value.status_code == 413
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="whisper-1", file=("x.wav", good))
    with pytest.raises(openai.BadRequestError, match="model: the form needs the model's name"):
        client.post(  # the form `transcriptions.create` sends, without its model field
            "/audio/transcriptions",
            body={},
            files=[("file", ("x.wav", good))],
            options={"headers": {"Content-Type": "multipart/form-data"}},
            cast_to=object,
        )
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.audio.speech.create(model="nmm", voice="alloy", input="one", response_format="mp3")
    with pytest.raises(openai.BadRequestError, match="file"):  # a form without the recording
        client.post(
            "/audio/transcriptions",
            body=None,
            options={"headers": {"Content-Type": "multipart/form-data; boundary=x"}},
            cast_to=object,
        )
    with pytest.raises(openai.BadRequestError, match="prompt: this model has no images"):
        client.images.generate(model="nmm", prompt="a handwritten digit 3")
    after = counts(server.url)
    grew = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert grew == {
        ("/v1/audio/transcriptions", "400"): len(cases) + 2,
        ("/v1/audio/transcriptions", "404"): 1,
        ("/v1/audio/transcriptions", "413"): 1,
        ("/v1/chat/completions", "400"): 1,
        ("/v1/audio/speech", "400"): 1,
        ("/v1/images/generations", "400"): 1,
    }, grew
    assert client.audio.transcriptions.create(model="nmm", file=("x.wav", good)).text  # still serving


def test_a_model_without_audio_says_so(tmp_path):
    publish_small_model(tmp_path.as_uri())
    with InProcess(tmp_path) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="this model has no speech"):
            client.audio.transcriptions.create(model="nmm", file=("x.wav", to_wav(np.full(800, 0.2, np.float32), 8000)))
        with pytest.raises(openai.BadRequestError, match="this model has no speech"):
            client.audio.speech.create(model="nmm", voice="alloy", input="one", response_format="wav")
        with pytest.raises(openai.BadRequestError, match="model: this model has no speech"):
            client.chat.completions.create(
                model="nmm", modalities=["text", "audio"], messages=[{"role": "user", "content": "one"}]
            )
        data = base64.b64encode(b"RIFF").decode()
        with pytest.raises(openai.BadRequestError, match="input_audio: this model has no speech"):
            client.chat.completions.create(
                model="nmm",
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}],
                    }
                ],
            )
        both = [
            {"type": "image_url", "image_url": {"url": png_url()}},
            {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
        ]
        with pytest.raises(openai.BadRequestError, match="exactly one image_url or input_audio part"):
            client.chat.completions.create(model="nmm", messages=[{"role": "user", "content": both}])
        reply = client.chat.completions.create(
            model="nmm", messages=[{"role": "user", "content": [both[0]]}], max_tokens=2
        )
        assert reply.choices[0].message.role == "assistant"  # images are served as before
        assert json.loads(urllib.request.urlopen(server.url + "/healthz", timeout=5).read())["status"] == "ok"


def test_the_pyfunc_takes_audio_rows_beside_the_others_and_answers_as_the_server(served):
    from nmm.serve.pyfunc import _load_pyfunc

    h, _, client, folder = served
    recording = base64.b64encode(wav(h, 4)).decode()
    out = _load_pyfunc(str(folder)).predict(
        [{"audio": recording}, {"speech": "four"}, {"audio": "not base64!"}, {"image": png_url()}, {"prompt": "a 4"}],
        {"max_tokens": 32},
    )
    assert out[0] == {"text": client.audio.transcriptions.create(model="nmm", file=("4.wav", wav(h, 4))).text}
    spoken = client.audio.speech.create(model="nmm", voice="alloy", input="four", response_format="wav").read()
    assert base64.b64decode(out[1]["audio"]) == spoken
    assert out[2] == {"error": "expected a recording as base64 (or a data: URL)"}
    assert out[3] == out[4] == {"error": "this model has no images (its vocabulary holds none)"}


def test_a_chat_asking_for_a_spoken_answer_gets_the_model_s_speech_and_what_it_hears_in_it(served):
    h, _, client, _ = served
    reply = client.chat.completions.create(
        model="nmm",
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "wav"},
        messages=[{"role": "user", "content": "seven"}],
    )
    msg, choice = reply.choices[0].message, reply.choices[0]
    spoken = base64.b64decode(msg.audio.data)
    assert spoken == client.audio.speech.create(model="nmm", voice="alloy", input="seven", response_format="wav").read()
    assert msg.audio.transcript == client.audio.transcriptions.create(model="nmm", file=("7.wav", spoken)).text
    assert msg.content is None and choice.finish_reason == "stop" and reply.usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.chat.completions.create(
            model="nmm", modalities=["text", "audio"], stream=True, messages=[{"role": "user", "content": "one"}]
        )
    with pytest.raises(openai.BadRequestError, match="send one text part alone"):
        data = base64.b64encode(wav(h, 0)).decode()
        client.chat.completions.create(
            model="nmm",
            modalities=["text", "audio"],
            messages=[
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]}
            ],
        )
    with pytest.raises(openai.BadRequestError, match="audio.format"):
        client.chat.completions.create(
            model="nmm",
            modalities=["text", "audio"],
            audio={"voice": "alloy", "format": "mp3"},
            messages=[{"role": "user", "content": "one"}],
        )
