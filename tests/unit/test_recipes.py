"""Training recipes: pretrain (every token), sft (answers only), opd (on-policy distillation
against an earlier phase's weights, reverse KL), each resumable bitwise."""

import os
import signal

import numpy as np
import pytest
import torch

from nmm.model import ModelConfig
from nmm.tokenizers.vocab import BOI, BOS, EOI, EOS, PAD
from nmm.train.batches import TrainData, rows_by_phase, trim
from nmm.train.distributed import DistInfo
from nmm.train.loss import reverse_kl_loss
from nmm.train.recipes import OpdOptions
from nmm.train.recipes.common import pretrain_mask, student_samples
from nmm.train.trainer import PhaseConfig, Preempted, TrainConfig, train

MIX = {"m2t": 0.5, "m2g": 0.5}  # equal shares of M2T and M2G rows

CPU = DistInfo(0, 0, 1, torch.device("cpu"))
TEXT, IMAGE = (5, 30), (30, 40)


def model_cfg(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=40, dim=32, layers=2, heads=2, max_seq_len=16, **kw)


def data(n: int = 32):
    """Half M2T rows (<bos><boi> 4 codes <eoi> 4 words <eos>), half M2G rows (the reverse)."""
    g = np.random.default_rng(0)
    tokens, mask = [], []
    for i in range(n):
        img, txt = g.integers(*IMAGE, 4).tolist(), g.integers(*TEXT, 4).tolist()
        if i % 2 == 0:
            tokens.append([BOS, BOI, *img, EOI, *txt, EOS])
            mask.append([0] * 7 + [1] * 5)
        else:
            tokens.append([BOS, *txt, BOI, *img, EOI, PAD])
            mask.append([0] * 6 + [1] * 5 + [0])
    return np.array(tokens, np.int32), np.array(mask, np.uint8), (np.arange(n) % 2).astype(np.int8)


def train_data(n: int = 32) -> TrainData:
    tokens, mask, task = data(n)
    return TrainData(tokens=tokens, loss_mask=mask, task=task, image_range=IMAGE, text_range=TEXT)


def test_pretrain_learns_every_token_but_padding_and_pixel_positions():
    x = torch.tensor(data(2)[0], dtype=torch.long)
    assert torch.equal(pretrain_mask(x, model_cfg()), (x != PAD).long())
    mid = model_cfg(fusion="mid", image_lo=IMAGE[0], image_hi=IMAGE[1], patch_dim=4, tokens_per_image=4)
    m = pretrain_mask(x, mid)
    assert m[0, 2:6].sum() == 0 and m[0, 7:].sum() == 5  # pixels are inputs, not targets


def test_pretrain_reads_the_plain_rows_and_sft_and_opd_the_instruction_rows():
    task = np.array([0, 1, 0, 1, 0, 1, 0, 1], np.int8)
    style = np.array([0, 0, 0, 0, 1, 1, 1, 1], np.int8)  # STYLES: plain, instruct
    phases = (
        PhaseConfig(mixture=MIX, name="pt", steps=1, batch_size=2, lr=1e-3),
        PhaseConfig(mixture=MIX, name="sft", steps=1, batch_size=2, lr=1e-3, recipe="sft"),
        PhaseConfig(
            name="opd",
            steps=1,
            batch_size=2,
            lr=1e-3,
            recipe="opd",
            options=OpdOptions(teacher="sft"),
            mixture={"m2t": 1.0},
        ),
    )
    pools = rows_by_phase(task, style, phases)
    assert pools["pt"]["m2t"].tolist() == [0, 2] and pools["pt"]["m2g"].tolist() == [1, 3]
    assert pools["sft"]["m2t"].tolist() == [4, 6] and pools["opd"]["m2g"].tolist() == [5, 7]
    assert rows_by_phase(task, None, phases)["sft"]["m2t"].tolist() == [0, 2, 4, 6]  # one layout: all rows
    with pytest.raises(ValueError, match="phase sft: no instruct rows"):
        rows_by_phase(task[:4], style[:4], phases)


