"""The one shared vocabulary of an early-fusion model: specials, then text, then image codes."""

from __future__ import annotations

from dataclasses import dataclass

SPECIALS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<user>", "<assistant>")
PAD, BOS, EOS, BOI, EOI, USER, ASSISTANT = range(len(SPECIALS))  # <user>/<assistant>: instruction turns


@dataclass(frozen=True)
class SharedVocab:
    text_size: int
    image_size: int

    @property
    def text_offset(self) -> int:
        return len(SPECIALS)

    @property
    def image_offset(self) -> int:
        return self.text_offset + self.text_size

    @property
    def size(self) -> int:
        return self.image_offset + self.image_size

    def text_ids(self, local: list[int]) -> list[int]:
        return [self.text_offset + i for i in local]

    def text_local(self, ids) -> list[int]:
        """The inverse of `text_ids`: shared ids of text tokens → the text tokenizer's own ids."""
        return [i - self.text_offset for i in ids]

    def image_ids(self, codes):
        return codes + self.image_offset

    def text_range(self) -> tuple[int, int]:
        return self.text_offset, self.image_offset

    def image_range(self) -> tuple[int, int]:
        return self.image_offset, self.size


def blank_text(prompt: list[int], text_range: tuple[int, int]) -> list[int]:
    """The prompt with its text (caption and instruction: the ids in `text_range`, the shared
    vocabulary's) padded out, positions kept: the unconditional twin of classifier-free
    guidance, as caption dropout trains it."""
    lo, hi = text_range
    return [PAD if lo <= t < hi else t for t in prompt]
