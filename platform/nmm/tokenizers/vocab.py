"""The one shared vocabulary of an early-fusion model: an ordered set of ranges, one per modality.

    specials | text | <boa> <eoa> audio codes | image codes

The specials (SPECIALS) come first and hold the image's span markers <boi>/<eoi>; a modality added
since brings its own two markers at the start of its block (audio: <boa>/<eoa>), so a vocabulary
without it is the same, id for id, as before it existed. Image codes stay last: factored image codes
(the colour-mask tokenizer's pairs) are the vocabulary's last ids (nmm.model.transformer.FactorCodes).
`ranges()` gives each present modality's code range by name (text included), `markers(name)` its
span markers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

SPECIALS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<user>", "<assistant>")
PAD, BOS, EOS, BOI, EOI, USER, ASSISTANT = range(len(SPECIALS))  # <user>/<assistant>: instruction turns
ORDER = ("text", "audio", "image")  # the blocks, in vocabulary order
OWN_MARKERS = {"audio": ("<boa>", "<eoa>")}  # markers a modality's block starts with


@dataclass(frozen=True)
class SharedVocab:
    text_size: int
    image_size: int
    audio_size: int = 0  # 0: no audio block (and no <boa>/<eoa>)

    def sizes(self) -> dict[str, int]:
        """Each modality's number of codes, in vocabulary order; absent ones (size 0, never text) left out."""
        sizes = {"text": self.text_size, "audio": self.audio_size, "image": self.image_size}
        return {m: sizes[m] for m in ORDER if sizes[m] or m == "text"}

    @cached_property
    def _blocks(self) -> dict[str, tuple[int, int, int]]:
        """name -> (block start: its markers, codes start, codes end); computed once per vocabulary
        (text_ids and image_ids run for every row curate builds)."""
        at, out = len(SPECIALS), {}
        for m, n in self.sizes().items():
            own = len(OWN_MARKERS.get(m, ()))
            out[m] = (at, at + own, at + own + n)
            at += own + n
        return out

    def ranges(self) -> dict[str, tuple[int, int]]:
        """Each present modality's codes as [lo, hi) of the shared ids, in vocabulary order."""
        return {m: (lo, hi) for m, (_, lo, hi) in self._blocks.items()}

    def code_ranges(self) -> dict[str, tuple[int, int]]:
        """`ranges()` without text: each other modality's codes (what the loss splits targets by)."""
        return {m: r for m, r in self.ranges().items() if m != "text"}

    def range(self, modality: str) -> tuple[int, int]:
        ranges = self.ranges()
        if modality not in ranges:
            raise KeyError(f"modality {modality!r} is not in this vocabulary; it has {list(ranges)}")
        return ranges[modality]

    def markers(self, modality: str) -> tuple[int, int]:
        """The ids that open and close a span of `modality` (image: <boi>, <eoi>)."""
        if modality == "image":
            return BOI, EOI
        if modality not in OWN_MARKERS:
            raise KeyError(f"modality {modality!r} has no span markers")
        start = self._blocks[modality][0]
        return start, start + 1

    def ids(self, modality: str, codes):
        """A modality's local codes (numpy array or list) as shared ids."""
        lo = self.range(modality)[0]
        return codes + lo if hasattr(codes, "dtype") else [lo + int(c) for c in codes]

    def local(self, modality: str, ids) -> list[int]:
        """The inverse of `ids`."""
        lo = self.range(modality)[0]
        return [int(i) - lo for i in ids]

    @property
    def text_offset(self) -> int:
        return self.range("text")[0]

    @property
    def image_offset(self) -> int:
        return self.range("image")[0] if self.image_size else self.size

    @property
    def size(self) -> int:
        return max(hi for _, _, hi in self._blocks.values())

    def text_ids(self, local: list[int]) -> list[int]:
        return [self.text_offset + i for i in local]

    def text_local(self, ids) -> list[int]:
        """The inverse of `text_ids`: shared ids of text tokens → the text tokenizer's own ids."""
        return [i - self.text_offset for i in ids]

    def image_ids(self, codes):
        return codes + self.image_offset

    def text_range(self) -> tuple[int, int]:
        return self.range("text")

    def image_range(self) -> tuple[int, int]:
        return (self.image_offset, self.size) if self.image_size else (self.size, self.size)

    def manifest(self) -> dict[str, int]:
        """What a dataset's manifest records (`SharedVocab(**manifest["vocab"])` reads it back);
        an image-only vocabulary writes what it wrote before audio existed."""
        out = {"text_size": self.text_size, "image_size": self.image_size}
        return out | ({"audio_size": self.audio_size} if self.audio_size else {})


def blank_text(prompt: list[int], text_range: tuple[int, int]) -> list[int]:
    """The prompt with its text (caption and instruction: the ids in `text_range`, the shared
    vocabulary's) padded out, positions kept: the unconditional twin of classifier-free
    guidance, as caption dropout trains it."""
    lo, hi = text_range
    return [PAD if lo <= t < hi else t for t in prompt]
