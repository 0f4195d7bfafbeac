"""Audio, the third modality: the shipped recordings, the decoder's rejections (every planted bad
recording lands with its reason), the duplicate signatures, the log-mel tokenizer's round trip
judged by the independent judge, and the vocabulary's audio block."""

from __future__ import annotations

import hashlib
import io
import struct

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from nmm import modalities
from nmm.data import audio
from nmm.data.speech import load_spoken_digits, speaker_split, speech_captions
from nmm.evaluate.speech import DigitJudge
from nmm.plugins import resolve
from nmm.tokenizers.audio import LogMelVQ
from nmm.tokenizers.vocab import BOI, EOI, SPECIALS, SharedVocab

# sha256 of the 2,500 published WAVs' int16 samples, concatenated in (digit, speaker, take) order:
# computed from ../shared/data/fsdd/recordings/*.wav when scripts/pack_fsdd.py packed them
FSDD_PCM_SHA256 = "18e6df9a31086f528ec27ec0bde0455fe5d78f78b8db0cede37f68e481586b99"


@pytest.fixture(scope="module")
def fsdd():
    return load_spoken_digits()


def _wav(samples, rate=8000, fmt="WAV", channels=1) -> bytes:
    buf = io.BytesIO()
    x = np.asarray(samples, np.float32)
    sf.write(buf, np.repeat(x[:, None], channels, 1) if channels > 1 else x, rate, format=fmt)
    return buf.getvalue()


def test_nmm_ships_exactly_the_published_recordings(fsdd):
    assert len(fsdd) == 2500 and fsdd.rate == 8000
    pcm = np.concatenate([np.round(w * 32768).astype("<i2") for w in fsdd.waves])
    assert hashlib.sha256(pcm.tobytes()).hexdigest() == FSDD_PCM_SHA256
    assert sorted(set(fsdd.speakers)) == ["george", "jackson", "lucas", "nicolas", "yweweler"]
    assert np.bincount(fsdd.labels).tolist() == [250] * 10
    assert fsdd.names[0] == "0_george_0.wav" and fsdd.speakers[0] == "george" and fsdd.labels[0] == 0
    assert min(len(w) for w in fsdd.waves) / 8000 > 0.1 and max(len(w) for w in fsdd.waves) / 8000 < 1.4


def test_captions_name_the_digit_as_a_word_and_a_numeral():
    caps = speech_captions(7, 2)
    assert caps == ["the spoken digit seven", "someone saying 7"]


def test_speaker_split_holds_whole_speakers_out(fsdd):
    s = speaker_split(fsdd.speakers, ("nicolas",))
    held = {fsdd.speakers[i] for i in s["test"]}
    seen = {fsdd.speakers[i] for i in np.concatenate([s["train"], s["val"]])}
    assert held == {"nicolas"} and "nicolas" not in seen and len(s["test"]) == 500
    assert len(s["train"]) + len(s["val"]) == 2000 and not set(s["train"]) & set(s["val"])
    assert np.bincount(fsdd.labels[s["val"]]).tolist() == [20] * 10  # every digit alike
    with pytest.raises(ValueError, match="split.heldOut: \\['nobody'\\] are not speakers"):
        speaker_split(fsdd.speakers, ("nobody",))
    with pytest.raises(ValueError, match="holds every speaker out"):
        speaker_split(fsdd.speakers, tuple(set(fsdd.speakers)))


