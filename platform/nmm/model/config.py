"""Typed config of the native multimodal transformer, with `build()`.

fusion: `early` — image codes are tokens of the one shared vocabulary; `mid` — a patch-projection
stem puts continuous patch embeddings at the image positions from the first layer; `late` — a
separately trained, frozen patch encoder plus a projector does (the non-native baseline).
image_attention: `causal` — every position sees only the past; `bidirectional` — the positions of
an input image (one the caller marks in `spans`) also see the rest of that image (Transfusion).
image_positions: `sequence` — an image token's only position is its place in the sequence (1-D
RoPE, as Chameleon); `grid` — each image position also gets a learned embedding of its row and one
of its column in the image's patch grid, so where a patch sits in the picture is given, not
worked out from the sequence position modulo the grid's width.
"""

from __future__ import annotations

import json
import math
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
    fusion: str = "early"
    image_attention: str = "causal"
    image_positions: str = "sequence"
    # mid and late fusion: image positions are the ids in [image_lo, image_hi) of the sequence;
    # the stem reads raw patches of patch_dim pixels each, tokens_per_image per image.
    image_lo: int = 0
    image_hi: int = 0
    patch_dim: int = 0
    tokens_per_image: int = 0
    # late fusion: the separately trained encoder
    encoder_dim: int = 64
    encoder_layers: int = 2
    # image codes that are tuples of factor codes (the colour-mask tokenizer's (colours, masks)):
    # the vocabulary's last prod(image_factors) ids, embedded and predicted factor by factor
    # (nmm.model.transformer.FactorCodes). Empty: one row per code.
    image_factors: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "image_factors", tuple(self.image_factors))  # a list from JSON
        if self.factored_codes > self.vocab_size:
            raise ValueError(
                f"image_factors {self.image_factors} make more codes than the vocabulary's {self.vocab_size} ids"
            )

    @property
    def factored_codes(self) -> int:
        return math.prod(self.image_factors) if self.image_factors else 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def ffn_dim(self) -> int:
        # SwiGLU: 2/3 of 4*dim, rounded up to a multiple of 32 (Llama).
        hidden = int(2 * 4 * self.dim / 3)
        return 32 * ((hidden + 31) // 32)

    @property
    def grid_side(self) -> int:
        """The image's patch grid is grid_side × grid_side (square images)."""
        return math.isqrt(self.tokens_per_image)

    @property
    def image_range(self) -> tuple[int, int]:
        return self.image_lo, self.image_hi

    @property
    def reads_pixels(self) -> bool:
        return self.fusion in ("mid", "late")

    def build(self):
        from nmm.model.transformer import Transformer

        return Transformer(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls(**json.loads(text))
