"""Curate: every source → decoded, filtered, deduplicated, split, tokenized sequences in shards,
a per-sample ledger and a data card, manifest last.

Usage (in a pod, or as a local process of the embedded engine):
    nmm stage curate --spec '<pipeline JSON>' --run-id RUN --store s3://bucket --outputs /tmp/outputs

Output parameters: `dataset_uri`, `dataset_digest`, `cache` (hit|miss).
The result is content-addressed: same spec, sources' content (listings with sizes and ETags) and
code → the same cache key → the earlier dataset is reused (after checking it still exists).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from nmm import lineage, modalities, storage
from nmm.data import assemble, datacard, dedup, ledger, ray_transforms, readers, shapes, sources, stream, userdata
from nmm.data.examine import Settings, examine_builtin
from nmm.data.kinds import BUILT_IN as BUILT_IN_SOURCES
from nmm.data.locate import SourceError
from nmm.data.sequences import STYLES, TASKS, Prompts, instruction_texts, pack_rows
from nmm.data.shards import encode_shard
from nmm.data.sources import SourceData
from nmm.stages.context import ModelMissing, StageContext, cache_key, setup_logging
from nmm.tokenizers import ColourMaskVQ, PatchVQ, SharedVocab, TextTokenizer
from nmm.version import code_version

SHARD_IMAGES = 4096  # images per shard
SMALL_INPUT = 2  # units: fewer than this are examined and tokenized in this process (Ray's start-up would dominate)


@dataclass
class Curated:
    """What curation decided, before tokenization."""

    raw: SourceData  # the kept samples
    ids: list[str]  # their content ids
    source_index: np.ndarray  # each kept sample's source, index into the spec's sources
    splits: dict[str, np.ndarray]
    ledger: object  # the Arrow table
    counts: dict
    leakage: dict
    grids: dict  # "keep" or a reason → example images (N, H, W, C) for the MLflow grids


def _settings(data) -> Settings:
    c = data.curation
    side, channels = data.image_shape
    limits = userdata.Limits(
        min_side=c.min_side,
        max_aspect=c.max_aspect,
        blank_std=c.blank_std,
        min_words=c.min_words,
        max_words=c.max_words,
    )
    return Settings(side, channels, limits, {s.label: s.truth for s in data.sources}, signatures=data.dedup != "none")


def _units(data, store: str) -> tuple[list, dict[str, list], dict[str, int]]:
    """Every user source's units, the sources' listings, and each built-in's unit index: all
    numbered in the spec's order of sources (the canonical order). `store://` URIs are in `store`."""
    units, listing, builtin, index = [], {}, {}, 0
    for src in data.sources:
        if src.kind in BUILT_IN_SOURCES:
            builtin[src.label] = index
            index += 1
            continue
        mine, listing[src.label] = readers.units(
            src.model_copy(update={"uri": storage.in_store(src.uri, store)}), index
        )
        units += mine
        index += len(mine)
    return units, listing, builtin


def _builtins(data, settings: Settings, builtin: dict[str, int]) -> tuple[list[dict], dict[str, SourceData]]:
    """The built-in sources, loaded and examined here (small, and clean by construction)."""
    batches, loaded = [], {}
    for src in data.sources:
        if src.label in builtin:
            raw = sources.load(
                src.kind, data.captions_per_image, src.samples, src.image_size, src.seed, data.grounded_on
            )
            loaded[src.label] = raw
            batches.append(
                examine_builtin(
                    src.label, builtin[src.label], raw.images, raw.captions, raw.labels, raw.scenes, settings
                )
            )
    return batches, loaded


