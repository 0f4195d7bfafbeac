"""Tokenizers saved as artifacts: text (BPE or bytes), image (patch VQ, or colour × mask pairs),
and the shared vocabulary."""

from nmm.tokenizers.image import ColourMaskVQ, ImageTokenizer, PatchVQ, load_image_tokenizer
from nmm.tokenizers.text import TextTokenizer
from nmm.tokenizers.vocab import SharedVocab

__all__ = ["ColourMaskVQ", "ImageTokenizer", "PatchVQ", "SharedVocab", "TextTokenizer", "load_image_tokenizer"]
