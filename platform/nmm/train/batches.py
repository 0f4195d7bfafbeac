"""The training data on the host and each step's batch: a pure function of (seed, step), so a
resumed run sees exactly the batches an uninterrupted one would have, at any world size."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nmm.data.sequences import STYLES, TASKS, pack_documents
from nmm.tokenizers.vocab import PAD
from nmm.train.distributed import DistInfo
from nmm.train.recipes import recipe

SEED_STRIDE = 1_000_003  # seeds of consecutive steps: seed * SEED_STRIDE + step
CAPTION_DROPOUT_SALT = 7_919  # keeps caption dropout's draws apart from the batch's


def batch_indices(
    rows_by_task: dict[str, np.ndarray], phase, seed: int, step: int, probs: dict[str, torch.Tensor] | None = None
) -> np.ndarray:
    """The global batch of row indices at `step`: a pure function of (seed, step). With `probs`
    (each task pool's sampling probabilities: the sources' mixture) rows are drawn by them,
    else uniformly."""
    g = torch.Generator().manual_seed(seed * SEED_STRIDE + step)
    weights = {t: w for t, w in phase.mixture.items() if len(rows_by_task.get(t, ())) > 0}
    total = sum(weights.values())
    picks, left = [], phase.batch_size
    for i, (task, w) in enumerate(sorted(weights.items())):
        n = left if i == len(weights) - 1 else int(round(phase.batch_size * w / total))
        left -= n
        pool = rows_by_task[task]
        if probs is None:
            picks.append(pool[torch.randint(len(pool), (n,), generator=g).numpy()])
        else:
            picks.append(pool[torch.multinomial(probs[task], n, replacement=True, generator=g).numpy()])
    return np.concatenate(picks)


def source_probs(
    pools: dict[str, np.ndarray], row_source: np.ndarray, weights: dict[int, float]
) -> dict[str, torch.Tensor]:
    """Per task pool, each row's probability of being drawn so that source s gives a share
    weights[s] / (sum of the weights of the pool's sources) of the rows, evenly over its own rows."""
    out = {}
    for task, pool in pools.items():
        src = row_source[pool]
        present = sorted(set(src.tolist()))
        total = sum(weights.get(s, 0.0) for s in present)
        p = np.zeros(len(pool), np.float64)
        for s in present:
            mine = src == s
            p[mine] = weights.get(s, 0.0) / total / mine.sum() if total > 0 else 0.0
        out[task] = torch.from_numpy(p if total > 0 else np.full(len(pool), 1.0 / max(len(pool), 1)))
    return out


def rows_by_phase(task: np.ndarray, style: np.ndarray | None, phases) -> dict[str, dict[str, np.ndarray]]:
    """Each phase's pools of row indices per task: the rows of its recipe's prompt style.
    Without a `style` column every row serves every phase (one layout)."""
    out = {}
    for phase in phases:
        keep = np.ones(len(task), bool) if style is None else style == STYLES.index(recipe(phase.recipe).style)
        pools = {t: np.flatnonzero(keep & (task == i)) for i, t in enumerate(TASKS)}
        if not any(len(pools.get(t, ())) for t in phase.mixture if phase.mixture[t] > 0):
            raise ValueError(
                f"phase {phase.name}: no {recipe(phase.recipe).style} rows for its mixture "
                f"{phase.mixture}; was the dataset curated by this version?"
            )
        out[phase.name] = pools
    return out


def row_lengths(x: torch.Tensor) -> torch.Tensor:
    """Each row's length up to its last non-padding token (caption dropout pads inside rows)."""
    cols = torch.arange(1, x.shape[1] + 1, device=x.device)
    return ((x != PAD) * cols).amax(1)


def trim(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns after every row's last token (rows of both prompt styles share
    one padded width; a batch of the shorter style need not pay for the longer)."""
    width = int(row_lengths(x).max())
    return x[:, :width], m[:, :width]


def blank_captions(
    tokens: torch.Tensor, is_m2g: torch.Tensor, p: float, text_range: tuple[int, int], seed: int, step: int
) -> torch.Tensor:
    """Caption dropout for classifier-free guidance: in a share `p` of the M2G rows (chosen by a
    pure function of (seed, step)) the text tokens (caption, instruction, and a drawing plan)
    become padding. Positions do not move, so the unconditional prompt at sampling time is the
    prompt (and plan) with its text padded out."""
    g = torch.Generator().manual_seed(seed * SEED_STRIDE + step + CAPTION_DROPOUT_SALT)
    drop = (torch.rand(len(tokens), generator=g) < p) & is_m2g
    text = (tokens >= text_range[0]) & (tokens < text_range[1])
    return torch.where(drop[:, None] & text, torch.zeros_like(tokens), tokens)


def pack_batch(
    x: torch.Tensor, m: torch.Tensor, length: int, spans: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The batch's rows, padding stripped, packed end to end into fewer rows of `length` tokens
    (nmm.data.sequences.pack_documents). A target whose predecessor is another document's last
    token is masked out, so the loss has exactly the targets of the unpacked batch. `spans`
    (bidirectional images) are packed to the same places."""
    keep = row_lengths(x).tolist()
    rows = [(x[i, :n].tolist(), m[i, :n].tolist()) for i, n in enumerate(keep)]
    p = pack_documents(rows, length)
    docs = torch.from_numpy(p["docs"]).long()
    mask = torch.from_numpy(p["loss_mask"]).long()
    mask[:, 1:] *= (docs[:, 1:] == docs[:, :-1]).long()
    extra = {"docs": docs.to(x.device), "positions": torch.from_numpy(p["positions"]).to(x.device), "spans": None}
    if spans is not None:  # the layout depends on the row lengths only: pack the ids the same way
        s = pack_documents([(spans[i, :n].tolist(), m[i, :n].tolist()) for i, n in enumerate(keep)], length)
        extra["spans"] = torch.from_numpy(s["tokens"]).long().to(x.device)
    return torch.from_numpy(p["tokens"]).long().to(x.device), mask.to(x.device), extra


def to_device(t: torch.Tensor | None, device) -> torch.Tensor | None:
    """A host tensor (or None) moved without waiting for the copy."""
    return None if t is None else t.to(device, non_blocking=True)


@dataclass
class Batch:
    """One rank's share of a step's batch: made on the host (so trimming and packing read the
    host's copy, never the device's), then moved with `to`."""

    x: torch.Tensor  # tokens
    m: torch.Tensor  # loss mask (the data's: answers only)
    patches: torch.Tensor | None  # mid/late fusion: each row's image patches
    given: torch.Tensor  # rows whose image is an input (M2T), not a target (M2G)
    rows: np.ndarray | None = None  # each row's index in the training data (what a reward looks up)

    def to(self, device) -> Batch:
        return Batch(*(to_device(t, device) for t in (self.x, self.m, self.patches, self.given)), self.rows)

    def repeat(self, n: int) -> Batch:
        """Each row `n` times in a row (GRPO's group of completions per prompt)."""
        rep = lambda t: None if t is None else t.repeat_interleave(n, 0)
        return Batch(
            rep(self.x),
            rep(self.m),
            rep(self.patches),
            rep(self.given),
            None if self.rows is None else np.repeat(self.rows, n),
        )


@dataclass(frozen=True, kw_only=True)
class TrainData:
    """What a run trains on, as the caller holds it (the curated shards' columns)."""

    tokens: np.ndarray  # (rows, width) token ids
    loss_mask: np.ndarray  # (rows, width) the data's targets (answers only)
    task: np.ndarray  # (rows,) index in TASKS
    image_range: tuple[int, int]  # the image codes' ids
    text_range: tuple[int, int] | None = None  # the text ids (caption dropout, on-policy sampling)
    code_ranges: dict[str, tuple[int, int]] | None = None  # each non-text modality's codes; None: images alone
    style: np.ndarray | None = None  # (rows,) prompt style, index in STYLES; None: one layout
    patches: np.ndarray | None = None  # mid/late fusion: (images, tokens_per_image, patch_dim)
    row_image: np.ndarray | None = None  # mid/late fusion: each row's image
    row_source: np.ndarray | None = None  # each row's source (index), with source_weights: the mixture
    source_weights: dict[int, float] | None = None  # a source's share of each epoch ∝ its weight; None: uniform rows

    @property
    def ranges(self) -> dict[str, tuple[int, int]]:
        """Each non-text modality's code ids, by name: what the loss splits its targets by."""
        return dict(self.code_ranges) if self.code_ranges is not None else {"image": self.image_range}


class Batches:
    """Every training row as host tensors, each phase's pools of rows, and each step's batch."""

    def __init__(self, data: TrainData, phases, reads_pixels: bool):
        self.tokens = torch.from_numpy(data.tokens.astype(np.int64))
        self.mask = torch.from_numpy(data.loss_mask.astype(np.int64))
        self.is_m2g = torch.from_numpy(data.task == TASKS.index("m2g"))
        self.pools = rows_by_phase(data.task, data.style, phases)
        self.probs = (
            {name: source_probs(pools, data.row_source, data.source_weights) for name, pools in self.pools.items()}
            if data.source_weights and data.row_source is not None
            else {}
        )
        self.text_range = data.text_range
        self.patches = torch.from_numpy(data.patches.astype(np.float32)) if reads_pixels else None
        self.row_image = torch.from_numpy(data.row_image.astype(np.int64)) if reads_pixels else None

    def batch(self, phase, seed: int, step: int, info: DistInfo) -> Batch:
        """This rank's share of the batch at `step`, on the host."""
        rows = batch_indices(self.pools[phase.name], phase, seed, step, self.probs.get(phase.name))
        x = self.tokens[rows]
        if phase.caption_dropout > 0 and self.text_range is not None:
            x = blank_captions(x, self.is_m2g[rows], phase.caption_dropout, self.text_range, seed, step)
        mine = rows[info.rank :: info.world_size]
        x, m = trim(x[info.rank :: info.world_size], self.mask[mine])
        m = m * (x != PAD)  # a drawing plan padded out by caption dropout is no target
        p = self.patches[self.row_image[mine]] if self.patches is not None else None
        return Batch(x, m, p, ~self.is_m2g[mine], mine)
