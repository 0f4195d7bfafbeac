"""The training loop: DDP (or FSDP) over a mixture of M2T and M2G sequences, phase after phase,
resumable from checkpoints. The pieces live apart (torchtitan's habit): the data and each step's
batch (`batches`), the loss per recipe (`recipes`), the learning-rate schedule (`schedule`),
checkpoints (`checkpoint`), parallelism (`parallelize`); here the config, the step, the metrics
and the checkpoint policy.

Batches are a pure function of (seed, step) and dropout randomness a pure function of
(seed, rank, step), so a resumed run sees exactly the data and masks an uninterrupted run would
have seen, whatever the world size; each rank draws its own dropout masks.

Imports torch and nmm's model/data code only (no pydantic, MLflow or Ray): the train stage
derives `TrainConfig` from the spec.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from nmm.model import ModelConfig
from nmm.train import checkpoint, encoder, parallelize, recipes, schedule
from nmm.train.batches import SEED_STRIDE, Batch, Batches, TrainData
from nmm.train.distributed import DistInfo, all_reduce_mean, any_rank, barrier
from nmm.train.recipes import NoOptions
from nmm.train.recipes.base import StepInputs

logger = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
CLIP_NORM = 1.0  # gradients are clipped to this global norm
RANK_STRIDE = 4096  # step seeds: one per (step, rank) for up to this many ranks


@dataclass(frozen=True, kw_only=True)
class PhaseConfig:
    """One phase; the spec's `training.phases[]` (nmm.stages.train derives it; the defaults are
    the spec's, which tests/unit/test_spec_is_the_source.py compares). The recipe's own settings
    are `options`, its options object (nmm.train.recipes)."""

    name: str
    steps: int
    batch_size: int
    lr: float
    mixture: dict[str, float]
    warmup_steps: int = 0
    weight_decay: float = 0.1
    caption_dropout: float = 0.0
    recipe: str = "pretrain"
    options: object = NoOptions()

    def __post_init__(self) -> None:
        want = recipes.recipe(self.recipe).options
        if type(self.options) is not want:
            raise ValueError(
                f"phase {self.name}: a {self.recipe} phase takes {want.__name__}, got {type(self.options).__name__}"
            )

    @property
    def info(self) -> recipes.RecipeInfo:
        return recipes.recipe(self.recipe)

    @property
    def scores_against(self) -> str | None:
        """The earlier phase whose final weights this one scores against (opd's teacher, grpo's
        reference): its recipe's `frozen` option."""
        return getattr(self.options, self.info.frozen) if self.info.frozen else None


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
    loss_weights: dict[str, float] = field(default_factory=dict)  # modality → its targets' weight (absent: 1)
    micro_batch: int | None = (
        None  # rows per forward on each rank; None: from the memory estimate (parallelize.micro_batch)
    )
    parallel: parallelize.Parallelism = field(default_factory=parallelize.Parallelism)

    @property
    def teachers(self) -> set[str]:
        """The phases whose final weights a later phase needs (teachers, references)."""
        return {p.scores_against for p in self.phases if p.scores_against}

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was written."""


def phase_bounds(phases) -> list[tuple[int, int, PhaseConfig]]:
    """(start, end, phase) of each phase: it trains steps start+1 … end (1-based, as logged)."""
    out, end = [], 0
    for p in phases:
        out.append((end, end + p.steps, p))
        end += p.steps
    return out


def phase_at(phases, step: int):
    """The phase that trains `step` (1-based); the last phase past the end."""
    return next((p for start, end, p in phase_bounds(phases) if step <= end), phases[-1])


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of all randomness (dropout) of one rank at one step."""
    return ((seed * SEED_STRIDE + step) * RANK_STRIDE + rank) % (2**63 - 1)


def _optimizer(model: torch.nn.Module, phase: PhaseConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]  # late fusion's encoder is frozen
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": phase.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per step and no host read of the step counter (the for-each path calls .item())
    return schedule.prepare(torch.optim.AdamW(groups, lr=phase.lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True))


