"""Typed config of the early-fusion transformer, with `build()`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int
    dim: int = 128
    layers: int = 4
    heads: int = 4
    max_seq_len: int = 64
    dropout: float = 0.0
    qk_norm: bool = True
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def ffn_dim(self) -> int:
        # SwiGLU: 2/3 of 4*dim, rounded up to a multiple of 32 (Llama).
        hidden = int(2 * 4 * self.dim / 3)
        return 32 * ((hidden + 31) // 32)

    def build(self):
        from nmm.model.transformer import Transformer

        return Transformer(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls(**json.loads(text))