def _shards(
    split: str,
    data: SourceData,
    ids: list[str],
    idx: np.ndarray,
    codes,
    drawn,
    text_ids,
    styles: list[Prompts],
    source_index: np.ndarray,
    plans: list[list[int]] | None = None,
) -> list[tuple[str, bytes, int]]:
    """Shards of one split. Rows per image and per prompt style: each caption as M2T and as
    M2G, and each VQA pair as an M2T row (`text_ids[i]` holds the captions' ids, then question,
    answer, question, …). `style[r]` is row r's index in STYLES, `task[r]` its index in TASKS.
    An image read (M2T) is `codes[i]`; one drawn (the M2G target) is `drawn[i]` (the image
    tokenizer's `drawing_codes`: the same picture, coded the way the model draws it), after
    `plans[i]` (its layout's ids) when the prompts have plans."""
    out = []
    ids = [ids[i] for i in idx]
    for start in range(0, len(idx), SHARD_IMAGES):
        part = idx[start : start + SHARD_IMAGES]
        rows, task, style, row_image = [], [], [], []
        for prompts in styles:
            s = STYLES.index(prompts.style)
            for j, i in enumerate(part):
                n_caps = len(data.captions[i])
                for c, cap in enumerate(text_ids[i][:n_caps]):
                    for t, name in enumerate(TASKS):
                        image, plan = (codes if name == "m2t" else drawn)[i], plans[i] if plans is not None else ()
                        rows.append(prompts.row(image, cap, name, k=start + j + c, plan_local=plan))
                        task.append(t)
                        style.append(s)
                        row_image.append(j)
                qa = text_ids[i][n_caps:]
                for q, a in zip(qa[0::2], qa[1::2]):
                    rows.append(prompts.vqa_row(codes[i], q, a))
                    task.append(TASKS.index("m2t"))
                    style.append(s)
                    row_image.append(j)
        tokens, mask = pack_rows(rows)
        arrays = {
            "images": (data.images[part] * 255).round().astype(np.uint8),
            "labels": data.labels[part],
            "source": source_index[part],
            "codes": codes[part],
            "tokens": tokens,
            "loss_mask": mask,
            "task": np.asarray(task, np.int8),
            "style": np.asarray(style, np.int8),
            "row_image": np.asarray(row_image, np.int64),
        }
        meta = {"captions": [data.captions[i] for i in part], "ids": ids[start : start + len(part)]}
        if data.scenes is not None:
            meta["scenes"] = [data.scenes[i] for i in part]
            meta["vqa"] = [[list(p) for p in data.vqa[i]] for i in part]
        blob = encode_shard(arrays, meta)
        out.append((f"shards/{split}-{storage.sha256_hex(blob)[:16]}.safetensors", blob, len(part)))
    return out


def _cached(key: str, index_uri: str, log) -> tuple[str, dict] | None:
    """(dataset URI, manifest) of this namespace's earlier dataset with this cache key, when it is
    still whole and really was made from this key."""
    if not storage.exists(index_uri):
        return None
    prior = storage.read_json(index_uri)["dataset_uri"]
    manifest = storage.read_manifest(prior, verify=True)
    if manifest is None:
        log.info("cache entry %s points at a dataset that is gone; curating again", key)
        return None
    if manifest.get("cache_key") != key:
        log.warning(
            "cache entry %s points at %s, made from cache key %s: not reused", key, prior, manifest.get("cache_key")
        )
        return None
    return prior, manifest


def _key(ctx: StageContext, listing: dict[str, list], version) -> str:
    """What the dataset is a function of: the data and tokenizer spec, every user source's listing
    (URIs, sizes, ETags: changed data is a new key), the filter model's version and digest, and the
    versions of what decides."""
    from importlib.metadata import version as installed  # not the imports: scikit-learn's alone takes a second

    spec = ctx.spec.spec
    return cache_key(
        "curate",
        spec.data.model_dump(mode="json"),
        spec.model.tokenizers.model_dump(mode="json"),
        {
            "dedup": spec.data.dedup,
            "listing": listing,
            "filter_model": None
            if version is None
            else [version.name, version.version, version.tags.get("nmm.model_digest")],
        },
        {
            "sklearn": installed("scikit-learn"),
            "pillow": installed("pillow"),
            "imagehash": installed("ImageHash"),
            "datasketch": installed("datasketch"),
        },
    )


def _engine(units: list) -> str:
    """Ray for the sources' units, in this process when there are too few for Ray to pay off."""
    return "ray" if len(units) >= SMALL_INPUT else "loop"


def _examine(ctx: StageContext, units: list, builtin: dict[str, int], log):
    data = ctx.spec.spec.data
    settings = _settings(data)
    first, loaded = _builtins(data, settings, builtin)
    engine = _engine(units)
    log.info("examining %d built-in source(s) and %d unit(s) of your sources on %s", len(first), len(units), engine)
    return stream.examine(units, settings, first, engine=engine), loaded


def filter_model(ctx: StageContext):
    """The registered model version the model-based filter scores with (None without the filter):
    resolved once, before the cache key, so a moved alias is a new dataset."""
    f = ctx.spec.spec.data.curation.model_filter
    if f is None:
        return None
    name, alias = f.name_alias
    version = lineage.alias_version(name, alias)
    if version is None:
        raise ModelMissing(f"data.curation.modelFilter.model: {f.model} does not exist (no such model or alias)")
    return version