@dataclass
class TrainingRun:
    """What one call of `train` carries from step to step and phase to phase."""

    cfg: TrainConfig
    info: DistInfo
    model: torch.nn.Module
    ddp: torch.nn.Module
    data: TrainData
    batches: Batches
    checkpoint_root: str
    log: Callable[[dict, int], None]
    on_checkpoint: Callable[[int, dict], None] | None
    start: int = 0  # the first step to train (a resumed run's checkpoint step)
    opt_state: dict | None = None  # a resumed run's optimizer state, for the phase it resumes in
    teachers: dict = field(default_factory=dict)  # phase name → its final weights, for a later opd/grpo phase
    rewards: dict = field(default_factory=dict)  # name → nmm.train.rewards.Reward, for grpo phases
    on_samples: Callable[[int, str, torch.Tensor, torch.Tensor], None] | None = None
    samples: tuple | None = None  # grpo: the last step's (sequences, sampled mask), for on_samples
    stop: bool = False  # SIGTERM arrived
    t0: float = field(default_factory=time.perf_counter)
    counts: torch.Tensor | None = (
        None  # target tokens trained on per modality (`modalities`), all ranks: on the device, read when logging
    )
    processed: int = 0
    micro: int | None = None  # rows per forward in this phase (None: the whole batch)
    summary: dict = field(default_factory=dict)

    @property
    def modalities(self) -> list[str]:
        """The loss's modalities, in the order its token counts are kept: text, then the data's others."""
        return ["text", *self.data.ranges]

    def tokens(self) -> dict[str, float]:
        """Target tokens so far, per modality: one read of the device."""
        counts = [0.0] * len(self.modalities) if self.counts is None else self.counts.tolist()
        return dict(zip(self.modalities, counts))

    def amp(self):
        return parallelize.autocast(self.cfg.parallel, self.info.device)


