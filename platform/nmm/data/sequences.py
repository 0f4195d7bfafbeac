"""Token sequences of the two tasks in one shared vocabulary, with their loss masks.

M2T (image → caption):  <bos> <boi> c1 … cP <eoi> t1 … tn <eos>    loss on t1 … <eos>
M2G (caption → image):  <bos> t1 … tn <boi> c1 … cP <eoi>          loss on c1 … <eoi>
VQA (an M2T task):      <bos> <boi> c1 … cP <eoi> q1 … qm a1 … ak <eos>   loss on a1 … <eos>

`loss_mask[i] = 1` means token i is a training target (predicted from tokens < i).
"""

from __future__ import annotations

import numpy as np

from nmm.tokenizers.vocab import BOI, BOS, EOI, EOS, PAD, SharedVocab

TASKS = ("m2t", "m2g")


def m2t_prompt(vocab: SharedVocab, codes: np.ndarray) -> list[int]:
    return [BOS, BOI, *vocab.image_ids(codes).tolist(), EOI]


def m2g_prompt(vocab: SharedVocab, text_local: list[int]) -> list[int]:
    return [BOS, *vocab.text_ids(text_local), BOI]


def vqa_prompt(vocab: SharedVocab, codes: np.ndarray, question_local: list[int]) -> list[int]:
    return [*m2t_prompt(vocab, codes), *vocab.text_ids(question_local)]


def build_vqa(vocab: SharedVocab, codes: np.ndarray, question_local: list[int], answer_local: list[int]) -> tuple[list[int], list[int]]:
    prompt = vqa_prompt(vocab, codes, question_local)
    target = [*vocab.text_ids(answer_local), EOS]
    return prompt + target, [0] * len(prompt) + [1] * len(target)


def build(vocab: SharedVocab, codes: np.ndarray, text_local: list[int], task: str) -> tuple[list[int], list[int]]:
    if task == "m2t":
        prompt = m2t_prompt(vocab, codes)
        target = [*vocab.text_ids(text_local), EOS]
    else:
        prompt = m2g_prompt(vocab, text_local)
        target = [*vocab.image_ids(codes).tolist(), EOI]
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
