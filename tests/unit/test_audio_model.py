"""One transformer hears and speaks: real recordings' log-mel codes inside <boa> … <eoa> in the
shared vocabulary, trained by nmm's trainer on M2T (what is said) and M2G (say it) rows; the
model's answers read back as digits, its speech decoded by Griffin-Lim and heard by the
independent judge. Small enough to learn by heart on this CPU: this shows the audio path works
end to end through the model, not how well an unseen voice is understood (benchmarks/ has that)."""

from __future__ import annotations

import numpy as np

from nmm.data.sources import DIGIT_WORDS, parse_digit
from nmm.model.generate import generate, speak
from nmm.tokenizers.vocab import EOS
from tests.audio_fixture import MAX_CODES


def test_one_model_hears_and_speaks_spoken_digits(hearing):
    h = hearing
    model, vocab, prompts, text, vq = h.model, h.vocab, h.prompts, h.text, h.vq
    # the trainer counted audio targets as audio, by name (M2G rows' codes and <eoa> are targets)
    assert h.summary["tokens_audio"] > 0 and h.summary["tokens_text"] > 0 and "tokens_image" not in h.summary

    # hear: each recording's prompt, answered in text
    heard = generate(model, [prompts.listen(c) for c in h.codes], 8, vocab.text_range(), stop=EOS, extra_allowed=(EOS,))
    said = [parse_digit(text.decode(vocab.text_local([t for t in x if t != EOS]))) for x in heard]
    assert np.mean(np.array(said) == h.labels) >= 0.9, said

    # speak: one prompt per digit; codes and <eoa> only, ended by the model
    asks = [prompts.say(text.encode(w)) for w in DIGIT_WORDS]
    spoken = speak(model, asks, vocab, max_codes=MAX_CODES + 8)
    assert all(0 < len(c) < MAX_CODES + 8 for c in spoken), [len(c) for c in spoken]  # the model wrote <eoa>
    assert all(c.min() >= 0 and c.max() < vq.size for c in spoken)
    verdict = h.judge.predict([vq.decode(c) for c in spoken])
    assert np.mean(verdict == np.arange(10)) >= 0.7, verdict