def test_trim_drops_the_padding_columns_after_every_row_but_not_inside_one():
    x = torch.tensor([[BOS, 7, PAD, PAD, 8, PAD, PAD], [BOS, 9, 9, PAD, PAD, PAD, PAD]])
    t, m = trim(x, torch.ones_like(x))
    assert torch.equal(t, x[:, :5]) and m.shape == t.shape


def test_student_samples_keep_the_prompt_and_mark_only_what_was_sampled():
    torch.manual_seed(0)
    model = model_cfg().build()
    tokens, mask, _ = data(4)
    x, m = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    seqs, sampled = student_samples(model, x, m, None, IMAGE, TEXT, 1.0)
    for i in range(4):
        first = int(m[i].argmax())
        assert torch.equal(seqs[i, :first], x[i, :first])
        assert sampled[i, :first].sum() == 0
        picked = seqs[i][sampled[i] == 1]
        if i % 2 == 0:  # captions: text tokens, perhaps an <eos>
            assert all(TEXT[0] <= t < TEXT[1] or t == EOS for t in picked.tolist())
        else:  # images: exactly four codes, then a forced (not sampled) <eoi>
            assert len(picked) == 4 and all(IMAGE[0] <= t < IMAGE[1] for t in picked.tolist())
            assert seqs[i, first + 4] == EOI and sampled[i, first + 4] == 0


def test_reverse_kl_is_zero_against_itself_and_positive_otherwise():
    logits = torch.randn(2, 6, 40)
    tokens = torch.randint(5, 40, (2, 6))
    sampled = torch.tensor([[0, 0, 1, 1, 1, 0]] * 2)
    same, _ = reverse_kl_loss(logits, logits, tokens, sampled, {"image": IMAGE})
    other, parts = reverse_kl_loss(logits, torch.randn(2, 6, 40), tokens, sampled, {"image": IMAGE})
    assert same.item() == pytest.approx(0.0, abs=1e-6) and other.item() > 0.1
    assert parts["tokens_text"] + parts["tokens_image"] == 6


def opd_cfg(**model) -> TrainConfig:
    return TrainConfig(
        model=model_cfg(**model),
        phases=(
            PhaseConfig(mixture=MIX, name="teach", steps=20, batch_size=8, lr=1e-2, recipe="pretrain"),
            PhaseConfig(name="drift", steps=6, batch_size=8, lr=3e-2, recipe="sft", mixture={"m2t": 1.0}),
            PhaseConfig(
                mixture=MIX,
                name="distil",
                steps=16,
                batch_size=8,
                lr=3e-3,
                recipe="opd",
                options=OpdOptions(teacher="teach"),
            ),
        ),
        seed=1,
        checkpoint_interval=1000,
        log_every=1,
    )


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_opd_pulls_the_student_back_towards_its_teacher(tmp_path, attention):
    seen = {}
    model = dict(image_lo=IMAGE[0], image_hi=IMAGE[1], tokens_per_image=4, image_attention=attention)
    train(opd_cfg(**model), train_data(), CPU, tmp_path.as_uri(), lambda m, s: seen.update({s: m["train/loss"]}))
    kl = [seen[s] for s in range(27, 43)]  # the opd phase: steps 27..42
    assert kl[0] > 0.01
    assert np.mean(kl[-4:]) < 0.5 * np.mean(kl[:4])


def test_opd_resumes_bitwise_with_its_teacher_from_the_checkpoint(tmp_path):
    straight, _ = train(opd_cfg(), train_data(), CPU, (tmp_path / "a").as_uri(), lambda m, s: None)
    root = (tmp_path / "b").as_uri()

    def kill_inside_opd(metrics, step):
        if step == 30:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
        train(opd_cfg(), train_data(), CPU, root, kill_inside_opd)
    resumed, summary = train(opd_cfg(), train_data(), CPU, root, lambda m, s: None)
    assert summary["resumed_from"] == 30
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
