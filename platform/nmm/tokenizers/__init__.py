"""Tokenizers saved as artifacts: text (BPE or bytes), image (patch VQ), and the shared vocabulary."""

from nmm.tokenizers.image import PatchVQ
from nmm.tokenizers.text import TextTokenizer
from nmm.tokenizers.vocab import SharedVocab

__all__ = ["PatchVQ", "SharedVocab", "TextTokenizer"]
