"""Token sequences of the two tasks in one shared vocabulary, with their loss masks, in two
prompt styles.

`plain` (what pretraining reads: the data's own layout)
    M2T (image → caption):  <bos> <boi> c1 … cP <eoi> t1 … tn <eos>          loss on t1 … <eos>
    M2G (caption → image):  <bos> t1 … tn <boi> c1 … cP <eoi>                loss on c1 … <eoi>
    VQA (an M2T task):      <bos> <boi> c1 … cP <eoi> q1 … qm a1 … ak <eos>  loss on a1 … <eos>

`instruct` (what sft and opd read, and what a model finished by them is prompted with): a user
turn holding an instruction, then the assistant's turn holding the answer.
    M2T:  <bos> <user> "Describe the image." <boi> c1 … cP <eoi> <assistant> t1 … tn <eos>
    M2G:  <bos> <user> "Draw:" t1 … tn <assistant> <boi> c1 … cP <eoi>
    VQA:  <bos> <user> <boi> c1 … cP <eoi> q1 … qm <assistant> a1 … ak <eos>

With drawing plans (data.drawPlans: layout) an M2G target starts with the scene's layout in
words, p1 … pk (nmm.data.shapes.layout), and the model writes <boi> itself:
    M2G:  <bos> t1 … tn p1 … pk <boi> c1 … cP <eoi>                         loss on p1 … <eoi>
    M2G:  <bos> <user> "Draw:" t1 … tn <assistant> p1 … pk <boi> c1 … cP <eoi>

Each instruction has paraphrases (INSTRUCTIONS); a row's pick is a pure function of its index.
The caption instruction comes before the image, so the image ends right before the answer as in
the plain layout (measured on the quickstart, seed 0: m2t 0.942 this way, 0.924 with the
instruction between image and answer); a VQA question comes after the image, as it does in plain.

Audio (a vocabulary with an audio block): a recording's codes sit inside <boa> … <eoa>, its
length the recording's; when speaking, the model writes <eoa> itself.
    M2T:  <bos> <boa> a1 … aK <eoa> t1 … tn <eos>                               loss on t1 … <eos>
    M2G:  <bos> t1 … tn <boa> a1 … aK <eoa>                                     loss on a1 … <eoa>
    M2T:  <bos> <user> "Transcribe:" <boa> a1 … aK <eoa> <assistant> t1 … tn <eos>
    M2G:  <bos> <user> "Say:" t1 … tn <assistant> <boa> a1 … aK <eoa>

`loss_mask[i] = 1` means token i is a training target (predicted from tokens < i).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from nmm.tokenizers.vocab import ASSISTANT, BOI, BOS, EOI, EOS, PAD, USER, SharedVocab

TASKS = ("m2t", "m2g")
STYLES = ("plain", "instruct")
INSTRUCTIONS = {
    "caption": ("Describe the image.", "What is shown?", "Caption this image."),
    "draw": ("Draw:", "Draw an image of", "Show me"),
}

# Audio's instructions (spoken-digits and other audio sources): kept apart from INSTRUCTIONS so a
# pipeline without audio trains its text tokenizer on exactly the texts it did before audio existed.
AUDIO_INSTRUCTIONS = {
    "transcribe": ("Transcribe:", "What is said?", "Write down what you hear."),
    "say": ("Say:", "Speak:", "Read aloud:"),
}

# What people write to ask for a caption beside the trained paraphrases (OpenAI's vision guide asks
# "What's in this image?"): each is laid out as the caption prompt, never as a question.
CAPTION_ASKS = (
    "describe this image",
    "what is in this image",
    "what is in the image",
    "whats in this image",
    "what does the image show",
    "what does this image show",
    "caption the image",
    "describe the picture",
)


def _plain_words(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


def caption_ask(text: str) -> int | None:
    """Which caption instruction `text` is (its paraphrase index; a caption ask that is no
    trained paraphrase is 0), or None when it asks something else."""
    words = _plain_words(text)
    trained = [_plain_words(t) for t in INSTRUCTIONS["caption"]]
    if words in trained:
        return trained.index(words)
    return 0 if words in CAPTION_ASKS else None


def instruction_texts(captions: int = 1, audio: bool = False) -> list[str]:
    """The instruction texts to add to a text tokenizer's corpus holding `captions` captions once
    each, in the proportion the rows use them: a caption is in len(TASKS) × len(STYLES) rows,
    a paraphrase of an instruction in one of every len(paraphrases) instruct rows of its task.
    (Weighted higher, the instructions take the merges the captions need: at 4× this weight a
    128-entry BPE over the digits' captions lost " 3", " 7", … as single tokens.)"""
    uses = len(TASKS) * len(STYLES)
    kinds = {**INSTRUCTIONS, **(AUDIO_INSTRUCTIONS if audio else {})}
    return [t for texts in kinds.values() for t in texts for _ in range(max(1, captions // (len(texts) * uses)))]


@dataclass(frozen=True)
class Prompts:
    """Prompts and training rows of one style over a shared vocabulary. Texts are local text
    ids (what the text tokenizer returns); images are code arrays."""

    vocab: SharedVocab
    style: str = "plain"
    instructions: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)  # local ids
    plans: bool = False  # a drawing starts with its plan in words, then <boi> (the model writes both)

    @classmethod
    def of(cls, vocab: SharedVocab, style: str, encode: Callable[[str], list[int]], plans: bool = False) -> Prompts:
        if style not in STYLES:
            raise ValueError(f"prompt style {style!r}: expected one of {', '.join(STYLES)}")
        kinds = {**INSTRUCTIONS, **(AUDIO_INSTRUCTIONS if vocab.audio_size else {})}
        instructions = {k: tuple(tuple(encode(t)) for t in texts) for k, texts in kinds.items()}
        return cls(vocab, style, instructions if style == "instruct" else {}, plans)

    def _instruction(self, kind: str, k: int) -> list[int]:
        options = self.instructions[kind]
        return self.vocab.text_ids(list(options[k % len(options)]))

    def _image(self, codes: np.ndarray) -> list[int]:
        return [BOI, *self.vocab.image_ids(np.asarray(codes)).tolist(), EOI]

    def caption(self, codes: np.ndarray, k: int = 0) -> list[int]:
        """The prompt asking for the image's caption (M2T); `k` picks the paraphrase."""
        if self.style == "plain":
            return [BOS, *self._image(codes)]
        return [BOS, USER, *self._instruction("caption", k), *self._image(codes), ASSISTANT]

    def question(self, codes: np.ndarray, question_local: list[int]) -> list[int]:
        """The prompt asking a question about the image (VQA)."""
        q = self.vocab.text_ids(question_local)
        if self.style == "plain":
            return [BOS, *self._image(codes), *q]
        return [BOS, USER, *self._image(codes), *q, ASSISTANT]

    def draw(self, text_local: list[int], k: int = 0) -> list[int]:
        """The prompt asking for an image of the caption (M2G), ending with <boi> — or, with
        plans, right before the plan the model writes (then <boi> is the model's to write)."""
        t = self.vocab.text_ids(text_local)
        opened = [] if self.plans else [BOI]
        if self.style == "plain":
            return [BOS, *t, *opened]
        return [BOS, USER, *self._instruction("draw", k), *t, ASSISTANT, *opened]

    def row(
        self, codes: np.ndarray, text_local: list[int], task: str, k: int = 0, plan_local: list[int] = ()
    ) -> tuple[list[int], list[int]]:
        """A training row of `task` (m2t: caption the image; m2g: draw the caption, after
        `plan_local`, the image's plan, when the prompts have plans)."""
        if task == "m2t":
            prompt, target = self.caption(codes, k), [*self.vocab.text_ids(text_local), EOS]
        else:
            image = [*self.vocab.image_ids(np.asarray(codes)).tolist(), EOI]
            plan = [*self.vocab.text_ids(list(plan_local)), BOI] if self.plans else []
            prompt, target = self.draw(text_local, k), plan + image
        return prompt + target, [0] * len(prompt) + [1] * len(target)

    def _audio(self, codes) -> list[int]:
        boa, eoa = self.vocab.markers("audio")
        return [boa, *self.vocab.ids("audio", list(codes)), eoa]

    def listen(self, codes, k: int = 0) -> list[int]:
        """The prompt asking what a recording says (M2T audio): its codes inside <boa> … <eoa>."""
        if self.style == "plain":
            return [BOS, *self._audio(codes)]
        return [BOS, USER, *self._instruction("transcribe", k), *self._audio(codes), ASSISTANT]

    def say(self, text_local: list[int], k: int = 0) -> list[int]:
        """The prompt asking for speech of the text (M2G audio), ending with <boa>: the model writes
        the codes and <eoa> (a recording's length is the model's to choose)."""
        t = self.vocab.text_ids(text_local)
        boa = self.vocab.markers("audio")[0]
        if self.style == "plain":
            return [BOS, *t, boa]
        return [BOS, USER, *self._instruction("say", k), *t, ASSISTANT, boa]

    def audio_row(self, codes, text_local: list[int], task: str, k: int = 0) -> tuple[list[int], list[int]]:
        """A training row over a recording: m2t (say what it says) or m2g (speak the text)."""
        if task == "m2t":
            prompt, target = self.listen(codes, k), [*self.vocab.text_ids(text_local), EOS]
        else:
            prompt = self.say(text_local, k)
            target = [*self.vocab.ids("audio", list(codes)), self.vocab.markers("audio")[1]]
        return prompt + target, [0] * len(prompt) + [1] * len(target)

    def vqa_row(
        self, codes: np.ndarray, question_local: list[int], answer_local: list[int]
    ) -> tuple[list[int], list[int]]:
        prompt = self.question(codes, question_local)
        target = [*self.vocab.text_ids(answer_local), EOS]
        return prompt + target, [0] * len(prompt) + [1] * len(target)


def pack_rows(rows: list[tuple[list[int], list[int]]], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad sequences into (N, L) token and mask arrays."""
    length = length or max(len(t) for t, _ in rows)
    tokens = np.full((len(rows), length), PAD, np.int32)
    mask = np.zeros((len(rows), length), np.uint8)
    for i, (t, m) in enumerate(rows):
        tokens[i, : len(t)] = t
        mask[i, : len(m)] = m
    return tokens, mask


def pack_documents(rows: list[tuple[list[int], list[int]]], length: int) -> dict[str, np.ndarray]:
    """Pack sequences end to end into rows of `length` tokens (first fit, in order), so short
    sequences stop wasting compute on padding. Returns tokens, loss_mask, docs (document id per
    token, -1 on padding) and positions (inside each document, for rotary embeddings)."""
    packed: list[list[int]] = []
    for i, (t, _) in enumerate(rows):
        if len(t) > length:
            raise ValueError(f"sequence {i} has {len(t)} tokens, more than a packed row ({length})")
        room = next((r for r in packed if sum(len(rows[j][0]) for j in r) + len(t) <= length), None)
        if room is None:
            packed.append([i])
        else:
            room.append(i)
    out = {
        "tokens": np.full((len(packed), length), PAD, np.int32),
        "loss_mask": np.zeros((len(packed), length), np.uint8),
        "docs": np.full((len(packed), length), -1, np.int32),
        "positions": np.zeros((len(packed), length), np.int64),
    }
    for r, members in enumerate(packed):
        at = 0
        for d, i in enumerate(members):
            t, m = rows[i]
            out["tokens"][r, at : at + len(t)] = t
            out["loss_mask"][r, at : at + len(t)] = m
            out["docs"][r, at : at + len(t)] = d
            out["positions"][r, at : at + len(t)] = np.arange(len(t))
            at += len(t)
    return out
