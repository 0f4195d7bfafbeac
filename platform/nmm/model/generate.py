"""Constrained sampling from the early-fusion model with a KV cache: each step may only emit
tokens of one range (text ids while captioning, image codes while drawing), optionally with
classifier-free guidance against an unconditional prompt; and drawing, with the model's plan
in words first when it was trained to write one.

`speak` is the audio twin of drawing: codes until the model writes <eoa>.
`draw` is the one prompt → codes → pixels path: evaluation, `nmm serve`, the MLflow pyfunc and
(through `draw_images`, its codes half) the grpo/opd rollouts all draw with it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from nmm.model.transformer import KVCache, image_spans
from nmm.tokenizers.vocab import BOI, SharedVocab, blank_text

MIN_TEMPERATURE = 1e-3  # below it sampling is greedy: logits / 1e-38 overflow to inf and softmax gives NaN


def sampled(temperature: float) -> bool:
    """Whether `temperature` samples (False: greedy). One rule for the server and generation."""
    return temperature >= MIN_TEMPERATURE


def chat_prompt_limit(max_seq_len: int) -> int:
    """The longest prompt a model of context `max_seq_len` can answer (one token of room)."""
    return max_seq_len - 1


def draw_prompt_limit(max_seq_len: int, tokens_per_image: int, plans: bool) -> int:
    """The longest drawing prompt that still leaves a whole image's room: the image's codes,
    and <boi> when the model writes a plan first (the plan itself gets what is left)."""
    return max_seq_len - tokens_per_image - (1 if plans else 0)


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    max_new: int | Callable[[int], int],
    allowed: tuple[int, int],
    *,
    stop: int | None = None,
    extra_allowed: tuple[int, ...] = (),
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    guidance: float = 1.0,
    uncond: list[list[int]] | None = None,
    patches=None,
    on_step=None,
    compiled: bool | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to `max_new` tokens (or `max_new(len(prompt))`) drawn from
    [allowed[0], allowed[1]) plus `extra_allowed`; temperature 0 is greedy. Prompts of equal
    length are batched together, so positions match training exactly (no padding). Generation
    stops at the model's context length (`max_seq_len`) even when no stop token came.

    Classifier-free guidance: with `uncond` (one prompt per prompt, same length, the condition
    blanked out) and `guidance` ≠ 1, logits are uncond + guidance · (cond − uncond).
    Mid/late fusion: `patches[i]` are the pixels of prompt i's image (read once, at prefill).
    `on_step(indices, tokens)`: after each decoding step, the prompts' indices and the token each
    just got (None once it stopped; the stop token itself is passed) — what streaming reads.
    With bidirectional image attention, the whole images in a prompt are inputs, seen whole at
    prefill; the image being drawn stays causal.
    After the prefill every step is `Transformer.decode` (static KV cache and shapes);
    `compiled` (default: on CUDA) runs it through torch.compile, as a CUDA graph on a GPU
    (gpt-fast's recipe). A compiled batch is padded to the next power of two with copies of its
    first prompt, so a server's or an evaluation's varying batches compile a few times, not once
    per batch size."""
    if uncond is not None and [len(p) for p in uncond] != [len(p) for p in prompts]:
        raise ValueError("each unconditional prompt must have its prompt's length")
    out: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    compiled = compiles(model, compiled)
    for length, idx in sorted(by_len.items()):
        batch = [prompts[i] for i in idx]
        blank = [uncond[i] for i in idx] if uncond is not None and guidance != 1.0 else None
        pix = None if patches is None else torch.as_tensor(patches[idx], dtype=torch.float32)
        n = len(batch)
        if compiled and (extra := (1 << (n - 1).bit_length()) - n):
            batch = batch + [batch[0]] * extra
            blank = None if blank is None else blank + [blank[0]] * extra
            pix = None if pix is None else torch.cat([pix, pix[:1].expand(extra, *pix.shape[1:])])
        step = None if on_step is None else (lambda toks, idx=idx, n=n: on_step(idx, toks[:n]))
        limit = max_new(length) if callable(max_new) else max_new
        res = _generate_batch(
            model,
            batch,
            blank,
            pix,
            guidance,
            limit,
            allowed,
            stop,
            extra_allowed,
            temperature,
            generator,
            step,
            compiled,
        )[:n]
        for i, o in zip(idx, res):
            out[i] = o
    return out