def train(
    cfg: TrainConfig,
    data: TrainData,
    info: DistInfo,
    checkpoint_root: str,
    log: Callable[[dict, int], None],
    on_checkpoint: Callable[[int, dict], None] | None = None,
    rewards: dict | None = None,
    on_samples: Callable[[int, str, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Train through every phase; returns the unwrapped model and a summary.

    Pretrain phases draw from the plain rows, sft and opd phases from the instruction rows (the
    data's `style`). Mid/late fusion also need the data's `patches` and `row_image`.
    `log(metrics, step)` gets each logging interval's metrics on the main rank;
    `on_checkpoint(step, weights)` runs there after each interval checkpoint (the train stage
    keeps weight snapshots for the see-saw evaluation). `rewards`: name → Reward, what grpo
    phases score their completions with; `on_samples(step, phase, sequences, sampled)` gets a
    grpo phase's completions (the main rank's) every `samples_every` steps and at its end."""
    _check(cfg, data, rewards or {})
    cfg = dataclasses.replace(cfg, parallel=cfg.parallel.resolved(info.device, cfg.model.fusion))
    torch.manual_seed(cfg.seed)
    model = cfg.model.build().to(info.device)
    run = TrainingRun(
        cfg,
        info,
        model,
        model,
        data,
        Batches(data, cfg.phases, cfg.model.reads_pixels),
        checkpoint_root,
        log,
        on_checkpoint,
        rewards=rewards or {},
        on_samples=on_samples,
    )
    resumed = _resume(run)
    if cfg.model.fusion == "late":
        if not resumed:  # (a checkpoint already holds the trained encoder and its statistics)
            encoder.pretrain(model.stem.encoder, data.patches, cfg.encoder_steps, cfg.seed)
            model.stem.freeze_encoder()
            model.stem.calibrate(torch.from_numpy(data.patches.astype(np.float32)).to(info.device))
        model.stem.freeze_encoder()
    run.ddp = parallelize.apply(model, cfg.parallel, info.world_size)
    run.summary["resumed_from"] = run.start
    previous = signal.signal(signal.SIGTERM, lambda *_: setattr(run, "stop", True))
    try:
        for first, end, phase in phase_bounds(cfg.phases):
            if end > run.start:  # (a phase that finished before the checkpoint is skipped)
                _train_phase(run, phase, first, end)
    finally:
        signal.signal(signal.SIGTERM, previous)
    run.summary["steps"] = cfg.total_steps
    run.summary.update({f"tokens_{m}": n for m, n in run.tokens().items()})
    return _unsharded(run), run.summary


def log_interval(cfg: TrainConfig, phase: PhaseConfig) -> int:
    """Steps between logged metrics: the run's interval, or for a sampling phase (few, costly
    steps whose reward curve is what one watches) one that gives it at least 20 points."""
    if phase.info.samples:
        return max(1, min(cfg.log_every, phase.steps // 20))
    return cfg.log_every


def _check(cfg: TrainConfig, data: TrainData, rewards: dict) -> None:
    if cfg.model.reads_pixels and (data.patches is None or data.row_image is None):
        raise ValueError(f"{cfg.model.fusion} fusion trains on pixels: pass patches and row_image")
    sampling = [p.name for p in cfg.phases if p.info.samples]
    if sampling and data.text_range is None:
        raise ValueError(f"phases {sampling} sample text: pass text_range")
    if cfg.parallel.fsdp and sampling:
        raise ValueError(f"phases {sampling} sample per rank; they run with DDP, not FSDP")
    for p in cfg.phases:
        wanted = getattr(p.options, "reward", ())
        missing = [name for name, _ in wanted if name not in rewards]
        if missing:
            raise ValueError(f"phase {p.name}: its rewards must be passed in; missing {missing}")


def _resume(run: TrainingRun) -> bool:
    """Load the newest committed checkpoint, if any: weights now, optimizer state for later."""
    resumed = checkpoint.load_latest(run.checkpoint_root)
    if resumed is None:
        return False
    run.start, state = resumed
    logger.info("resuming from step %d (checkpoint in %s)", run.start, run.checkpoint_root)
    run.model.load_state_dict(state["model"])
    run.opt_state = state["optimizer"]
    run.teachers = state.get("teachers", {})
    return True


def _train_phase(run: TrainingRun, phase: PhaseConfig, first: int, end: int) -> None:
    cfg, info = run.cfg, run.info
    opt = _optimizer(run.model, phase)
    if run.opt_state is not None:
        parallelize.load_optimizer(run.model, opt, run.opt_state, cfg.parallel, info.world_size)
        run.opt_state = None
    frozen = _frozen_model(cfg, run.teachers[phase.scores_against], info) if phase.scores_against else None
    logger.info(
        "phase %s (%s) steps %d-%d%s",
        phase.name,
        phase.recipe,
        first + 1,
        end,
        f", {phase.info.frozen}: phase {phase.scores_against}" if frozen is not None else "",
    )
    begin = max(run.start, first)
    lr = schedule.scheduler(opt, phase, begin - first)
    run.micro = parallelize.micro_batch(
        cfg.model, phase.batch_size // info.world_size, cfg.micro_batch, cfg.parallel, info.device
    )
    run.ddp.train()
    every = log_interval(cfg, phase)
    for s in range(begin, end):
        torch.manual_seed(step_seed(cfg.seed, s, info.rank))
        rate = opt.param_groups[0]["lr"]
        done = s + 1
        logs = done % every == 0 or done == cfg.total_steps
        batch = run.batches.batch(phase, cfg.seed, s, info)
        seq_len, parts, grad_norm = train_step(run, phase, batch, opt, frozen, norms=logs)
        lr.step()
        if done == end and phase.name in cfg.teachers:
            run.teachers[phase.name] = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        if logs:
            _log_metrics(run, parts, rate, grad_norm, seq_len, done)
        sample_every = getattr(phase.options, "samples_every", None)  # (a sampling recipe's)
        if (
            run.samples is not None
            and run.on_samples
            and info.is_main
            and (sample_every and (done - first) % sample_every == 0 or done == end)
        ):
            run.on_samples(done, phase.name, *run.samples)
        run.samples = None
        _checkpoint_policy(run, opt, done)


def train_step(
    run: TrainingRun, phase: PhaseConfig, batch: Batch, opt, frozen, *, norms: bool = True
) -> tuple[int, dict, torch.Tensor]:
    """Forward, backward and optimizer step of one (host) batch, by the phase's recipe:
    (sequence length, loss parts, grad norm). Nothing here reads the device: parts, norm and
    token counts stay tensors until a logging step reads them (a sampling recipe excepted: its
    sampling is the host's). `frozen`: the teacher or reference; `norms`: also the logit norms
    (logging steps)."""
    opt.zero_grad(set_to_none=True)

    def update(loss: torch.Tensor) -> None:  # a recipe's extra optimizer step within one batch
        loss.backward()
        _clip_and_step(run, opt)
        opt.zero_grad(set_to_none=True)

    out = recipes.implementation(phase.recipe).step(
        StepInputs(
            phase=phase,
            batch=batch,
            model=run.model,
            ddp=run.ddp,
            frozen=frozen,
            cfg=run.cfg,
            image_range=run.data.image_range,
            text_range=run.data.text_range,
            ranges=run.data.ranges,
            amp=run.amp,
            device=run.info.device,
            micro=run.micro,
            norms=norms,
            rewards=run.rewards,
            update=update,
        )
    )
    parts, x, run.samples = out.parts, out.x, out.samples
    grad_norm = _clip_and_step(run, opt)
    world = run.info.world_size
    counts = torch.stack([parts[f"tokens_{m}"] for m in run.modalities]).detach() * world
    run.counts = counts if run.counts is None else run.counts + counts
    run.processed += x.numel() * world
    return x.shape[1], parts, grad_norm


def _clip_and_step(run: TrainingRun, opt) -> torch.Tensor:
    """Clip the gradients to CLIP_NORM and take the optimizer step; returns the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), CLIP_NORM)
    opt.step()
    return grad_norm


def _log_metrics(run: TrainingRun, parts: dict, lr: float, grad_norm: torch.Tensor, seq_len: int, step: int) -> None:
    """Loss parts averaged over ranks, rates and token counts; the main rank hands them to `log`."""
    vals = {k: float(all_reduce_mean(v, run.info)) for k, v in parts.items() if not k.startswith("tokens")}
    tokens = run.tokens()
    run.summary.update({f"tokens_{m}": n for m, n in tokens.items()})
    elapsed = max(time.perf_counter() - run.t0, 1e-9)
    names = {"ce": "loss", "z": "z_loss"} | {f"ce_{m}": f"loss_{m}" for m in tokens}
    metrics = {
        f"train/{names.get(k, k)}": v for k, v in vals.items() if v == v
    }  # (NaN: a reward no row of this step had)
    metrics |= {
        "train/lr": lr,
        "train/grad_norm": float(grad_norm),
        "train/tokens_per_s": sum(tokens.values()) / elapsed,
        **{f"train/tokens_{m}_total": n for m, n in tokens.items()},
    }
    mfu = parallelize.mfu(run.processed / elapsed, run.cfg.model, seq_len, run.info.device)
    if mfu is not None:
        metrics["train/mfu"] = mfu
    run.summary.update(final_loss=vals["ce"], tokens_per_s=metrics["train/tokens_per_s"])
    if run.info.is_main:
        run.log(metrics, step)


def _checkpoint_policy(run: TrainingRun, opt, step: int) -> None:
    """A checkpoint every interval, and on SIGTERM (every rank stops at the same step), after
    which the run ends with Preempted."""
    term = any_rank(run.stop, run.info)
    interval = step % run.cfg.checkpoint_interval == 0
    if not (interval or term):
        return
    weights = _save(run.cfg, run.checkpoint_root, step, run.model, opt, run.info, run.teachers)
    if run.on_checkpoint is not None and run.info.is_main and interval:
        run.on_checkpoint(step, weights)
    if term:
        raise Preempted(f"SIGTERM at step {step}: checkpoint written")


def _unsharded(run: TrainingRun) -> torch.nn.Module:
    """Rank 0 gets a whole, unsharded model."""
    if not parallelize.sharded(run.cfg.parallel, run.info.world_size):
        return run.model
    weights, _ = parallelize.full_state(run.model, None, run.cfg.parallel, run.info.world_size)
    if not run.info.is_main:
        return run.model
    model = run.cfg.model.build()
    model.load_state_dict(weights)
    return model


def _frozen_model(cfg: TrainConfig, weights: dict, info: DistInfo) -> torch.nn.Module:
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
