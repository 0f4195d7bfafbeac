"""Curate: raw sources → deduplicated, split, tokenized sequences in shards + a manifest.

Usage (in a pod, or as a local process of the embedded engine):
    nmm stage curate --spec '<pipeline JSON>' --run-id RUN --store s3://bucket --outputs /tmp/outputs

Output parameters: `dataset_uri`, `dataset_digest`, `cache` (hit|miss).
The result is content-addressed: same spec, sources and code → the same cache key → the earlier
dataset is reused (after checking it still exists) and nothing new is written.
"""

from __future__ import annotations

import time

import numpy as np

from nmm import lineage, storage
from nmm.data import curate, ray_transforms, sources
from nmm.data.sequences import STYLES, TASKS, Prompts, instruction_texts, pack_rows
from nmm.data.shards import encode_shard
from nmm.data.sources import SourceData
from nmm.stages.context import StageContext, cache_key, setup_logging
from nmm.tokenizers import PatchVQ, SharedVocab, TextTokenizer
from nmm.version import code_version

SHARD_IMAGES = 4096  # images per shard


def _load(ctx: StageContext) -> SourceData:
    data = ctx.spec.spec.data
    src = data.sources[0]
    return sources.load(src.kind, data.captions_per_image, src.samples, src.image_size, src.seed)


def _key(ctx: StageContext) -> str:
    import sklearn

    spec = ctx.spec.spec
    return cache_key(
        "curate",
        spec.data.model_dump(mode="json"),
        spec.model.tokenizers.model_dump(mode="json"),
        {"sklearn": sklearn.__version__},
    )


def _shards(split: str, data: SourceData, ids: list[str], idx: np.ndarray, codes, text_ids, styles: list[Prompts]) -> list[tuple[str, bytes, int]]:
    """Shards of one split. Rows per image and per prompt style: each caption as M2T and as
    M2G, and each VQA pair as an M2T row (`text_ids[i]` holds the captions' ids, then question,
    answer, question, …). `style[r]` is row r's index in STYLES, `task[r]` its index in TASKS."""
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
                        rows.append(prompts.row(codes[i], cap, name, k=start + j + c))
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
        log.warning("cache entry %s points at %s, made from cache key %s: not reused", key, prior, manifest.get("cache_key"))
        return None
    return prior, manifest


def _tokenized(ctx: StageContext, log):
    """Load the source, dedup, split, fit the tokenizers on the train split, tokenize on Ray."""
    spec = ctx.spec.spec
    raw = _load(ctx)
    log.info("loaded %d samples from %s", len(raw.images), raw.name)
    dropped = 0
    if spec.data.curation.dedup == "exact":
        raw, dropped = curate.dedup_exact(raw)
        log.info("exact dedup dropped %d duplicates", dropped)
    limit = spec.data.sources[0].limit
    if limit and len(raw.images) > limit:
        raw = raw.subset(range(limit))
    ids = curate.content_ids(raw.images)  # hashed once: split by them, and name samples with them
    splits = curate.split(ids, spec.data.split.train, spec.data.split.val)
    log.info("split: %s", {k: len(v) for k, v in splits.items()})
    tok = spec.model.tokenizers
    train_idx = splits["train"]
    vq = PatchVQ.fit(raw.images[train_idx], tok.image.patch_size, tok.image.codebook_size, seed=0)
    # The instructions of the sft/opd prompts are text too: the tokenizer learns them with the data.
    captions = sum(len(raw.captions[i]) for i in train_idx)
    text = TextTokenizer.train(tok.text.kind, raw.texts(train_idx) + instruction_texts(captions), tok.text.vocab_size)
    vocab = SharedVocab(text_size=text.size, image_size=vq.size)
    log.info("tokenizers: text %d, image codebook %d (fitted on train only); shared vocab %d", text.size, vq.size, vocab.size)
    texts = [raw.sample_texts(i) for i in range(len(raw.images))]
    codes, text_ids = ray_transforms.tokenize_samples(raw.images, texts, vq.to_bytes(), text.to_bytes())
    ray_transforms.shutdown()
    stats = {"samples": int(len(raw.images)), "duplicates_dropped": int(dropped), **{f"{k}_images": int(len(v)) for k, v in splits.items()}}
    return raw, ids, splits, vq, text, vocab, codes, text_ids, stats


def _publish(ctx: StageContext, key: str, log) -> tuple[str, dict, dict]:
    """Curate and publish the dataset (shards, tokenizers, manifest last): (URI, manifest, stats)."""
    raw, ids, splits, vq, text, vocab, codes, text_ids, stats = _tokenized(ctx, log)
    files = {"text_tokenizer.json": text.to_bytes(), "image_tokenizer.safetensors": vq.to_bytes()}
    styles = [Prompts.of(vocab, s, text.encode) for s in STYLES]
    shard_list = []
    for name, idx in splits.items():
        for fname, blob, count in _shards(name, raw, ids, idx, codes, text_ids, styles):
            files[fname] = blob
            shard_list.append({"file": fname, "split": name, "images": count})
    out_uri = ctx.stage_uri("curate")
    manifest = storage.publish(out_uri, files, {
        "kind": "nmm.dataset",
        "source": raw.name,
        "cache_key": key,
        "vocab": {"text_size": vocab.text_size, "image_size": vocab.image_size},
        "tokens_per_image": vq.tokens_per_image,
        "image_shape": list(vq.image_shape),
        "shards": shard_list,
        "stats": stats,
    })
    return out_uri, manifest, stats


def run(ctx: StageContext) -> None:
    log = setup_logging()
    key = _key(ctx)
    index_uri = ctx.cache_index_uri("curate", key)
    with lineage.stage_run(ctx.run, "curate", cache_key=key, code_version=code_version()) as run:
        hit = _cached(key, index_uri, log)
        if hit is not None:
            uri, manifest = hit
            log.info("cache hit: %s (key %s)", uri, key)
        else:
            t0 = time.perf_counter()
            uri, manifest, stats = _publish(ctx, key, log)
            storage.write_json(index_uri, {"dataset_uri": uri, "digest": manifest["digest"]})
            run.log_params({"data.source": manifest["source"], "data.dedup": ctx.spec.spec.data.curation.dedup,
                            "vocab.size": SharedVocab(**manifest["vocab"]).size})
            run.log_metrics({f"data/{k}": v for k, v in stats.items()})
            log.info("published %s (%s) in %.1fs", uri, manifest["digest"], time.perf_counter() - t0)
        cache = "miss" if hit is None else "hit"
        run.set_tags({"nmm.cache": cache})
        run.log_dataset(ctx.pipeline, manifest["digest"], uri)
        ctx.write_outputs({"dataset_uri": uri, "dataset_digest": manifest["digest"], "cache": cache})
