"""Constrained sampling from the early-fusion model: each step may only emit tokens of one range
(text ids while captioning, image codes while drawing)."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    max_new: int,
    allowed: tuple[int, int],
    *,
    stop: int | None = None,
    extra_allowed: tuple[int, ...] = (),
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to `max_new` tokens drawn from [allowed[0], allowed[1]) plus
    `extra_allowed`; temperature 0 is greedy. Prompts of equal length are batched together, so
    positions match training exactly (no padding). Generation stops at the model's context
    length (`max_seq_len`) even when no stop token came."""
    out: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for _, idx in sorted(by_len.items()):
        batch = _generate_batch(
            model, [prompts[i] for i in idx], max_new, allowed, stop, extra_allowed, temperature, generator
        )
        for i, o in zip(idx, batch):
            out[i] = o
    return out


def _generate_batch(model, prompts, max_new, allowed, stop, extra_allowed, temperature, generator):
    model.eval()
    device = next(model.parameters()).device
    n = len(prompts)
    seq = torch.tensor(prompts, dtype=torch.long, device=device)
    max_new = max(0, min(max_new, model.cfg.max_seq_len - seq.shape[1]))
    vocab = model.cfg.vocab_size
    mask = torch.full((vocab,), float("-inf"), device=device)
    mask[allowed[0] : allowed[1]] = 0.0
    for t in extra_allowed:
        mask[t] = 0.0
    out = [[] for _ in range(n)]
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for _ in range(max_new):
        logits = model(seq)[:, -1, :].float() + mask
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = logits.argmax(-1)
        for i, tok in enumerate(nxt.tolist()):
            if not done[i]:
                out[i].append(tok)
        if stop is not None:
            done |= nxt == stop
            if bool(done.all()):
                break
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return [[t for t in o if t != stop] for o in out]
