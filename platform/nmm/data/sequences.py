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
