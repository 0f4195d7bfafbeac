"""The training loop: DDP over a mixture of M2T and M2G sequences, resumable from checkpoints.

Batches are a pure function of (seed, step) and dropout randomness a pure function of
(seed, rank, step), so a resumed run sees exactly the data and masks an uninterrupted run would
have seen, whatever the world size; each rank draws its own dropout masks.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from nmm.data.sequences import TASKS
from nmm.model import ModelConfig
from nmm.train import checkpoint
from nmm.train.distributed import DistInfo, all_reduce_mean, barrier
from nmm.train.loss import next_token_loss


@dataclass(frozen=True, kw_only=True)
class PhaseConfig:
    name: str
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.1
    mixture: dict[str, float] = field(default_factory=lambda: {"m2t": 0.5, "m2g": 0.5})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelConfig
    phases: tuple[PhaseConfig, ...]
    seed: int = 0
    z_loss: float = 1e-4
    checkpoint_interval: int = 500
    keep_latest: int = 2
    log_every: int = 20

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


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of all randomness (dropout) of one rank at one step."""
    return ((seed * 1_000_003 + step) * 4096 + rank) % (2**63 - 1)


def _optimizer(model: torch.nn.Module, phase: PhaseConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
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
) -> tuple[torch.nn.Module, dict]:
    """Train through every phase; returns the unwrapped model and a summary."""
    torch.manual_seed(cfg.seed)
    model = cfg.model.build().to(info.device)
    ddp = DDP(model) if info.world_size > 1 else model
    rows_by_task = {t: np.flatnonzero(task == i) for i, t in enumerate(TASKS)}
    all_tokens = torch.from_numpy(tokens.astype(np.int64))
    all_mask = torch.from_numpy(loss_mask.astype(np.int64))

    start, opt_state = 0, None
    resumed = checkpoint.load_latest(checkpoint_root)
    if resumed is not None:
        start, state = resumed
        model.load_state_dict(state["model"])
        opt_state = state["optimizer"]

    stop = {"term": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(term=True))
    summary: dict = {"resumed_from": start, "tokens_text": 0.0, "tokens_image": 0.0}
    step, t0, tokens_seen = 0, time.perf_counter(), 0.0
    try:
        for phase in cfg.phases:
            opt = _optimizer(model, phase)
            phase_start = step
            step += phase.steps
            if step <= start:
                continue  # phase finished before the checkpoint
            if opt_state is not None:
                opt.load_state_dict(opt_state)
                opt_state = None
            ddp.train()
            for s in range(max(start, phase_start), step):
                torch.manual_seed(step_seed(cfg.seed, s, info.rank))
                lr = lr_at(phase, s - phase_start)
                for g in opt.param_groups:
                    g["lr"] = lr
                rows = batch_indices(rows_by_task, phase, cfg.seed, s)[info.rank :: info.world_size]
                x = all_tokens[rows].to(info.device)
                m = all_mask[rows].to(info.device)
                logits = ddp(x)
                loss, parts = next_token_loss(logits, x, m, image_range, cfg.z_loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                tokens_seen += float(parts["tokens_text"] + parts["tokens_image"]) * info.world_size
                summary["tokens_text"] += float(parts["tokens_text"]) * info.world_size
                summary["tokens_image"] += float(parts["tokens_image"]) * info.world_size
                done = s + 1
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
                    summary.update(final_loss=vals["ce"], tokens_per_s=metrics["train/tokens_per_s"])
                    if info.is_main:
                        log(metrics, done)
                if done % cfg.checkpoint_interval == 0 or stop["term"]:
                    _save(cfg, checkpoint_root, done, model, opt, info)
                    if stop["term"]:
                        raise Preempted(f"SIGTERM at step {done}: checkpoint written")
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary["steps"] = step
    return model, summary


def _save(cfg: TrainConfig, root: str, step: int, model, opt, info: DistInfo) -> None:
    if info.is_main:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}
        checkpoint.save(root, step, state, cfg.keep_latest)
    barrier(info)
