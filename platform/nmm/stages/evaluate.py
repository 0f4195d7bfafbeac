"""Evaluate: run the spec's suites on held-out data, judge, and decide the gates.

Usage:
    nmm stage evaluate --spec '<pipeline JSON>' --run-id RUN --store URI \
        --dataset-uri URI --model-uri URI --outputs DIR

Output parameters: `gate` (pass|fail), `metrics` (JSON object of every measured metric).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import numpy as np

from nmm import lineage, storage
from nmm.data import shapes as shapes_data
from nmm.data.dataset import Dataset, DatasetError
from nmm.data.sequences import Prompts
from nmm.evaluate import digits, gates, seesaw, shapes, shapes_judge
from nmm.evaluate.grid import png_grid
from nmm.evaluate.judge import DigitJudge
from nmm.serve.model_dir import load_from_files, read_files
from nmm.stages.context import ModelMissing, StageContext, cache_key, setup_logging
from nmm.version import code_version


def _patches(loaded, images: np.ndarray) -> np.ndarray | None:
    """Mid and late fusion read raw pixels: the patches of the images; early fusion reads codes."""
    if not loaded.model.cfg.reads_pixels:
        return None
    return loaded.vq.patches(images.astype(np.float32) / 255.0)


def _labelled(split):
    """The images of a split that carry a digit label (a mixed dataset's other sources do not)."""
    labels = split.arrays["labels"]
    return split if (labels >= 0).all() else split.images_where(labels >= 0)


_JUDGES: dict[tuple[str, int], DigitJudge] = {}


def _digit_judge(ds: Dataset, seed: int) -> DigitJudge:
    """The digits judge, fitted once per evaluation (the final model and every see-saw snapshot
    are scored by the same one); it learns from the train split's pixels only."""
    key = (ds.digest, seed)
    if key not in _JUDGES:
        train = _labelled(ds.split("train"))
        _JUDGES[key] = DigitJudge(train.arrays["images"].astype(np.float32) / 255.0, train.arrays["labels"], seed=seed)
    return _JUDGES[key]


def _suite_digits(suites, loaded, ds: Dataset, ev, seed: int, run_) -> dict[str, float]:
    metrics: dict[str, float] = {}
    test = _labelled(ds.split("test"))
    labels = test.arrays["labels"]
    if "m2t.digits" in suites:
        acc, captions = digits.m2t_accuracy(
            loaded.model,
            loaded.prompts,
            loaded.text,
            test.arrays["codes"],
            labels,
            _patches(loaded, test.arrays["images"]),
        )
        metrics["m2t.digits.accuracy"] = acc
        examples = [{"label": int(y), "caption": c} for y, c in zip(labels[:20], captions[:20])]
        run_.log_bytes(json.dumps(examples, indent=2).encode(), "m2t_digits_examples.json", "eval")
    if "m2g.digits" in suites:
        judge = _digit_judge(ds, seed)
        real = test.arrays["images"].astype(np.float32) / 255.0
        metrics["m2g.digits.judge_accuracy_real"] = judge.accuracy(real, labels)
        metrics["m2g.digits.judge_accuracy_tokenized"] = judge.accuracy(loaded.vq.decode(test.arrays["codes"]), labels)
        images, wanted = digits.m2g_generate(
            loaded.model, loaded.prompts, loaded.text, loaded.vq, ev.generations_per_class, ev.temperature, seed
        )
        metrics["m2g.digits.accuracy"] = judge.accuracy(images, wanted)
        order = np.argsort(wanted, kind="stable")
        run_.log_bytes(png_grid(images[order], 10, ev.generations_per_class), "m2g_digits_grid.png", "eval")
    return metrics


def _suite_shapes(suites, loaded, ds: Dataset, ev, seed: int, run_, held=None) -> dict[str, float]:
    """GenEval and VQA on the test split's scenes. With held-out compositions (`held`: scene →
    whether it shows one) the seen scenes give the usual metrics and the held-out ones the same
    metrics prefixed `heldout_`."""
    metrics: dict[str, float] = {}
    test = ds.split("test")
    if test.scenes is None or not any(test.scenes):
        raise DatasetError(f"dataset {ds.uri} has no scenes: was it curated from a shapes source?")
    if not all(test.scenes):  # a mixed dataset: grade the images that carry a scene
        test = test.images_where(np.array([s is not None for s in test.scenes]))
    flags = np.array([bool(held is not None and held(sc)) for sc in test.scenes])
    groups = [("", np.flatnonzero(~flags))] + ([("heldout_", np.flatnonzero(flags))] if flags.any() else [])
    for prefix, rows in groups:
        if "m2g.shapes_geneval" in suites:
            metrics |= _geneval(loaded, test, rows, prefix, ev, seed, run_)
        if "m2t.shapes_vqa" in suites:
            n = rows[: ev.vqa_images]
            m, examples = shapes.vqa(
                loaded.model,
                loaded.prompts,
                loaded.text,
                test.arrays["codes"][n],
                [test.vqa[i] for i in n],
                _patches(loaded, test.arrays["images"][n]),
            )
            metrics |= {k.replace("m2t.shapes_vqa.", f"m2t.shapes_vqa.{prefix}"): v for k, v in m.items()}
            run_.log_bytes(json.dumps(examples, indent=2).encode(), f"m2t_shapes_vqa_{prefix}examples.json", "eval")
    return metrics


def _geneval(loaded, test, rows: np.ndarray, prefix: str, ev, seed: int, run_) -> dict[str, float]:
    """GenEval on the first `promptsPerTask` scenes of each task among `rows` of the test split."""
    idx = rows[shapes.pick_scenes([test.scenes[i] for i in rows], ev.prompts_per_task)]
    scenes = [shapes_data.scene_from_dict(test.scenes[i]) for i in idx]
    m, images, plans = shapes.geneval(
        loaded.model, loaded.prompts, loaded.text, loaded.vq, scenes, ev.temperature, ev.guidance, seed
    )
    metrics = {k.replace("m2g.shapes_geneval.", f"m2g.shapes_geneval.{prefix}"): v for k, v in m.items()}
    # The judge's ceiling on the same prompts: their VQ reconstructions (what a model drawing with
    # this codebook can reach at best; on held-out compositions the codebook, fitted on the train
    # split, may lack their patches) and, on seen scenes, the real renders.
    metrics[f"m2g.shapes_geneval.{prefix}judge_tokenized"] = shapes_judge.evaluate(
        scenes, loaded.vq.decode(test.arrays["codes"][idx])
    )["overall"]
    if prefix:
        return metrics
    real = test.arrays["images"][idx].astype(np.float32) / 255.0
    metrics["m2g.shapes_geneval.judge_real"] = shapes_judge.evaluate(scenes, real)["overall"]
    cols = min(ev.prompts_per_task, 10)
    grid = [j for t in shapes_data.TASKS for j in [i for i, s in enumerate(scenes) if s.task == t][:cols]]
    run_.log_bytes(png_grid(images[grid], len(shapes_data.TASKS), cols), "m2g_shapes_grid.png", "eval")
    shown = [scenes[j].prompt if not plans[j] else {"prompt": scenes[j].prompt, "plan": plans[j]} for j in grid]
    run_.log_bytes(json.dumps(shown, indent=2).encode(), "m2g_shapes_grid_prompts.json", "eval")
    return metrics


class _NoArtifacts:
    """Stands in for the stage run while snapshots are scored: their images are not kept."""

    def log_bytes(self, *args, **kwargs) -> None:
        pass


def _seesaw(loaded, manifest: dict, model_uri: str, suite, ds: Dataset, ev, seed: int, final: dict, run_, log) -> None:
    """Score each snapshot on a fifth of the data; log the headline metrics per step (MLflow
    plots their history) and a PNG of understanding against generation."""
    from safetensors.torch import load

    small = ev.model_copy(
        update={
            "generations_per_class": max(1, ev.generations_per_class // 5),
            "prompts_per_task": max(1, ev.prompts_per_task // 5),
            "vqa_images": max(1, ev.vqa_images // 5),
        }
    )
    keys = seesaw.headlines(ev.suites)
    final_weights = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    points: dict[int, dict[str, float]] = {}
    for snap in manifest["snapshots"]:
        loaded.model.load_state_dict(load(storage.read_file(model_uri, manifest, snap["file"])))
        # a snapshot answers the prompts of the phase it was taken in
        at = dataclasses.replace(
            loaded,
            prompts=Prompts.of(
                loaded.vocab, snap.get("prompts", "plain"), loaded.text.encode, plans=loaded.prompts.plans
            ),
        )
        m = suite(set(ev.suites), at, ds, small, seed, _NoArtifacts())
        points[snap["step"]] = {k: m[k] for k in keys}
        log.info("see-saw step %d: %s", snap["step"], ", ".join(f"{k} {m[k]:.3f}" for k in keys))
    loaded.model.load_state_dict(final_weights)
    points[manifest["steps"]] = {k: final[k] for k in keys}
    for step, values in sorted(points.items()):
        run_.log_metrics({f"seesaw/{k}": v for k, v in values.items()}, step)
    run_.log_bytes(seesaw.plot(points, keys, "understanding vs generation per checkpoint"), "seesaw.png", "eval")


def run(ctx: StageContext, dataset_uri: str, model_uri: str) -> int:
    log = setup_logging()
    spec = ctx.spec.spec
    ev = spec.evaluation
    manifest = storage.read_manifest(model_uri, verify=True)
    if manifest is None:
        raise ModelMissing(f"no model published at {model_uri}")
    ds = Dataset.open(dataset_uri)
    key = cache_key("evaluate", ev.model_dump(mode="json"), manifest["digest"], ds.digest)
    with lineage.stage_run(ctx.run, ctx.step("evaluate"), cache_key=key, code_version=code_version()) as run_:
        t0 = time.perf_counter()
        loaded = load_from_files(read_files(lambda name: storage.read_file(model_uri, manifest, name)))
        run_.log_dataset(ctx.pipeline, ds.digest, dataset_uri, context="evaluation")
        truth = ds.manifest.get("ground_truth") or ds.manifest["source"]  # datasets of 0.1.0 name only the source
        helds = [shapes_data.held_out_predicate(src.held_out) for src in spec.data.sources if src.held_out is not None]
        held = (lambda scene: any(h(scene) for h in helds)) if helds else None
        suite = functools.partial(_suite_shapes, held=held) if truth == "shapes" else _suite_digits
        metrics = suite(set(ev.suites), loaded, ds, ev, spec.training.seed, run_)
        if ev.seesaw and manifest.get("snapshots"):
            _seesaw(loaded, manifest, model_uri, suite, ds, ev, spec.training.seed, metrics, run_, log)
        ok, reasons = gates.check(ev.parsed_gates, metrics)
        for line in reasons:
            log.info("gate %s", line)
        for name, value in sorted(metrics.items()):
            log.info("%s = %.4f", name, value)
        run_.log_metrics(metrics)
        run_.log_metrics({"eval/wall_s": time.perf_counter() - t0})
        run_.set_tags({"nmm.gate": "pass" if ok else "fail", "nmm.gate_reasons": "; ".join(reasons)})
        prefix = f"nmm.metric.{ctx.variant}." if ctx.variant else "nmm.metric."
        run_.set_parent_tags({f"{prefix}{k}": f"{v:.4f}" for k, v in metrics.items()})
        run_.log_params(
            {"variant": ctx.variant or "", "model.fusion": spec.model.fusion, "model.category": spec.model.category}
        )
        report = {"metrics": metrics, "gate": "pass" if ok else "fail", "reasons": reasons, "model_uri": model_uri}
        storage.publish(
            ctx.stage_uri(ctx.step("evaluate")),
            {"report.json": json.dumps(report, indent=2, sort_keys=True).encode()},
            {"kind": "nmm.evaluation", "model_digest": manifest["digest"], "dataset_digest": ds.digest},
        )
        ctx.write_outputs({"gate": "pass" if ok else "fail", "metrics": json.dumps(metrics, sort_keys=True)})
    return 0
