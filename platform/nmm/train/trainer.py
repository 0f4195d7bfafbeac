"""The training loop: DDP over a mixture of M2T and M2G sequences, resumable from checkpoints.

Recipes, one per phase:
- `pretrain`: next-token loss on every token of each sequence in the data's plain layout (text
  and image alike; the image positions of mid/late fusion, which hold pixels, excepted);
- `sft`: instruction-formatted rows (a user turn with the instruction, the assistant's turn
  with the answer: nmm.data.sequences), loss on the answers only (the caption, the VQA answer,
  or the image to draw), with the phase's own mixture;
- `opd`: on-policy distillation. The student samples continuations of the batch's prompts and
  a frozen teacher (an earlier phase's final weights) scores every sampled token: loss is the
  reverse KL(student ‖ teacher) at each of those positions. Its prompts are the instruction ones.

With bidirectional image attention the M2T rows' images are inputs seen whole (M2G rows draw
theirs causally), and the targets inside such an image leave every recipe's loss.

Batches are a pure function of (seed, step) and dropout randomness a pure function of
(seed, rank, step), so a resumed run sees exactly the data and masks an uninterrupted run would
have seen, whatever the world size; each rank draws its own dropout masks.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from nmm.data.sequences import STYLES, TASKS, pack_documents, style_of
from nmm.model import ModelConfig
from nmm.model.generate import generate
from nmm.model.transformer import image_spans
from nmm.tokenizers.vocab import EOI, EOS, PAD
from nmm.train import checkpoint, encoder, parallelize
from nmm.train.distributed import DistInfo, all_reduce_mean, any_rank, barrier
from nmm.train.loss import next_token_loss, reverse_kl_loss

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PhaseConfig:
    name: str
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.1
    mixture: dict[str, float] = field(default_factory=lambda: {"m2t": 0.5, "m2g": 0.5})
    caption_dropout: float = 0.0
    recipe: str = "pretrain"
    teacher: str | None = None  # opd: the earlier phase whose final weights teach
    temperature: float = 1.0  # opd: the student's sampling temperature


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelConfig
    phases: tuple[PhaseConfig, ...]
    seed: int = 0
    z_loss: float = 1e-4
    checkpoint_interval: int = 500
    keep_latest: int = 2
    log_every: int = 20
    encoder_steps: int = 300  # late fusion: masked-patch pretraining of the image encoder
    loss_weights: tuple[float, float] = (1.0, 1.0)  # (text, image) targets
    parallel: parallelize.Parallelism = field(default_factory=parallelize.Parallelism)

    @property
    def teachers(self) -> set[str]:
        return {p.teacher for p in self.phases if p.teacher}

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was written."""


