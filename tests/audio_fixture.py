"""A small model that hears and speaks spoken digits, trained here: one speaker's takes 0 and 1
of each digit (20 recordings), learnt by heart in a few hundred steps on this CPU. What the audio
tests of the model and of `nmm serve` share; it shows the audio path works end to end, not how
well an unseen voice is understood (benchmarks/ has that)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from nmm.data.sequences import Prompts, pack_rows
from nmm.data.sources import DIGIT_WORDS
from nmm.data.speech import load_spoken_digits
from nmm.evaluate.speech import DigitJudge
from nmm.model import ModelConfig
from nmm.tokenizers.audio import LogMelVQ
from nmm.tokenizers.text import TextTokenizer
from nmm.tokenizers.vocab import SharedVocab
from nmm.train.batches import TrainData
from nmm.train.distributed import DistInfo
from nmm.train.trainer import PhaseConfig, TrainConfig, train

CPU = DistInfo(0, 0, 1, torch.device("cpu"))
SPEAKER = "jackson"
MAX_CODES = 40  # a recording's codes in training (FSDD's are 0.14-1.31 s: 10-82 codes)


@dataclass
class Hearing:
    model: torch.nn.Module
    vq: LogMelVQ
    text: TextTokenizer
    vocab: SharedVocab
    prompts: Prompts
    waves: list[np.ndarray]  # the recordings it learnt, at vq.rate
    labels: np.ndarray
    codes: list[np.ndarray]  # each recording's codes, as trained
    judge: DigitJudge  # fitted on the speaker's real recordings (never on the model's)
    summary: dict  # the trainer's


def train_small_audio_model(checkpoints_uri: str) -> Hearing:
    rec = load_spoken_digits()
    speaker = [i for i, s in enumerate(rec.speakers) if s == SPEAKER]
    judge = DigitJudge(rec.rate).fit([rec.waves[i] for i in speaker], rec.labels[speaker])
    pick = [i for i in speaker if int(rec.names[i].split("_")[2][:-4]) < 2]  # takes 0 and 1 of each digit
    waves, labels = [rec.waves[i] for i in pick], rec.labels[pick]
    vq = LogMelVQ.fit(waves, rec.rate, codebook_size=64, seed=0)
    text = TextTokenizer.train("byte", [], 256)
    vocab = SharedVocab(text_size=text.size, image_size=0, audio_size=vq.size)
    prompts = Prompts.of(vocab, "plain", text.encode)
    codes = [vq.encode(w)[:MAX_CODES] for w in waves]
    words = [text.encode(DIGIT_WORDS[int(y)]) for y in labels]
    rows = [prompts.audio_row(c, t, task) for c, t in zip(codes, words) for task in ("m2t", "m2g")]
    tokens, mask = pack_rows(rows)
    model_cfg = ModelConfig(vocab_size=vocab.size, dim=96, layers=2, heads=4, max_seq_len=tokens.shape[1] + 8)
    torch.manual_seed(0)
    cfg = TrainConfig(
        model=model_cfg,
        phases=(
            PhaseConfig(
                name="sft", steps=250, batch_size=20, lr=3e-3, warmup_steps=20, mixture={"m2t": 0.5, "m2g": 0.5}
            ),
        ),
        checkpoint_interval=10_000,
    )
    data = TrainData(
        tokens=tokens,
        loss_mask=mask,
        task=np.tile([0, 1], len(pick)).astype(np.int8),
        image_range=vocab.image_range(),
        code_ranges=vocab.code_ranges(),
    )
    model, summary = train(cfg, data, CPU, checkpoints_uri, lambda *_: None)
    model.eval()
    return Hearing(model, vq, text, vocab, prompts, waves, labels, codes, judge, summary)


def audio_model_files(h: Hearing) -> dict[str, bytes]:
    """The model as a published folder's files: it transcribes and speaks, nothing else."""
    from nmm.serve.model_dir import model_files

    config = {
        "model": json.loads(h.model.cfg.to_json()),
        "vocab": h.vocab.manifest(),
        "source": "spoken-digits",
        "prompts": "plain",
        "serves": {"transcribe": True, "speak": True},
    }
    return model_files(h.model, config, {"text": h.text.to_bytes(), "audio": h.vq.to_bytes()})
