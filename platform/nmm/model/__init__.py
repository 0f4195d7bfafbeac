"""The native multimodal model: config, transformer (architecture only), generation.

`ModelConfig` needs no torch (the compiler and the operator read a model's shape from it);
`Transformer` imports torch when first asked for."""

from nmm.model.config import ModelConfig

__all__ = ["ModelConfig", "Transformer"]


def __getattr__(name: str):
    if name == "Transformer":
        from nmm.model.transformer import Transformer

        return Transformer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
