"""A training process for the kill -9 test: trains the tiny config, saves the final weights.

python -m tests.integration.resume_worker ROOT_URI OUT_FILE [--slow]
"""

import sys
import time

import numpy as np
import torch

from nmm.model import ModelConfig
from nmm.train.batches import TrainData
from nmm.train.distributed import DistInfo
from nmm.train.trainer import PhaseConfig, TrainConfig, train

MIX = {"m2t": 0.5, "m2g": 0.5}  # equal shares of M2T and M2G rows


def config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(vocab_size=40, dim=32, layers=2, heads=2, max_seq_len=16, dropout=0.1),
        phases=(
            PhaseConfig(mixture=MIX, name="a", steps=12, batch_size=8, lr=3e-3, warmup_steps=2),
            PhaseConfig(mixture=MIX, name="b", steps=12, batch_size=8, lr=1e-3),
        ),
        seed=5,
        checkpoint_interval=4,
        keep_latest=2,
        log_every=1,
    )


def data():
    g = np.random.default_rng(0)
    tokens = g.integers(5, 40, (64, 12)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=np.uint8)
    mask[:, :3] = 0
    return TrainData(tokens=tokens, loss_mask=mask, task=(np.arange(64) % 2).astype(np.int8), image_range=(30, 40))


if __name__ == "__main__":
    root, out = sys.argv[1], sys.argv[2]
    slow = "--slow" in sys.argv
    model, _ = train(
        config(),
        data(),
        DistInfo(0, 0, 1, torch.device("cpu")),
        root,
        lambda m, step: time.sleep(0.3) if slow else None,
    )
    torch.save(model.state_dict(), out)