def _planted(fsdd) -> dict[str, tuple[bytes, str]]:
    """Each bad recording and the ledger reason it must get."""
    good = _wav(fsdd.waves[0])
    t = np.arange(8000) / 8000
    return {
        "zero bytes": (b"", "decode_error"),
        "not audio": (b"\x89PNG\r\n\x1a\n" + bytes(200), "decode_error"),
        "truncated": (good[: len(good) // 2], "decode_error"),
        "header claims 4 GB": (good[:40] + struct.pack("<I", 0xFFFFFF00) + good[44:], "decode_error"),
        "ten minutes": (_wav(np.zeros(8000 * 600)), "too_long"),
        "too short": (_wav(fsdd.waves[0][:400]), "too_short"),
        "silence": (_wav(np.zeros(4000)), "silence"),
        "clipping": (_wav(np.clip(3 * np.sin(2 * np.pi * 300 * t[:4000]), -1, 1)), "clipping"),
    }


def test_every_planted_bad_recording_gets_its_reason(fsdd):
    limits = audio.AudioLimits(max_bytes=64 << 20)  # the ten-minute file is refused by its header, not its size
    for name, (data, reason) in _planted(fsdd).items():
        with pytest.raises(audio.AudioRejected) as e:
            audio.decode(data, limits)
        assert e.value.reason == reason, name
        assert e.value.reason in audio.REASONS and "0x" not in e.value.detail, name
    assert set(audio.REASONS) <= set(modalities.modality("audio").reasons)


def test_oversized_files_are_refused_before_they_are_read():
    with pytest.raises(audio.AudioRejected, match="more than the 1024 an audio file may have"):
        audio.decode(bytes(4096), audio.AudioLimits(max_bytes=1024))


def test_conversions_to_the_models_rate_and_channels_are_noted(fsdd):
    d = audio.decode(_wav(fsdd.waves[5], rate=8000, fmt="FLAC", channels=2))
    assert d.notes == ("mixed 2 channels to mono",) and len(d.samples) == len(fsdd.waves[5])
    import soxr

    up = soxr.resample(fsdd.waves[5], 8000, 16000)
    d = audio.decode(_wav(up, rate=16000))
    assert d.notes == ("resampled 16000->8000 Hz",) and abs(len(d.samples) - len(fsdd.waves[5])) <= 2


def test_exact_and_near_duplicate_signatures(fsdd):
    x = fsdd.waves[123]
    as_wav = audio.decode(_wav(x)).samples
    as_flac = audio.decode(_wav(x, fmt="FLAC")).samples
    assert audio.pcm_hash(as_wav) == audio.pcm_hash(as_flac)  # the container does not enter
    quieter_ogg = audio.decode(_wav(0.3 * x, fmt="OGG")).samples
    assert audio.pcm_hash(quieter_ogg) != audio.pcm_hash(as_wav)
    near = audio.hamming(audio.fingerprint(x, 8000), audio.fingerprint(quieter_ogg, 8000))
    others = [audio.hamming(audio.fingerprint(x, 8000), audio.fingerprint(w, 8000)) for w in fsdd.waves[::50]]
    assert near <= 6 < np.median(others), (near, sorted(others)[:5])


@pytest.fixture(scope="module")
def fitted(fsdd):
    """A small codebook fitted on part of four speakers' recordings, and the judge on all of theirs."""
    split = speaker_split(fsdd.speakers, ("nicolas",))
    train = fsdd.subset(split["train"])
    vq = LogMelVQ.fit(train.waves[::6], 8000, codebook_size=128, seed=0)
    judge = DigitJudge(8000).fit(train.waves, train.labels)
    return vq, judge, train, fsdd.subset(split["test"])


def test_tokenizer_codes_one_per_frame_and_survive_saving(fitted):
    vq, _, train, _ = fitted
    x = train.waves[7]
    codes = vq.encode(x)
    assert codes.dtype == np.int32 and len(codes) == vq.frames_for(len(x) / 8000)
    assert codes.min() >= 0 and codes.max() < vq.size == 128
    again = LogMelVQ.from_bytes(vq.to_bytes())
    assert np.array_equal(again.encode(x), codes) and again.to_bytes() == vq.to_bytes()
    assert np.array_equal(vq.decode(codes), vq.decode(codes))  # Griffin-Lim's phase is seeded
    with pytest.raises(ValueError, match="not an audio tokenizer"):
        from nmm.tokenizers.image import PatchVQ

        LogMelVQ.from_bytes(PatchVQ(np.zeros((4, 4), np.float32), 2, (4, 4, 1)).to_bytes())


def test_round_trip_keeps_the_digit_the_judge_hears(fitted):
    vq, judge, train, _ = fitted
    pick = np.arange(0, len(train), 18)  # 100 training-voice recordings, every digit
    real = judge.accuracy([train.waves[i] for i in pick], train.labels[pick])
    trip = judge.accuracy([vq.decode(vq.encode(train.waves[i])) for i in pick], train.labels[pick])
    assert real == 1.0  # the judge has seen these very recordings
    assert trip >= 0.8, trip  # 10 digits: chance is 0.1


def test_judge_hears_an_unseen_voice_better_than_chance_and_nothing_in_silence(fitted):
    _, judge, _, held = fitted
    assert judge.accuracy(held.waves[::5], held.labels[::5]) > 0.4
    assert judge.predict([np.zeros(0, np.float32), np.zeros(800, np.float32)]).tolist() == [-1, -1]


def test_vocabulary_gets_an_audio_block_and_keeps_image_only_layouts():
    v = SharedVocab(text_size=160, image_size=32)
    assert v.size == len(SPECIALS) + 160 + 32 and v.image_range() == (167, 199)  # as before audio existed
    assert v.manifest() == {"text_size": 160, "image_size": 32} and "audio" not in v.ranges()
    a = SharedVocab(text_size=100, image_size=32, audio_size=512)
    assert list(a.ranges()) == ["text", "audio", "image"]
    boa, eoa = a.markers("audio")
    assert (boa, eoa) == (107, 108) and a.range("audio") == (109, 621) and a.image_range() == (621, 653)
    assert a.markers("image") == (BOI, EOI) and a.size == 653  # image codes stay last (factored codes)
    assert a.local("audio", a.ids("audio", [0, 511])) == [0, 511]
    assert SharedVocab(**a.manifest()) == a
    with pytest.raises(KeyError, match="has \\['text', 'image'\\]"):
        v.range("audio")


def test_every_modality_part_resolves():
    for m in modalities.MODALITIES.values():
        for target in (m.tokenizer, m.decode, m.judge):
            if target:
                assert callable(resolve(target)), (m.name, target)
    with pytest.raises(ValueError, match="modality: expected one of"):
        modalities.modality("smell")


def test_audio_rows_and_an_image_only_pipelines_texts_unchanged():
    from nmm.data.sequences import AUDIO_INSTRUCTIONS, INSTRUCTIONS, Prompts, instruction_texts
    from nmm.tokenizers.vocab import ASSISTANT, BOS, EOS, USER

    enc = lambda t: [ord(c) % 50 for c in t]
    image_only = Prompts.of(SharedVocab(60, 16), "instruct", enc)
    assert set(image_only.instructions) == set(INSTRUCTIONS)  # the text tokenizer's corpus as before
    assert not set(instruction_texts(100)) & {t for ts in AUDIO_INSTRUCTIONS.values() for t in ts}
    assert set(instruction_texts(100, audio=True)) >= set(AUDIO_INSTRUCTIONS["say"])

    v = SharedVocab(60, 0, audio_size=32)
    boa, eoa = v.markers("audio")
    p = Prompts.of(v, "plain", enc)
    tokens, mask = p.audio_row([3, 4], [1, 2], "m2t")
    assert tokens == [BOS, boa, *v.ids("audio", [3, 4]), eoa, *v.text_ids([1, 2]), EOS]
    assert mask == [0, 0, 0, 0, 0, 1, 1, 1]
    tokens, mask = p.audio_row([3, 4], [1, 2], "m2g")
    assert tokens == [BOS, *v.text_ids([1, 2]), boa, *v.ids("audio", [3, 4]), eoa]
    assert mask == [0, 0, 0, 0, 1, 1, 1]  # the model writes the codes and <eoa>
    said = Prompts.of(v, "instruct", enc).say([1])
    assert said[:2] == [BOS, USER] and said[-2:] == [ASSISTANT, boa]


def test_a_recording_shorter_than_a_frame_still_encodes(fitted):
    vq = fitted[0]
    codes = vq.encode(np.full(100, 0.1, np.float32))
    assert len(codes) == vq.frames_for(100 / 8000) == 1 + 512 // 128


def test_the_listening_page_holds_each_clip_its_spectrogram_and_its_escaped_caption():
    import base64
    import html.parser

    from nmm.evaluate.listening import MAX_SECONDS, Clip, page

    rate = 8000
    t = np.arange(rate, dtype=np.float32) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    long = np.tile(tone, 10)  # ten seconds: cut to MAX_SECONDS on the page
    doc = page(
        "Spoken digits <b>",
        {"7": [Clip(tone, "real: the judge hears 7"), Clip(long, "generated: <script>alert(1)</script>")]},
        rate,
    )

    class Tags(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.found, self.text = [], []

        def handle_starttag(self, tag, attrs):
            self.found.append((tag, dict(attrs)))

        def handle_data(self, data):
            self.text.append(data)

    tags = Tags()
    tags.feed(doc)
    audio = [a["src"] for tag, a in tags.found if tag == "audio"]
    images = [a["src"] for tag, a in tags.found if tag == "img"]
    assert len(audio) == len(images) == 2 and "script" not in [tag for tag, _ in tags.found]
    assert "generated: <script>alert(1)</script>" in tags.text and "Spoken digits <b>" in tags.text
    first, _ = sf.read(io.BytesIO(base64.b64decode(audio[0].split(",", 1)[1])), dtype="float32")
    assert np.abs(first - tone).max() < 1e-4  # 16-bit PCM of the same samples
    second, _ = sf.read(io.BytesIO(base64.b64decode(audio[1].split(",", 1)[1])), dtype="float32")
    assert len(second) == int(MAX_SECONDS * rate)
    png = Image.open(io.BytesIO(base64.b64decode(images[0].split(",", 1)[1])))
    assert png.mode == "L" and png.size == (2 * (1 + rate // 128), 80)  # frames × 2, 40 mel bands × 2
