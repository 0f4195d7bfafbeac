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
import json
import tempfile
import time
from pathlib import Path

from nmm import __version__, lineage, storage
from nmm.data.dataset import Dataset
from nmm.data.sequences import style_of
from nmm.gpu import inventory
from nmm.model import ModelConfig
from nmm.serve.model_dir import model_files
from nmm.stages.context import StageContext, cache_key, setup_logging
from nmm.train import distributed
from nmm.train.parallelize import Parallelism
from nmm.train.trainer import PhaseConfig, Preempted, TrainConfig, train
from nmm.version import code_version

EXIT_PREEMPTED = 143


def train_config(ctx: StageContext, ds: Dataset, seq_len: int) -> TrainConfig:
    spec = ctx.spec.spec
    size = spec.model.size
    p = spec.model.tokenizers.image.patchSize
    lo, hi = ds.vocab.image_range()
    model = ModelConfig(
        vocab_size=ds.vocab.size,
        dim=size.dim,
        layers=size.layers,
        heads=size.heads,
        max_seq_len=seq_len,
        dropout=size.dropout,
        qk_norm=spec.model.qkNorm,
        fusion=spec.model.fusion,
        image_attention=spec.model.imageAttention,
        image_lo=lo,
        image_hi=hi,
        patch_dim=p * p * ds.manifest["image_shape"][2],
        tokens_per_image=ds.manifest["tokens_per_image"],
        encoder_dim=spec.model.encoder.dim,
        encoder_layers=spec.model.encoder.layers,
    )
    phases = tuple(
        PhaseConfig(
            name=p.name,
            steps=p.steps,
            batch_size=p.batchSize,
            lr=p.lr,
            warmup_steps=p.warmupSteps,
            weight_decay=p.weightDecay,
            mixture=dict(p.mixture) if p.mixture else {t: 1.0 for t in spec.model.tasks},
            caption_dropout=p.captionDropout,
            recipe=p.recipe,
            teacher=p.teacher,
            temperature=p.temperature,
        )
        for p in spec.training.phases
    )
    total = sum(p.steps for p in phases)
    return TrainConfig(
        model=model,
        phases=phases,
        seed=spec.training.seed,
        z_loss=spec.model.zLoss,
        checkpoint_interval=spec.training.checkpoint.intervalSteps,
        keep_latest=spec.training.checkpoint.keepLatest,
        log_every=max(1, min(50, total // 20)),
        encoder_steps=spec.model.encoder.steps,
        loss_weights=(spec.model.lossWeights.get("text", 1.0), spec.model.lossWeights.get("image", 1.0)),
        parallel=Parallelism(**spec.training.parallelism.model_dump()),
    )


def _params(ctx: StageContext, cfg: TrainConfig, world_size: int) -> dict:
    params = {
        "variant": ctx.variant or "",
        "model.fusion": ctx.spec.spec.model.fusion,
        "model.category": ctx.spec.spec.model.category,
        "model.dim": cfg.model.dim,
        "model.layers": cfg.model.layers,
        "model.heads": cfg.model.heads,
        "model.vocab_size": cfg.model.vocab_size,
        "train.steps": cfg.total_steps,
        "train.world_size": world_size,
        "train.seed": cfg.seed,
    }
    for p in cfg.phases:
        params.update({f"phase.{p.name}.lr": p.lr, f"phase.{p.name}.batch_size": p.batch_size, f"phase.{p.name}.mixture": p.mixture})
    return params


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
    end = 0
    for p in cfg.phases:
        end += p.steps
        if step <= end:
            return style_of(p.recipe)
    return style_of(cfg.phases[-1].recipe)


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
        self.stage_run, self.runs, self.bounds = stage_run, {}, []
        end = 0
        for p in cfg.phases:
            self.bounds.append((end, end + p.steps, p))
            end += p.steps

    def log(self, metrics: dict, step: int) -> None:
        start, _, p = next(b for b in self.bounds if b[0] < step <= b[1])
        if p.name not in self.runs:
            self.runs[p.name] = self.stage_run.child(p.name, {
                "recipe": p.recipe, "steps": p.steps, "first_step": start + 1, "lr": p.lr,
                "batch_size": p.batch_size, "mixture": p.mixture, "caption_dropout": p.caption_dropout,
                "teacher": p.teacher or "",
            })
        self.runs[p.name].log_metrics(metrics, step)

    def finish(self, ok: bool) -> None:
        for r in self.runs.values():
            r.finish(ok)


def _publish(ctx: StageContext, run_, ds: Dataset, cfg: TrainConfig, model, summary: dict, key: str) -> str:
    """Log the model to MLflow, then publish the model folder (manifest last)."""
    out_uri = ctx.stage_uri(ctx.step("train"))
    config = {
        "model": json.loads(cfg.model.to_json()),
        "vocab": {"text_size": ds.vocab.text_size, "image_size": ds.vocab.image_size},
        "tokens_per_image": ds.manifest["tokens_per_image"],
        "image_shape": ds.manifest["image_shape"],
        "source": ds.manifest["source"],
        "prompts": prompt_style_at(cfg, summary["steps"]),
    }
    files = model_files(
        model,
        config,
        storage.read_file(ds.uri, ds.manifest, "text_tokenizer.json"),
        storage.read_file(ds.uri, ds.manifest, "image_tokenizer.safetensors"),
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        model_uri = run_.log_pyfunc_model(tmp, "nmm.serve.pyfunc", [f"nmm-platform=={__version__}"])
    run_.set_tags({"nmm.model_uri": model_uri})
    snapshots = _snapshots(out_uri, summary["steps"])
    storage.publish(out_uri, files, {
        "snapshots": [{"step": _snapshot_step(n), "file": n, "prompts": prompt_style_at(cfg, _snapshot_step(n))}
                      for n in sorted(snapshots)],
        "kind": "nmm.model",
        "dataset_uri": ds.uri,
        "dataset_digest": ds.digest,
        "mlflow_model_uri": model_uri,
        "steps": summary["steps"],
        "final_loss": summary.get("final_loss"),
        "cache_key": key,
    }, written=snapshots)
    return out_uri


def run(ctx: StageContext, dataset_uri: str) -> int:
    log = setup_logging()
    info = distributed.init()
    out_uri = ctx.stage_uri(ctx.step("train"))
    try:
        if storage.read_manifest(out_uri, verify=True) is not None:
            log.info("train already published for this run at %s; nothing to do", out_uri)
            ctx.write_outputs({"model_uri": out_uri})
            return 0
        ds = Dataset.open(dataset_uri)
        a = ds.split("train").arrays
        cfg = train_config(ctx, ds, a["tokens"].shape[1])
        pixels = {}
        if cfg.model.reads_pixels:
            pixels = {"patches": ds.image_tokenizer().patches(a["images"].astype("float32") / 255.0),
                      "row_image": a["row_image"]}
        spec = ctx.spec.spec
        key = cache_key("train", spec.model.model_dump(mode="json"), spec.training.model_dump(mode="json"), ds.digest)
        log.info("rank %d/%d on %s: %d sequences, vocab %d, %d steps",
                 info.rank, info.world_size, info.device, len(a["tokens"]), ds.vocab.size, cfg.total_steps)
        stage = lineage.stage_run(ctx.pipeline, ctx.run_id, ctx.step("train"), cache_key=key, code_version=code_version())
        with stage if info.is_main else contextlib.nullcontext() as run_:
            if run_:
                run_.log_dataset(ctx.pipeline, ds.digest, dataset_uri)
                run_.log_params(_params(ctx, cfg, info.world_size))

            phases = _PhaseRuns(run_, cfg) if run_ else None

            def emit(metrics: dict, step: int) -> None:
                if info.device.type == "cuda":
                    metrics = metrics | inventory.telemetry()  # NVML utilisation and memory
                log.info("step %d/%d loss %.4f (text %.4f, image %.4f) %.0f tok/s", step, cfg.total_steps,
                         metrics["train/loss"], metrics["train/loss_text"], metrics["train/loss_image"],
                         metrics["train/tokens_per_s"])
                run_.log_metrics(metrics, step)
                phases.log(metrics, step)

            t0 = time.perf_counter()
            try:
                model, summary = train(cfg, a["tokens"], a["loss_mask"], a["task"], ds.vocab.image_range(), info,
                                       storage.join(out_uri, "checkpoints"), emit, text_range=ds.vocab.text_range(),
                                       on_checkpoint=_snapshotter(out_uri) if spec.evaluation.seesaw else None,
                                       style=a["style"], **pixels)
            except Preempted as exc:
                log.warning("%s; exiting %d so the job restarts and resumes", exc, EXIT_PREEMPTED)
                return EXIT_PREEMPTED
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
    finally:
        distributed.shutdown(info)
