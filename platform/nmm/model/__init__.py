"""The native multimodal model: config, transformer (architecture only), generation."""

from nmm.model.config import ModelConfig
from nmm.model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer"]