def _align(ctx: StageContext, ex, d: dedup.Decisions, version, log) -> np.ndarray:
    """Score every sample still kept with the filter's model; drop all but the top fraction."""
    from nmm.evaluate.alignment import caption_scores, keep_top
    from nmm.serve.model_dir import ServeError, load_published

    data = ctx.spec.spec.data
    side, channels = data.image_shape
    try:  # the version's folder in the store, every file checked against its manifest (as `nmm serve` reads it)
        loaded, _ = load_published(f"models:/{version.name}/{version.version}", ctx.store)
    except ServeError as exc:
        raise ModelMissing(f"data.curation.modelFilter.model: {exc}") from None
    if tuple(loaded.vq.image_shape) != (side, side, channels):
        raise SourceError(
            f"data.curation.modelFilter.model: {version.name} v{version.version} reads "
            f"{tuple(loaded.vq.image_shape)} images; the sources give {(side, side, channels)}"
        )
    rows = assemble.kept(d.reason)
    captions = [json.loads(ex.cols["captions"][i])[0] for i in rows]
    scores = caption_scores(loaded, ex.pixels(rows).astype(np.float32) / 255.0, captions)
    keep = keep_top(scores, data.curation.model_filter.keep_fraction)
    d.reason[rows[~keep]] = "low_alignment_score"
    alignment = np.full(len(d.reason), np.nan)
    alignment[rows] = scores
    log.info(
        "model filter (%s v%s): kept %d of %d by caption likelihood",
        version.name,
        version.version,
        int(keep.sum()),
        len(rows),
    )
    return alignment


def _decide(ctx: StageContext, ex, version, log) -> tuple[dedup.Decisions, np.ndarray | None]:
    data = ctx.spec.spec.data
    c = data.curation
    d = dedup.decide(
        ex.cols,
        data.dedup,
        radius=c.image_radius,
        caption_dedup=c.caption_dedup,
        threshold=c.caption_threshold,
        train=data.split.train,
        val=data.split.val,
    )
    alignment = _align(ctx, ex, d, version, log) if version is not None else None
    assemble.apply_limits(ex.cols, d.reason, {s.label: s.limit for s in data.sources})
    d.split[[bool(r) for r in d.reason]] = ""
    _hold_out(data, ex.cols, d, log)
    return d, alignment


def _hold_out(data, cols: dict, d: dedup.Decisions, log) -> None:
    """Move every kept scene that shows a held-out composition (its source's `heldOut`) to the
    test split: no training (or validation) prompt or image has it."""
    held = {s.label: shapes.held_out_predicate(s.held_out) for s in data.sources if s.held_out is not None}
    if not held:
        return
    moved = total = 0
    for i, (src, scene) in enumerate(zip(cols["source"], cols["scene"])):
        if src in held and scene and d.split[i] and held[src](json.loads(scene)):
            total += 1
            moved += d.split[i] != "test"
            d.split[i] = "test"
    log.info("held out %d scenes showing held-out compositions (%d moved to test)", total, moved)


def _examples(ex, d: dedup.Decisions, per: int = 32) -> dict:
    """Up to `per` images of the kept samples and of each dropped reason that has pixels."""
    rows: dict[str, list[int]] = {}
    for i in np.flatnonzero(ex.spill_row >= 0):
        mine = rows.setdefault(d.reason[i] or "keep", [])
        if len(mine) < per:
            mine.append(int(i))
    return {name: ex.pixels(r).astype(np.float32) / 255.0 for name, r in rows.items()}


def _curate(ctx: StageContext, units: list, builtin: dict[str, int], version, log) -> Curated:
    """Examine every sample, decide its fate, and gather the kept ones."""
    data = ctx.spec.spec.data
    ex, loaded = _examine(ctx, units, builtin, log)
    try:
        d, alignment = _decide(ctx, ex, version, log)
        table = ledger.table(ex.cols, d, alignment)
        counts = ledger.counts(table)
        empty = [s.label for s in data.sources if counts["sources"].get(s.label, {}).get("kept", 0) == 0]
        if empty:  # nothing is published then, so the reasons go in the message
            dropped = {r: n for r, n in counts["dropped_by_reason"].items() if n}
            raise SourceError(f"data.sources: {empty} kept no samples (dropped: {dropped})")
        rows = assemble.kept(d.reason)
        raw, ids, source_index = assemble.source_data(
            ex, rows, [s.label for s in data.sources], data.captions_per_image, loaded, data.grounded_on
        )
        names = np.array([d.split[i] for i in rows])
        splits = {s: np.flatnonzero(names == s) for s in ("train", "val", "test")}
        return Curated(raw, ids, source_index, splits, table, counts, d.leakage, _examples(ex, d))
    finally:
        stream.cleanup(ex)


