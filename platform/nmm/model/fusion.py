"""Image stems of mid and late fusion (architecture only).

- mid fusion: a light `MLP` from each patch's raw pixels into the backbone's width, trained end
  to end with the backbone, from its first layer.
- `PatchEncoder` + an `MLP` projector (late fusion, the non-native baseline): a small bidirectional
  transformer over patches, trained separately (denoising patch reconstruction, nmm.train.encoder)
  and frozen; a two-layer MLP (LLaVA-style) maps its features into the language model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nmm.model.config import ModelConfig


class MLP(nn.Module):
    """Two layers with a GELU between: mid fusion's patch stem (raw patch pixels → the backbone's
    width, trained end to end from the first layer) and late fusion's LLaVA-style projector
    (frozen encoder features → the LM's width)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class PatchEncoder(nn.Module):
    """A ViT-style encoder over an image's patches (learned positions, no causal mask)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.encoder_dim
        self.embed = nn.Linear(cfg.patch_dim, d)
        self.pos = nn.Parameter(torch.zeros(cfg.tokens_per_image, d))
        self.mask_token = nn.Parameter(torch.zeros(d))
        self.blocks = nn.ModuleList(EncoderBlock(d) for _ in range(cfg.encoder_layers))
        self.norm = nn.LayerNorm(d)
        self.decode = nn.Linear(d, cfg.patch_dim)  # used only while it is trained

    def forward(self, patches: torch.Tensor, hide: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(patches)
        if hide is not None:  # masked patch modelling: hidden patches become the mask token
            x = torch.where(hide[..., None], self.mask_token.expand_as(x), x)
        x = x + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def reconstruction_loss(self, patches: torch.Tensor, hide: torch.Tensor) -> torch.Tensor:
        """Denoising reconstruction of every patch, the hidden ones from context: the features
        of a visible patch must carry its own content (the LM later reads them all visible)."""
        return F.mse_loss(self.decode(self(patches, hide)), patches)


class LateStem(nn.Module):
    """Frozen encoder → standardised features → trainable projector. The standardisation (the
    encoder's mean and spread per position and feature on the train images, fixed once it is
    trained) removes what every image shares, mostly position, so the projector starts from
    the content: without it the content was a tenth of the features and the LM ignored it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.encoder = PatchEncoder(cfg)
        self.projector = MLP(cfg.encoder_dim, cfg.dim)
        self.register_buffer("feature_mean", torch.zeros(cfg.tokens_per_image, cfg.encoder_dim))
        self.register_buffer("feature_std", torch.ones(cfg.tokens_per_image, cfg.encoder_dim))

    def freeze_encoder(self) -> None:
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()

    @torch.no_grad()
    def calibrate(self, patches: torch.Tensor, batch: int = 512) -> None:
        feats = torch.cat([self.encoder(patches[i : i + batch]) for i in range(0, len(patches), batch)])
        self.feature_mean.copy_(feats.mean(0))
        self.feature_std.copy_(feats.std(0).clamp(min=1e-4))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        frozen = not any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            features = (self.encoder(patches) - self.feature_mean) / self.feature_std
        return self.projector(features)


def build_stem(cfg: ModelConfig) -> nn.Module | None:
    if cfg.fusion == "mid":
        return MLP(cfg.patch_dim, cfg.dim)
    if cfg.fusion == "late":
        return LateStem(cfg)
    return None
