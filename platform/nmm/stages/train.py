"""Train: the early-fusion transformer on the curated M2T + M2G sequences, with DDP.

Usage, one process:
    nmm stage train --spec '<pipeline JSON>' --run-id RUN --store URI --dataset-uri URI --outputs DIR
Under torchrun (what the PyTorchJob's pods run; the Training Operator sets PET_* for it):
    torchrun --nnodes=$PET_NNODES --nproc-per-node=$PET_NPROC_PER_NODE --no-python \
        nmm stage train …

Publishes `<store>/runs/<pipeline>/<run>/train/` (weights as safetensors, config, tokenizers,
manifest last) and logs the model to MLflow as a pyfunc. Exit codes (R17): configuration errors
1–127, retryable faults 128–255 (SIGTERM after a checkpoint: 143).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nmm import __version__, exitcodes, lineage, storage
from nmm.data.dataset import Dataset
from nmm.evaluate.grid import png_grid
from nmm.gpu import inventory
from nmm.model import ModelConfig
from nmm.serve import pyfunc
from nmm.serve.model_dir import model_files, tokenizer_files
from nmm.stages.context import StageContext, cache_key, setup_logging
from nmm.train import distributed
from nmm.train.batches import Batches, TrainData, batch_indices
from nmm.train.parallelize import Parallelism
from nmm.train.recipes import recipe
from nmm.train.rewards import Reward, answer_exact, drawn_images
from nmm.train.trainer import PhaseConfig, Preempted, TrainConfig, phase_at, phase_bounds, train
from nmm.version import code_version


def phase_configs(spec) -> tuple[PhaseConfig, ...]:
    """The trainer's phases: the spec's, field for field, the recipe's own fields as its options
    object (an unset mixture: equal shares of the model's tasks)."""
    names = {f.name for f in dataclasses.fields(PhaseConfig)} - {"options"}
    return tuple(
        PhaseConfig(
            **{
                **p.model_dump(include=names),
                "mixture": dict(p.mixture or {t: 1.0 for t in spec.model.tasks}),
                "options": (info := recipe(p.recipe)).options(**p.model_dump(include=set(info.option_names()))),
            }
        )
        for p in spec.training.phases
    )


def train_config(ctx: StageContext, ds: Dataset, seq_len: int) -> TrainConfig:
    """The trainer's config, derived from the spec (and from the dataset what only it knows:
    vocabulary, image layout, sequence length)."""
    spec = ctx.spec.spec
    model_spec, size, patch = spec.model, spec.model.size, spec.model.tokenizers.image.patch_size
    lo, hi = ds.vocab.image_range()
    model = ModelConfig(
        vocab_size=ds.vocab.size,
        dim=size.dim,
        layers=size.layers,
        heads=size.heads,
        max_seq_len=seq_len,
        dropout=size.dropout,
        qk_norm=model_spec.qk_norm,
        fusion=model_spec.fusion,
        image_attention=model_spec.image_attention,
        image_positions=model_spec.image_positions,
        image_lo=lo,
        image_hi=hi,
        patch_dim=patch * patch * ds.manifest["image_shape"][2],
        tokens_per_image=ds.manifest["tokens_per_image"],
        encoder_dim=model_spec.encoder.dim,
        encoder_layers=model_spec.encoder.layers,
        image_factors=ds.image_tokenizer().factors,
    )
    t = spec.training
    return TrainConfig(
        model=model,
        phases=phase_configs(spec),
        seed=t.seed,
        z_loss=model_spec.z_loss,
        checkpoint_interval=t.checkpoint.interval_steps,
        keep_latest=t.checkpoint.keep_latest,
        log_every=max(1, min(50, sum(p.steps for p in t.phases) // 20)),
        encoder_steps=model_spec.encoder.steps,
        loss_weights=dict(model_spec.loss_weights),
        parallel=Parallelism(**t.parallelism.model_dump()),
    )


def flatten(value, prefix: str = "") -> dict[str, object]:
    """Nested spec data as dotted MLflow params (`training.phases.sft.lr`); list items are named
    by their `name` when they have one."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        items = ((v["name"], v) for v in value)
    else:
        return {prefix: value}
    out: dict[str, object] = {}
    for k, v in items:
        out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def _params(ctx: StageContext, cfg: TrainConfig, world_size: int) -> dict:
    """The spec's model and training sections, flattened, and what only the run knows."""
    spec = ctx.spec.spec
    params = flatten(
        {
            "model": spec.model.model_dump(mode="json", by_alias=True),
            "training": spec.training.model_dump(mode="json", by_alias=True),
        }
    )
    return params | {
        "variant": ctx.variant or "",
        "model.category": spec.model.category,
        "model.vocab_size": cfg.model.vocab_size,
        "train.steps": cfg.total_steps,
        "train.world_size": world_size,
    }


SNAPSHOTS = "snapshots"


def _snapshotter(out_uri: str):
    """Weights at each interval checkpoint, for the see-saw evaluation: they outlive keepLatest
    (and restarts) and are published with the model."""
    from safetensors.torch import save

    def snapshot(step: int, weights: dict) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        storage.write_bytes(storage.join(out_uri, SNAPSHOTS, f"step-{step:08d}.safetensors"), save(state))

    return snapshot


def _snapshot_step(name: str) -> int:
    return int(name.rsplit("step-", 1)[1][:8])


def prompt_style_at(cfg: TrainConfig, step: int) -> str:
    """The prompt style the weights after `step` were trained on: that of the phase holding
    the step (evaluation and serving prompt a model, or a snapshot, the way it last learned)."""
    return phase_at(cfg.phases, step).info.style


def _snapshots(out_uri: str, total_steps: int) -> dict[str, bytes]:
    """The snapshots written so far (before the final step), read back to be listed in the
    model's manifest (they are not written again)."""
    folder = storage.join(out_uri, SNAPSHOTS)
    out = {}
    for name in storage.list_names(folder):
        if name.startswith("step-") and _snapshot_step(name) < total_steps:
            out[f"{SNAPSHOTS}/{name}"] = storage.read_bytes(storage.join(folder, name))
    return out


class _PhaseRuns:
    """One MLflow run per training phase, nested under the train stage's run: its recipe and
    hyperparameters as params, the metrics of its steps."""

    def __init__(self, stage_run, cfg: TrainConfig):
        self.stage_run, self.runs, self.bounds = stage_run, {}, phase_bounds(cfg.phases)

    def run_at(self, step: int):
        """The MLflow run of the phase that trains `step` (opened on first use)."""
        start, _, p = next(b for b in self.bounds if b[0] < step <= b[1])
        if p.name not in self.runs:
            params = {
                "recipe": p.recipe,
                "steps": p.steps,
                "first_step": start + 1,
                "lr": p.lr,
                "batch_size": p.batch_size,
                "mixture": p.mixture,
                "caption_dropout": p.caption_dropout,
            }
            params |= {k: dict(v) if k == "reward" else v for k, v in dataclasses.asdict(p.options).items()}
            self.runs[p.name] = self.stage_run.child(p.name, params)
        return self.runs[p.name]

    def log(self, metrics: dict, step: int) -> None:
        self.run_at(step).log_metrics(metrics, step)

    def finish(self, ok: bool) -> None:
        for r in self.runs.values():
            r.finish(ok)


def _publish(ctx: StageContext, run_, ds: Dataset, cfg: TrainConfig, model, summary: dict, key: str) -> str:
    """Log the model to MLflow, then publish the model folder (manifest last)."""
    out_uri = ctx.stage_uri(ctx.step("train"))
    config = {
        "model": json.loads(cfg.model.to_json()),
        "vocab": ds.vocab.manifest(),
        "tokens_per_image": ds.manifest["tokens_per_image"],
        "image_shape": ds.manifest["image_shape"],
        "source": ds.manifest["source"],
        "prompts": prompt_style_at(cfg, summary["steps"]),
        "plans": ds.manifest.get("draw_plans", "none") != "none",  # a drawing starts with its plan in words
        "serves": _serves(ctx, ds),
    }
    files = model_files(
        model,
        config,
        {m: storage.read_file(ds.uri, ds.manifest, name) for m, name in tokenizer_files(ds.vocab).items()},
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        model_uri = run_.log_pyfunc_model(tmp, "nmm.serve.pyfunc", [f"nmm-platform=={__version__}"], pyfunc.SIGNATURE)
    run_.set_tags({"nmm.model_uri": model_uri})
    snapshots = _snapshots(out_uri, summary["steps"])
    storage.publish(
        out_uri,
        files,
        {
            "snapshots": [
                {"step": _snapshot_step(n), "file": n, "prompts": prompt_style_at(cfg, _snapshot_step(n))}
                for n in sorted(snapshots)
            ],
            "kind": "nmm.model",
            "dataset_uri": ds.uri,
            "dataset_digest": ds.digest,
            "mlflow_model_uri": model_uri,
            "steps": summary["steps"],
            "final_loss": summary.get("final_loss"),
            "cache_key": key,
        },
        written=snapshots,
        exclusive=True,
    )  # of two attempts racing on this run's folder exactly one commits (R21)
    return out_uri


def _serves(ctx: StageContext, ds: Dataset) -> dict[str, bool]:
    """What the model was trained to do (what `nmm serve` lays requests out for, or refuses)."""
    tasks = ctx.spec.spec.model.tasks
    return {
        "caption": "m2t" in tasks,
        "answer": "m2t" in tasks and ds.split("train").vqa is not None,
        "draw": "m2g" in tasks,
    }


def train_key(ctx: StageContext, ds: Dataset) -> str:
    """What the model is a function of: the model and training spec, whether snapshots are kept,
    the dataset's digest and the code version. Checkpoints live under it, so a run never resumes
    from another key's checkpoint."""
    spec = ctx.spec.spec
    return cache_key(
        "train",
        spec.model.model_dump(mode="json"),
        spec.training.model_dump(mode="json"),
        {"seesaw": spec.evaluation.seesaw},
        ds.digest,
    )


def run(ctx: StageContext, dataset_uri: str) -> int:
    log = setup_logging()
    info = distributed.init()
    out_uri = ctx.stage_uri(ctx.step("train"))
    try:
        ds = Dataset.open(dataset_uri)
        key = train_key(ctx, ds)
        if ctx.reusable(out_uri, key) is not None:  # a retry after publishing; another key raises
            log.info("train already published for this run at %s (cache key %s); nothing to do", out_uri, key)
            ctx.write_outputs({"model_uri": out_uri})
            return 0
        stage = lineage.stage_run(ctx.run, ctx.step("train"), cache_key=key, code_version=code_version())
        with stage if info.is_main else contextlib.nullcontext() as run_:
            return _train(ctx, ds, key, out_uri, info, run_, log)
    finally:
        distributed.shutdown(info)


def train_data(ds: Dataset, a: dict, cfg: TrainConfig) -> TrainData:
    """The train split's rows as the trainer takes them: the vocabulary's ranges by modality, the
    pixels when the model reads them, the sources' mixture."""
    pixels = {}
    if cfg.model.reads_pixels:
        pixels = {
            "patches": ds.image_tokenizer().patches(a["images"].astype("float32") / 255.0),
            "row_image": a["row_image"],
        }
    return TrainData(
        tokens=a["tokens"],
        loss_mask=a["loss_mask"],
        task=a["task"],
        style=a["style"],
        image_range=ds.vocab.image_range(),
        text_range=ds.vocab.text_range(),
        code_ranges=ds.vocab.code_ranges(),
        **pixels,
        **_mixture(ds, a),
    )


def _train(ctx: StageContext, ds: Dataset, key: str, out_uri: str, info, run_, log) -> int:
    """Train on every rank; the main rank (the one holding the MLflow run) logs and publishes."""
    a = ds.split("train").arrays
    cfg = train_config(ctx, ds, a["tokens"].shape[1])
    what = (info.rank, info.world_size, info.device, len(a["tokens"]), ds.vocab.size, cfg.total_steps)
    log.info("rank %d/%d on %s: %d sequences, vocab %d, %d steps", *what)
    phases = _PhaseRuns(run_, cfg) if run_ else None
    if run_:
        run_.log_dataset(ctx.pipeline, ds.digest, ds.uri)
        run_.log_params(_params(ctx, cfg, info.world_size))
    t0 = time.perf_counter()
    try:
        data = train_data(ds, a, cfg)
        if run_ and data.source_weights:
            run_.log_metrics(_realised_mixture(ds, data, cfg))
        model, summary = train(
            cfg,
            data,
            info,
            storage.join(out_uri, "checkpoints", key),
            _emitter(cfg, info, run_, phases, log),
            on_checkpoint=_snapshotter(out_uri) if ctx.spec.spec.evaluation.seesaw else None,
            rewards=rewards(cfg, ds, a),
            on_samples=_sample_logger(ds, cfg, phases),
        )
    except Preempted as exc:
        log.warning("%s; exiting %d so the job restarts and resumes", exc, exitcodes.PREEMPTED)
        return exitcodes.PREEMPTED
    except BaseException:
        if phases:
            phases.finish(ok=False)
        raise
    if phases:
        phases.finish(ok=True)
    wall = time.perf_counter() - t0
    # Every rank is done: leave the process group before rank 0's slow I/O, so no
    # collective is pending while it logs and publishes; the other ranks exit now.
    distributed.barrier(info)
    distributed.shutdown(info)
    if info.is_main:
        log.info("trained %d steps in %.1fs; %d parameters", summary["steps"], wall, model.num_params())
        run_.log_metrics({"train/wall_s": wall, "train/params": model.num_params()}, summary["steps"])
        _publish(ctx, run_, ds, cfg, model, summary, key)
        ctx.write_outputs({"model_uri": out_uri})
    return 0


def _sample_logger(ds: Dataset, cfg: TrainConfig, phases: _PhaseRuns | None):
    """grpo's completions in the phase's MLflow run: the images it drew as a PNG grid (one row
    per prompt, its group across) and the answers it wrote as text, under `samples/`."""
    if phases is None or not any(hasattr(p.options, "samples_every") for p in cfg.phases):
        return None
    vq, text, vocab = ds.image_tokenizer(), ds.text_tokenizer(), ds.vocab

    def on_samples(step: int, phase: str, x: torch.Tensor, sampled: torch.Tensor) -> None:
        group = next(p.options.group for p in cfg.phases if p.name == phase)
        x, sampled = x.cpu(), sampled.cpu()
        is_image = ((x >= vocab.image_range()[0]) & (x < vocab.image_range()[1]) & sampled.bool()).any(1)
        run = phases.run_at(step)
        drew = is_image.nonzero().flatten()[: 8 * group]
        if len(drew):
            codes = drawn_images(x[drew], sampled[drew], vocab.image_range(), cfg.model.tokens_per_image)
            run.log_bytes(png_grid(vq.decode(codes), -(-len(drew) // group), group), f"step-{step:06d}.png", "samples")
        wrote = (~is_image).nonzero().flatten()[: 8 * group]
        if len(wrote):
            lines = []
            for i in wrote.tolist():
                ids = x[i].tolist()
                first = int(sampled[i].argmax())
                prompt = text.decode(vocab.text_local(ids[:first]))
                answer = text.decode(vocab.text_local(t for t, s in zip(ids, sampled[i].tolist()) if s))
                lines.append(f"{prompt.strip()} → {answer.strip()}")
            run.log_bytes("\n".join(lines).encode(), f"step-{step:06d}.txt", "samples")

    return on_samples


def rewards(cfg: TrainConfig, ds: Dataset, a: dict) -> dict[str, Reward]:
    """The rewards the run's grpo phases name, over the train split's rows (the judges see the
    train split only, as the evaluation's do)."""
    wanted = {name for p in cfg.phases for name, _ in getattr(p.options, "reward", ())}
    out = {}
    if "vqa_exact" in wanted:
        out["vqa_exact"] = Reward("vqa_exact", "m2t", answer_exact(a["tokens"], a["loss_mask"]))
    if wanted & {"digits_judge", "shapes_geneval"}:
        split, vq, image_range = ds.split("train"), ds.image_tokenizer(), ds.vocab.image_range()

        def drawn(tokens, sampled) -> np.ndarray:
            return vq.decode(drawn_images(tokens, sampled, image_range, cfg.model.tokens_per_image))

    if "digits_judge" in wanted:
        from nmm.evaluate.judge import DigitJudge

        labels = split.arrays["labels"]
        known = labels >= 0  # a mixed dataset: the digits among other sources' images
        judge = DigitJudge(split.arrays["images"][known].astype(np.float32) / 255.0, labels[known], seed=cfg.seed)

        def digit_drawn(rows, tokens, sampled):
            want = labels[a["row_image"][rows]]
            return torch.from_numpy((judge.predict(drawn(tokens, sampled)) == want).astype(np.float32))

        out["digits_judge"] = Reward("digits_judge", "m2g", digit_drawn)
    if "shapes_geneval" in wanted:
        from nmm.data import shapes as shapes_data
        from nmm.evaluate import shapes_judge

        def scene_drawn(rows, tokens, sampled):
            images = drawn(tokens, sampled)
            scores = []
            for r, image in zip(rows, images):
                scene = split.scenes[a["row_image"][r]] if split.scenes else None
                scores.append(
                    float(scene is not None and shapes_judge.score(shapes_data.scene_from_dict(scene), image))
                )
            return torch.tensor(scores)

        out["shapes_geneval"] = Reward("shapes_geneval", "m2g", scene_drawn)
    return out


def _mixture(ds: Dataset, a: dict) -> dict:
    """The sources' mixture, when the train split mixes sources: each row's source, each source's weight."""
    mixture = ds.manifest.get("mixture") or {}
    if "source" not in a or sum(1 for w in mixture.values() if w > 0) < 2:
        return {}
    names = [s["name"] for s in ds.manifest["sources"]]
    return {
        "row_source": a["source"][a["row_image"]].astype(np.int64),
        "source_weights": {names.index(n): w for n, w in mixture.items()},
    }


def _realised_mixture(ds: Dataset, data, cfg: TrainConfig) -> dict[str, float]:
    """The share of each source among every row the run's batches draw (they are a pure function
    of seed and step, so this is what training sees)."""
    batches = Batches(data, cfg.phases, reads_pixels=False)
    counts = np.zeros(len(ds.manifest["sources"]), np.int64)
    for step in range(1, cfg.total_steps + 1):
        phase = phase_at(cfg.phases, step)
        rows = batch_indices(batches.pools[phase.name], phase, cfg.seed, step, batches.probs.get(phase.name))
        counts += np.bincount(data.row_source[rows], minlength=len(counts))
    total = max(int(counts.sum()), 1)
    return {f"mixture.realised.{s['name']}": float(c) / total for s, c in zip(ds.manifest["sources"], counts)}


def _emitter(cfg: TrainConfig, info, run_, phases, log):
    """What the trainer calls with each logging interval's metrics (main rank only)."""

    def emit(metrics: dict, step: int) -> None:
        if info.device.type == "cuda":
            metrics = metrics | inventory.telemetry()  # NVML utilisation and memory
        if "train/reward" in metrics:  # a grpo phase
            log.info(
                "step %d/%d reward %.3f (±%.3f in a group) kl %.4f %.0f tok/s",
                step,
                cfg.total_steps,
                metrics["train/reward"],
                metrics["train/reward_std"],
                metrics["train/kl"],
                metrics["train/tokens_per_s"],
            )
        else:
            log.info(
                "step %d/%d loss %.4f (text %.4f, image %.4f) %.0f tok/s",
                step,
                cfg.total_steps,
                metrics["train/loss"],
                metrics["train/loss_text"],
                metrics["train/loss_image"],
                metrics["train/tokens_per_s"],
            )
        run_.log_metrics(metrics, step)
        phases.log(metrics, step)

    return emit