def _tokenized(ctx: StageContext, cur: Curated, engine: str, log):
    """Fit the tokenizers on the train split, tokenize every kept sample (on Ray, or in this
    process for a small input, as `_examine` does)."""
    spec = ctx.spec.spec
    raw, splits = cur.raw, cur.splits
    log.info(
        "kept %d of %d samples; split %s; dropped %s",
        cur.counts["kept"],
        cur.counts["kept"] + cur.counts["dropped"],
        {k: len(v) for k, v in splits.items()},
        {k: v for k, v in cur.counts["dropped_by_reason"].items() if v},
    )
    if not len(splits["train"]) or not len(splits["test"]):
        raise SourceError(
            f"data: {len(raw.images)} kept samples leave the train or test split empty "
            f"({ {k: len(v) for k, v in splits.items()} }): add data or loosen data.curation"
        )
    tok = spec.model.tokenizers
    train_idx = splits["train"]
    img = tok.image
    if img.kind == "colour-mask":
        vq = ColourMaskVQ.fit(raw.images[train_idx], img.patch_size, img.colours, img.masks, seed=0)
    else:
        vq = PatchVQ.fit(raw.images[train_idx], img.patch_size, img.codebook_size, seed=0)
    # The instructions of the sft/opd prompts are text too: the tokenizer learns them with the data
    # (and the drawing plans, when there are plans).
    captions = sum(len(raw.captions[i]) for i in train_idx)
    layouts = _layouts(ctx, raw)
    planned = [layouts[i] for i in train_idx] if layouts is not None else []
    text = TextTokenizer.train(
        tok.text.kind, raw.texts(train_idx) + instruction_texts(captions) + planned, tok.text.vocab_size
    )
    vocab = SharedVocab(text_size=text.size, image_size=vq.size)
    log.info(
        "tokenizers: text %d, image codebook %d%s (fitted on train only); shared vocab %d",
        text.size,
        vq.size,
        f" ({' × '.join(map(str, vq.factors))} colours × masks)" if vq.factors else "",
        vocab.size,
    )
    texts = [raw.sample_texts(i) for i in range(len(raw.images))]
    codes, text_ids = ray_transforms.tokenize_samples(raw.images, texts, vq.to_bytes(), text.to_bytes(), engine=engine)
    plans = None if layouts is None else [text.encode(t) for t in layouts]
    return vq, text, vocab, codes, text_ids, plans


def _layouts(ctx: StageContext, raw: SourceData) -> list[str] | None:
    """Each sample's drawing plan (its scene's layout in words; "" for a sample without a
    scene), when data.drawPlans asks for plans."""
    data = ctx.spec.spec.data
    if data.draw_plans == "none":
        return None
    side = data.image_shape[0]
    return [
        shapes.layout(shapes.scene_from_dict(sc), side) if sc else "" for sc in (raw.scenes or [None] * len(raw.images))
    ]


def _stats(cur: Curated) -> dict:
    c = cur.counts
    return {
        "samples": c["kept"] + c["dropped"],
        "kept": c["kept"],
        "duplicates_dropped": sum(
            c["dropped_by_reason"][r] for r in ("exact_duplicate", "near_duplicate", "caption_near_duplicate")
        ),
        **{f"{k}_images": int(len(v)) for k, v in cur.splits.items()},
    }


def _mixture(ctx: StageContext, cur: Curated) -> dict:
    """Each source's share of a training epoch (its weight over the sum, among sources with train rows)."""
    data = ctx.spec.spec.data
    present = set(cur.source_index[cur.splits["train"]].tolist())
    total = sum(s.weight for i, s in enumerate(data.sources) if i in present)
    return {s.label: (s.weight / total if i in present else 0.0) for i, s in enumerate(data.sources)}


