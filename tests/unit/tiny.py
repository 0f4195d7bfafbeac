"""The tiny model and mixture the model, loss and trainer tests share."""

import torch

from nmm.model import ModelConfig
from nmm.train.distributed import DistInfo

MIX = {"m2t": 0.5, "m2g": 0.5}  # equal shares of M2T and M2G rows

CPU = DistInfo(0, 0, 1, torch.device("cpu"))


def tiny(vocab=40, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, dim=32, layers=2, heads=2, max_seq_len=16, **kw)