def lr_at(phase: PhaseConfig, step_in_phase: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step_in_phase < phase.warmup_steps:
        return phase.lr * (step_in_phase + 1) / phase.warmup_steps
    span = max(1, phase.steps - phase.warmup_steps)
    progress = (step_in_phase - phase.warmup_steps) / span
    return phase.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_indices(rows_by_task: dict[str, np.ndarray], phase: PhaseConfig, seed: int, step: int) -> np.ndarray:
    """The global batch of row indices at `step`: a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    weights = {t: w for t, w in phase.mixture.items() if len(rows_by_task.get(t, ())) > 0}
    total = sum(weights.values())
    picks, left = [], phase.batch_size
    for i, (task, w) in enumerate(sorted(weights.items())):
        n = left if i == len(weights) - 1 else int(round(phase.batch_size * w / total))
        left -= n
        pool = rows_by_task[task]
        picks.append(pool[torch.randint(len(pool), (n,), generator=g).numpy()])
    return np.concatenate(picks)


def rows_by_phase(task: np.ndarray, style: np.ndarray | None, phases) -> dict[str, dict[str, np.ndarray]]:
    """Each phase's pools of row indices per task: the rows of its recipe's prompt style.
    Without a `style` column every row serves every phase (one layout)."""
    out = {}
    for phase in phases:
        keep = np.ones(len(task), bool) if style is None else style == STYLES.index(style_of(phase.recipe))
        pools = {t: np.flatnonzero(keep & (task == i)) for i, t in enumerate(TASKS)}
        if not any(len(pools.get(t, ())) for t in phase.mixture if phase.mixture[t] > 0):
            raise ValueError(f"phase {phase.name}: no {style_of(phase.recipe)} rows for its mixture "
                             f"{phase.mixture}; was the dataset curated by this version?")
        out[phase.name] = pools
    return out


def trim(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns after every row's last token (rows of both prompt styles share
    one padded width; a batch of the shorter style need not pay for the longer)."""
    width = int(row_lengths(x).max())
    return x[:, :width], m[:, :width]


def row_lengths(x: torch.Tensor) -> torch.Tensor:
    """Each row's length up to its last non-padding token (caption dropout pads inside rows)."""
    cols = torch.arange(1, x.shape[1] + 1, device=x.device)
    return ((x != PAD) * cols).amax(1)


def blank_captions(tokens: torch.Tensor, is_m2g: torch.Tensor, p: float, text_range: tuple[int, int],
                   seed: int, step: int) -> torch.Tensor:
    """Caption dropout for classifier-free guidance: in a share `p` of the M2G rows (chosen by a
    pure function of (seed, step)) the text tokens (caption, and instruction) become padding. Positions do not
    move, so the unconditional prompt at sampling time is the prompt with its text padded out."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + 7_919)
    drop = (torch.rand(len(tokens), generator=g) < p) & is_m2g
    text = (tokens >= text_range[0]) & (tokens < text_range[1])
    return torch.where(drop[:, None] & text, torch.zeros_like(tokens), tokens)


def pretrain_mask(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Every token is a target except padding (and, for mid/late fusion, the image positions,
    whose inputs are pixels rather than tokens)."""
    m = x != PAD
    if cfg.reads_pixels:
        m &= ~((x >= cfg.image_lo) & (x < cfg.image_hi))
    return m.long()


def input_image_spans(x: torch.Tensor, cfg: ModelConfig, given: torch.Tensor) -> torch.Tensor | None:
    """The input images of the batch's `given` rows, seen whole under bidirectional image
    attention (nmm.model.transformer.image_spans); None when attention is causal."""
    if cfg.image_attention != "bidirectional":
        return None
    return image_spans(x, cfg.image_range, cfg.tokens_per_image, given)


def hide_seen_targets(m: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Drop the targets a bidirectional image gives away: a code predicted from a position of
    its own image, which already sees it. (The image's first code, predicted from <boi>, stays.)"""
    m = m.clone()
    m[:, 1:] *= ~((spans[:, 1:] > 0) & (spans[:, 1:] == spans[:, :-1]))
    return m


@torch.no_grad()
def student_samples(model, x: torch.Tensor, m: torch.Tensor, patches: torch.Tensor | None, image_range, text_range,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """On-policy rollouts: each row's prompt (the tokens before its first target) continued by
    the student, text rows until <eos>, image rows for a whole image then <eoi>. Returns the
    right-padded sequences and a mask of the positions the student sampled."""
    first = m.argmax(1).tolist()
    lengths = m.sum(1).tolist()
    is_image = [image_range[0] <= int(x[i, first[i]]) < image_range[1] for i in range(len(x))]
    seqs: list[list[int]] = [[] for _ in range(len(x))]
    sampled: list[list[int]] = [[] for _ in range(len(x))]
    for want_image in (False, True):
        idx = [i for i in range(len(x)) if is_image[i] == want_image]
        if not idx:
            continue
        prompts = [x[i, : first[i]].tolist() for i in idx]
        pix = None if patches is None else patches[idx].cpu().numpy()
        if want_image:
            n = int(max(lengths[i] for i in idx)) - 1
            outs = generate(model, prompts, n, image_range, temperature=temperature, patches=pix)
            tails = [(o, [EOI]) for o in outs]
        else:
            n = int(max(lengths[i] for i in idx))
            outs = generate(model, prompts, n, text_range, stop=EOS, extra_allowed=(EOS,), temperature=temperature, patches=pix)
            tails = [(o + [EOS], []) if len(o) < n else (o, []) for o in outs]
        for i, p, (o, forced) in zip(idx, prompts, tails):
            seqs[i] = p + o + forced
            sampled[i] = [0] * len(p) + [1] * len(o) + [0] * len(forced)
    width = min(max(len(q) for q in seqs), model.cfg.max_seq_len)
    out = torch.full((len(x), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(x), width), dtype=torch.long)
    for i, (q, sm) in enumerate(zip(seqs, sampled)):
        out[i, : len(q[:width])] = torch.tensor(q[:width])
        mask[i, : len(sm[:width])] = torch.tensor(sm[:width])
    return out.to(x.device), mask.to(x.device)


def pack_batch(x: torch.Tensor, m: torch.Tensor, length: int,
               spans: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
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


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of all randomness (dropout) of one rank at one step."""
    return ((seed * 1_000_003 + step) * 4096 + rank) % (2**63 - 1)


def _optimizer(model: torch.nn.Module, phase: PhaseConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]  # late fusion's encoder is frozen
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": phase.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=phase.lr, betas=(0.9, 0.95), eps=1e-8)


def train(
    cfg: TrainConfig,
    tokens: np.ndarray,
    loss_mask: np.ndarray,
    task: np.ndarray,
    image_range: tuple[int, int],
    info: DistInfo,
    checkpoint_root: str,
    log: Callable[[dict, int], None],
    text_range: tuple[int, int] | None = None,
    patches: np.ndarray | None = None,
    row_image: np.ndarray | None = None,
    on_checkpoint: Callable[[int, dict], None] | None = None,
    style: np.ndarray | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Train through every phase; returns the unwrapped model and a summary.

    `style` is each row's prompt style (index in STYLES): pretrain phases draw from the plain
    rows, sft and opd phases from the instruction rows.

    Mid/late fusion also need `patches` (images, tokens_per_image, patch_dim) and `row_image`
    (the image of each row). `on_checkpoint(step, weights)` runs on the main rank after each
    interval checkpoint (the train stage keeps weight snapshots for the see-saw evaluation)."""
    if cfg.model.reads_pixels and (patches is None or row_image is None):
        raise ValueError(f"{cfg.model.fusion} fusion trains on pixels: pass patches and row_image")
    if any(p.recipe == "opd" for p in cfg.phases) and text_range is None:
        raise ValueError("on-policy distillation samples text: pass text_range")
    if cfg.parallel.fsdp and any(p.recipe == "opd" for p in cfg.phases):
        raise ValueError("on-policy distillation samples per rank; it runs with DDP, not FSDP")
    torch.manual_seed(cfg.seed)
    model = cfg.model.build().to(info.device)
    pix = torch.from_numpy(patches.astype(np.float32)) if cfg.model.reads_pixels else None
    img_of_row = torch.from_numpy(row_image.astype(np.int64)) if cfg.model.reads_pixels else None
    pools = rows_by_phase(task, style, cfg.phases)
    all_tokens = torch.from_numpy(tokens.astype(np.int64))
    all_mask = torch.from_numpy(loss_mask.astype(np.int64))
    all_m2g = torch.from_numpy(task == TASKS.index("m2g"))

    start, opt_state = 0, None
    teachers: dict[str, dict] = {}  # phase name → its final weights, for a later opd phase
    resumed = checkpoint.load_latest(checkpoint_root)
    if resumed is not None:
        start, state = resumed
        logger.info("resuming from step %d (checkpoint in %s)", start, checkpoint_root)
        model.load_state_dict(state["model"])
        opt_state = state["optimizer"]
        teachers = state.get("teachers", {})
    if cfg.model.fusion == "late":
        if resumed is None:  # (a checkpoint already holds the trained encoder and its statistics)
            encoder.pretrain(model.stem.encoder, patches, cfg.encoder_steps, cfg.seed)
            model.stem.freeze_encoder()
            model.stem.calibrate(torch.from_numpy(patches.astype(np.float32)).to(info.device))
        model.stem.freeze_encoder()
    ddp = parallelize.apply(model, cfg.parallel, info.world_size)
    amp = lambda: parallelize.autocast(cfg.parallel, info.device)  # noqa: E731

    stop = {"term": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(term=True))
    summary: dict = {"resumed_from": start, "tokens_text": 0.0, "tokens_image": 0.0}
    step, t0, tokens_seen, processed = 0, time.perf_counter(), 0.0, 0
    try:
        for phase in cfg.phases:
            opt = _optimizer(model, phase)
            phase_start = step
            step += phase.steps
            if step <= start:
                continue  # phase finished before the checkpoint
            if opt_state is not None:
                parallelize.load_optimizer(model, opt, opt_state, cfg.parallel, info.world_size)
                opt_state = None
            teacher = _teacher(cfg, teachers[phase.teacher], info) if phase.recipe == "opd" else None
            logger.info("phase %s (%s) steps %d-%d%s", phase.name, phase.recipe, phase_start + 1, step,
                        f", teacher: phase {phase.teacher}" if teacher is not None else "")
            ddp.train()
            for s in range(max(start, phase_start), step):
                torch.manual_seed(step_seed(cfg.seed, s, info.rank))
                lr = lr_at(phase, s - phase_start)
                for g in opt.param_groups:
                    g["lr"] = lr
                rows = batch_indices(pools[phase.name], phase, cfg.seed, s)
                x = all_tokens[rows]
                if phase.caption_dropout > 0 and text_range is not None:
                    x = blank_captions(x, all_m2g[rows], phase.caption_dropout, text_range, cfg.seed, s)
                mine = rows[info.rank :: info.world_size]
                x = x[info.rank :: info.world_size].to(info.device)
                m = all_mask[mine].to(info.device)
                x, m = trim(x, m)
                p = pix[img_of_row[mine]].to(info.device) if pix is not None else None
                given = ~all_m2g[mine].to(info.device)  # rows whose image is an input, not a target
                if teacher is not None:
                    x, m = student_samples(model, x, m, p, image_range, text_range, phase.temperature)
                    model.train()
                    spans = input_image_spans(x, cfg.model, given)
                    with torch.no_grad(), amp():
                        scores = teacher(x, patches=p, spans=spans)
                    with amp():
                        loss, parts = reverse_kl_loss(ddp(x, patches=p, spans=spans), scores, x, m, image_range)
                else:
                    if phase.recipe == "pretrain":
                        m = pretrain_mask(x, cfg.model)
                    spans = input_image_spans(x, cfg.model, given)
                    if spans is not None:
                        m = hide_seen_targets(m, spans)
                    packed = {"spans": spans}
                    if cfg.parallel.pack:
                        x, m, packed = pack_batch(x, m, cfg.model.max_seq_len, spans)
                    with amp():
                        loss, parts = next_token_loss(ddp(x, patches=p, **packed), x, m, image_range, cfg.z_loss,
                                                      cfg.loss_weights)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                tokens_seen += float(parts["tokens_text"] + parts["tokens_image"]) * info.world_size
                processed += x.numel() * info.world_size
                summary["tokens_text"] += float(parts["tokens_text"]) * info.world_size
                summary["tokens_image"] += float(parts["tokens_image"]) * info.world_size
                done = s + 1
                if done == step and phase.name in cfg.teachers:
                    teachers[phase.name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if done % cfg.log_every == 0 or done == cfg.total_steps:
                    vals = {k: float(all_reduce_mean(v, info)) for k, v in parts.items() if not k.startswith("tokens")}
                    elapsed = time.perf_counter() - t0
                    metrics = {
                        "train/loss": vals["ce"],
                        "train/loss_text": vals["ce_text"],
                        "train/loss_image": vals["ce_image"],
                        "train/z_loss": vals["z"],
                        "train/logit_norm_text": vals["logit_norm_text"],
                        "train/logit_norm_image": vals["logit_norm_image"],
                        "train/lr": lr,
                        "train/grad_norm": float(grad_norm),
                        "train/tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                        "train/tokens_text_total": summary["tokens_text"],
                        "train/tokens_image_total": summary["tokens_image"],
                    }
                    mfu = parallelize.mfu(processed / max(elapsed, 1e-9), cfg.model, x.shape[1], info.device)
                    if mfu is not None:
                        metrics["train/mfu"] = mfu
                    summary.update(final_loss=vals["ce"], tokens_per_s=metrics["train/tokens_per_s"])
                    if info.is_main:
                        log(metrics, done)
                term = any_rank(stop["term"], info)  # every rank stops at the same step
                if done % cfg.checkpoint_interval == 0 or term:
                    weights = _save(cfg, checkpoint_root, done, model, opt, info, teachers)
                    if on_checkpoint is not None and info.is_main and done % cfg.checkpoint_interval == 0:
                        on_checkpoint(done, weights)
                    if term:
                        raise Preempted(f"SIGTERM at step {done}: checkpoint written")
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary["steps"] = step
    if parallelize.sharded(cfg.parallel, info.world_size):  # rank 0 gets a whole, unsharded model
        weights, _ = parallelize.full_state(model, None, cfg.parallel, info.world_size)
        if info.is_main:
            model = cfg.model.build()
            model.load_state_dict(weights)
    return model, summary


def _teacher(cfg: TrainConfig, weights: dict, info: DistInfo) -> torch.nn.Module:
    teacher = cfg.model.build().to(info.device)
    teacher.load_state_dict(weights)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _save(cfg: TrainConfig, root: str, step: int, model, opt, info: DistInfo, teachers: dict) -> dict:
    weights, optim = parallelize.full_state(model, opt, cfg.parallel, info.world_size)  # collective under FSDP
    if info.is_main:
        state = {"model": weights, "optimizer": optim, "step": step, "teachers": teachers}
        checkpoint.save(root, step, state, cfg.keep_latest)
    barrier(info)
    return weights