def _publish(
    ctx: StageContext, key: str, units: list, builtin: dict[str, int], listing: dict, version, log
) -> tuple[str, dict, Curated]:
    """Curate and publish the dataset (shards, tokenizers, ledger, data card; manifest last)."""
    cur = _curate(ctx, units, builtin, version, log)
    vq, text, vocab, codes, text_ids, plans = _tokenized(ctx, cur, _engine(units), log)
    mixture = _mixture(ctx, cur)
    card = datacard.markdown(ctx.spec.spec.data, listing, cur.counts, cur.leakage, mixture, key)
    files = {
        modalities.modality("text").tokenizer_file: text.to_bytes(),
        modalities.modality("image").tokenizer_file: vq.to_bytes(),
        ledger.FILE: ledger.to_bytes(cur.ledger),
        datacard.FILE: card.encode(),
    }
    styles = [Prompts.of(vocab, s, text.encode, plans=plans is not None) for s in STYLES]
    shard_list, drawn = [], vq.drawing_codes(codes)
    for name, idx in cur.splits.items():
        for fname, blob, count in _shards(
            name, cur.raw, cur.ids, idx, codes, drawn, text_ids, styles, cur.source_index, plans
        ):
            files[fname] = blob
            shard_list.append({"file": fname, "split": name, "images": count})
    truths = {s.truth for s in ctx.spec.spec.data.sources} - {None}
    out_uri = ctx.stage_uri("curate")
    manifest = storage.publish(
        out_uri,
        files,
        {
            "kind": "nmm.dataset",
            "source": cur.raw.name,
            "ground_truth": truths.pop() if len(truths) == 1 else None,
            "sources": [
                {
                    "name": s.label,
                    "kind": s.kind,
                    "uri": s.uri,
                    "weight": s.weight,
                    "objects": len(listing.get(s.label, [])),
                }
                for s in ctx.spec.spec.data.sources
            ],
            "mixture": mixture,
            "cache_key": key,
            "vocab": vocab.manifest(),
            "tokens_per_image": vq.tokens_per_image,
            "draw_plans": ctx.spec.spec.data.draw_plans,
            "image_shape": list(vq.image_shape),
            "shards": shard_list,
            "stats": _stats(cur),
            "curation": {"counts": cur.counts, "leakage": cur.leakage, "dedup": ctx.spec.spec.data.dedup},
        },
        exclusive=True,
    )  # of two attempts racing on this run's folder exactly one commits (R21)
    return out_uri, manifest, cur


def _log_curation(run, cur: Curated, manifest: dict) -> None:
    """Counts as metrics, example grids and the data card as artifacts."""
    from nmm.evaluate.grid import png_grid

    c = cur.counts
    metrics = {
        "curate.kept": c["kept"],
        "curate.dropped": c["dropped"],
        **{f"curate.dropped.{r}": n for r, n in c["dropped_by_reason"].items()},
        **{f"curate.source.{s}.samples": v["samples"] for s, v in c["sources"].items()},
        **{f"curate.source.{s}.kept": v["kept"] for s, v in c["sources"].items()},
        **{f"curate.leakage.{k}": v for k, v in cur.leakage.items()},
        **{f"curate.mixture.{s}": w for s, w in manifest["mixture"].items()},
    }
    run.log_metrics(metrics | {f"data/{k}": v for k, v in manifest["stats"].items()})
    for name, images in cur.grids.items():
        cols = 8
        run.log_bytes(png_grid(images, -(-len(images) // cols), cols), f"{name}.png", "curate/examples")


def run(ctx: StageContext) -> None:
    log = setup_logging()
    units, listing, builtin = _units(ctx.spec.spec.data, ctx.store)
    version = filter_model(ctx)
    key = _key(ctx, listing, version)
    index_uri = ctx.cache_index_uri("curate", key)
    with lineage.stage_run(ctx.run, "curate", cache_key=key, code_version=code_version()) as run:
        hit = _cached(key, index_uri, log)
        if hit is not None:
            uri, manifest = hit
            log.info("cache hit: %s (key %s)", uri, key)
        else:
            t0 = time.perf_counter()
            try:
                uri, manifest, cur = _publish(ctx, key, units, builtin, listing, version, log)
            finally:
                ray_transforms.shutdown()
            storage.write_json(index_uri, {"dataset_uri": uri, "digest": manifest["digest"]})
            run.log_params(
                {
                    "data.source": manifest["source"],
                    "data.dedup": ctx.spec.spec.data.dedup,
                    "vocab.size": SharedVocab(**manifest["vocab"]).size,
                }
            )
            _log_curation(run, cur, manifest)
            run.log_bytes(storage.read_file(uri, manifest, datacard.FILE), datacard.FILE, "curate")
            log.info("published %s (%s) in %.1fs", uri, manifest["digest"], time.perf_counter() - t0)
        cache = "miss" if hit is None else "hit"
        run.set_tags({"nmm.cache": cache})
        run.log_dataset(ctx.pipeline, manifest["digest"], uri)
        ctx.write_outputs({"dataset_uri": uri, "dataset_digest": manifest["digest"], "cache": cache})