@torch.no_grad()
def draw_images(
    model,
    prompts: list[list[int]],
    tokens_per_image: int,
    image_range: tuple[int, int],
    *,
    plan_range: tuple[int, int] | None = None,
    blank: Callable[[list[int]], list[int]] | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    guidance: float = 1.0,
    patches=None,
    on_step=None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Draw one image per prompt: (what each prompt's model wrote before its image, the image's
    codes' ids). Without `plan_range` the prompts end with <boi> and nothing is written first.
    With it (the text ids: drawing plans) the model first writes its plan from those ids, without
    guidance, until it writes <boi> (returned with the plan) or only the image's room is left in
    the context (<boi> is then put in, not returned). The image follows, with classifier-free
    `guidance` against `blank(prompt + plan + <boi>)`, the condition padded out."""
    limit = draw_prompt_limit(model.cfg.max_seq_len, tokens_per_image, plan_range is not None)
    too_long = [i for i, p in enumerate(prompts) if len(p) > limit]
    if too_long:
        raise ValueError(
            f"prompt {too_long[0]}: {len(prompts[too_long[0]])} tokens leave no room for an image "
            f"({tokens_per_image} codes) in a context of {model.cfg.max_seq_len}: at most {limit}"
        )
    heads: list[list[int]] = [[] for _ in prompts]
    if plan_range is not None:

        def room(n: int) -> int:  # each prompt's own room: a short prompt may need a long plan
            return max(0, model.cfg.max_seq_len - n - tokens_per_image - 2)  # <boi>, <eoi>

        written = generate(
            model,
            prompts,
            room,
            plan_range,
            stop=BOI,
            extra_allowed=(BOI,),
            temperature=temperature,
            generator=generator,
            patches=patches,
            on_step=on_step,
        )
        heads = [w + [BOI] if len(w) < room(len(p)) else w for p, w in zip(prompts, written)]
        prompts = [p + h + ([] if h[-1:] == [BOI] else [BOI]) for p, h in zip(prompts, heads)]
    uncond = [blank(p) for p in prompts] if blank is not None and guidance != 1.0 else None
    images = generate(
        model,
        prompts,
        tokens_per_image,
        image_range,
        temperature=temperature,
        generator=generator,
        guidance=guidance,
        uncond=uncond,
        patches=patches,
        on_step=on_step,
    )
    return heads, images


@dataclass(frozen=True)
class Drawn:
    pixels: np.ndarray  # (N, H, W, C) in [0, 1]
    codes: np.ndarray  # (N, tokens_per_image) image codes (the tokenizer's, not vocabulary ids)
    plans: list[list[int]]  # what the model wrote before each image: its plan's ids (and <boi>), [] without plans


def draw(
    model,
    prompts: list[list[int]],
    vq,
    vocab: SharedVocab,
    *,
    plans: bool,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    guidance: float = 1.0,
    on_step=None,
) -> Drawn:
    """Prompt → codes → pixels: one image per drawing prompt (`Prompts.draw`'s), its plan written
    first when the model was trained with `plans`, classifier-free guidance against the prompt
    with its text padded out, the codes decoded by the image tokenizer `vq`."""
    heads, outs = draw_images(
        model,
        prompts,
        vq.tokens_per_image,
        vocab.image_range(),
        plan_range=vocab.text_range() if plans else None,
        blank=lambda p: blank_text(p, vocab.text_range()),
        temperature=temperature,
        generator=generator,
        guidance=guidance,
        on_step=on_step,
    )
    codes = np.array([[t - vocab.image_offset for t in o] for o in outs], dtype=np.int64).reshape(len(prompts), -1)
    return Drawn(vq.decode(codes), codes, heads)


def speak(
    model,
    prompts: list[list[int]],
    vocab: SharedVocab,
    *,
    max_codes: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[np.ndarray]:
    """Prompt → audio codes (`Prompts.say`'s prompts, ending with <boa>): each step may emit an
    audio code or <eoa>, and the model's <eoa> ends the recording (at most `max_codes` codes; a
    recording the model did not end is cut there). Returns each prompt's local codes, for the
    audio tokenizer's `decode`."""
    eoa = vocab.markers("audio")[1]
    outs = generate(
        model,
        prompts,
        max_codes,
        vocab.range("audio"),
        stop=eoa,
        extra_allowed=(eoa,),
        temperature=temperature,
        generator=generator,
    )
    return [np.asarray(vocab.local("audio", [t for t in o if t != eoa]), np.int64) for o in outs]


SYNC_EVERY = 16  # without a streaming callback, the host looks at the device's `done` flags this often


def compiles(model, compiled: bool | None) -> bool:
    """Whether decoding goes through the compiled step: `compiled`, or by default on CUDA."""
    return next(model.parameters()).is_cuda if compiled is None else compiled


def decoder(model, compiled: bool):
    """`model.decode`, or its compiled form (kept on the model: compiled once per batch shape,
    reused), with CUDA graphs ("reduce-overhead") on a GPU."""
    if not compiled:
        return model.decode
    fn = model.__dict__.get("_nmm_compiled_decode")
    if fn is None:
        cuda = next(model.parameters()).is_cuda
        fn = torch.compile(model.decode, mode="reduce-overhead" if cuda else None, fullgraph=True, dynamic=False)
        model.__dict__["_nmm_compiled_decode"] = fn
    return fn


def _generate_batch(
    model,
    prompts,
    uncond,
    patches,
    guidance,
    max_new,
    allowed,
    stop,
    extra_allowed,
    temperature,
    generator,
    on_step=None,
    compiled=None,
):
    """Tokens and `done` flags stay on the device; the host reads them once at the end (and every
    SYNC_EVERY steps, to stop early when every row has stopped), or each step for `on_step`."""
    model.eval()
    device = next(model.parameters()).device
    n = len(prompts)
    seq = torch.tensor(prompts + (uncond or []), dtype=torch.long, device=device)
    max_new = max(0, min(max_new, model.cfg.max_seq_len - seq.shape[1]))
    mask = torch.full((model.cfg.vocab_size,), float("-inf"), device=device)
    mask[allowed[0] : allowed[1]] = 0.0
    for t in extra_allowed:
        mask[t] = 0.0
    cache = KVCache(model.cfg, len(seq), device, dtype=next(model.parameters()).dtype)  # static, the model's dtype
    emitted = torch.empty((n, max_new), dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    step_in = seq
    cfg = model.cfg
    spans = image_spans(seq, cfg.image_range, cfg.tokens_per_image) if cfg.image_attention == "bidirectional" else None
    if patches is not None:
        patches = patches.to(device)
        if uncond is not None:
            patches = torch.cat([patches, patches])
    steps = 0
    decode = decoder(model, compiled)
    pos = torch.full((1,), seq.shape[1], dtype=torch.long, device=device)  # the next token's position
    for step in range(max_new):
        if step == 0:  # the prefill; the image sits in the prompt: only it reads the pixels
            logits = model(step_in, cache, patches, spans=spans)[:, -1, :].float()
        else:
            logits = decode(step_in, cache, pos).float()
            pos += 1
        if uncond is not None:
            logits = logits[n:] + guidance * (logits[:n] - logits[n:])
        logits = logits + mask
        if sampled(temperature):
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = logits.argmax(-1)
        emitted[:, step] = torch.where(done, -1, nxt)  # -1: the row had already stopped
        steps = step + 1
        if on_step is not None:
            on_step([None if t < 0 else t for t in emitted[:, step].tolist()])
        if stop is not None:
            done |= nxt == stop
            if (on_step is not None or steps % SYNC_EVERY == 0) and bool(done.all()):
                break
        step_in = (torch.cat([nxt, nxt]) if uncond is not None else nxt)[:, None]
    rows = emitted[:, :steps].tolist()  # the one copy to the host
    return [[t for t in row if t >= 0 and t != stop] for row in rows]
