"""The trainer: the schedule, batches, exact resume after SIGTERM (R15, R18), checkpoints (R14, R16)."""

import os
import signal

import numpy as np
import pytest
import torch

from nmm.train import checkpoint
from nmm.train.batches import TrainData, batch_indices
from nmm.train.schedule import lr_at
from nmm.train.trainer import PhaseConfig, Preempted, TrainConfig, train
from tests.unit.tiny import CPU, MIX, tiny


def test_lr_warms_up_then_decays_to_ten_percent():
    p = PhaseConfig(mixture=MIX, name="p", steps=100, batch_size=4, lr=1.0, warmup_steps=10)
    assert lr_at(p, 0) == pytest.approx(0.1)
    assert lr_at(p, 9) == pytest.approx(1.0)
    assert lr_at(p, 99) == pytest.approx(0.1, abs=0.01)


def test_batches_are_a_pure_function_of_seed_and_step_and_follow_the_mixture():
    rows = {"m2t": np.arange(0, 50), "m2g": np.arange(50, 100)}
    p = PhaseConfig(name="p", steps=10, batch_size=20, lr=1e-3, mixture={"m2t": 0.75, "m2g": 0.25})
    a, b = batch_indices(rows, p, 0, 3), batch_indices(rows, p, 0, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, batch_indices(rows, p, 0, 4))
    assert (a < 50).sum() == 15


def _data(n=64, length=12, vocab=40):
    g = np.random.default_rng(0)
    tokens = g.integers(5, vocab, (n, length)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=np.uint8)
    mask[:, :3] = 0
    task = (np.arange(n) % 2).astype(np.int8)
    return tokens, mask, task


def _cfg(steps, interval=1000):
    return TrainConfig(
        model=tiny(dropout=0.1),
        phases=(
            PhaseConfig(mixture=MIX, name="a", steps=steps // 2, batch_size=8, lr=3e-3, warmup_steps=2),
            PhaseConfig(mixture=MIX, name="b", steps=steps - steps // 2, batch_size=8, lr=1e-3),
        ),
        seed=3,
        checkpoint_interval=interval,
        keep_latest=2,
        log_every=1,
    )


def test_sigterm_checkpoints_and_resume_matches_uninterrupted_training_bitwise_r15_r18(tmp_path):
    tokens, mask, task = _data()
    data = TrainData(tokens=tokens, loss_mask=mask, task=task, image_range=(30, 40))
    straight, _ = train(_cfg(12), data, CPU, (tmp_path / "a").as_uri(), lambda m, s: None)
    # Same config, interrupted: SIGTERM arrives at step 10 (inside phase b), the trainer
    # checkpoints and stops; a fresh call resumes from that checkpoint.
    root = (tmp_path / "b").as_uri()

    def kill_at_ten(metrics, step):
        if step == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
        train(_cfg(12), data, CPU, root, kill_at_ten)
    resumed, summary = train(_cfg(12), data, CPU, root, lambda m, s: None)
    assert summary["resumed_from"] == 10
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_checkpoint_without_manifest_is_never_loaded_and_old_ones_go_after_commit_r14_r16(tmp_path):
    root = (tmp_path / "ck").as_uri()
    for step in (1, 2, 3):
        checkpoint.save(root, step, {"w": torch.full((2,), float(step))}, keep_latest=2)
    assert not (tmp_path / "ck" / "step-00000001" / "manifest.json").exists()
    step, state = checkpoint.load_latest(root)
    assert step == 3 and state["w"][0].item() == 3.0
    # A crash after the data but before the manifest of step 3: step 3 must not load.
    (tmp_path / "ck" / "step-00000003" / "manifest.json").unlink()
    step, state = checkpoint.load_latest(root)
    assert step == 2
