"""The data card: what a dataset was made from and what curation did to it, as Markdown (logged to
MLflow and published with the dataset; no timestamps, so it is part of the same digest)."""

from __future__ import annotations

import hashlib
import json

FILE = "datacard.md"


def listing_digest(objects: list) -> str:
    """One digest of a source's listing (URIs, sizes, ETags)."""
    return hashlib.sha256(json.dumps(objects, sort_keys=True).encode()).hexdigest()[:16]


def markdown(data, listing: dict[str, list], counts: dict, leakage: dict, mixture: dict, key: str) -> str:
    c = data.curation
    lines = [
        "# Data card",
        "",
        f"Cache key `{key}`.",
        "",
        "## Sources",
        "",
        "| source | kind | uri | objects | listing digest | weight | mixture share | samples | kept |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in data.sources:
        objs = listing.get(s.label, [])
        got = counts["sources"].get(s.label, {"samples": 0, "kept": 0})
        lines.append(
            f"| {s.label} | {s.kind} | {s.uri or '(built in)'} | {len(objs) or '-'} | "
            f"{listing_digest(objs) if objs else '-'} | {s.weight:g} | {mixture.get(s.label, 0):.3f} | "
            f"{got['samples']} | {got['kept']} |"
        )
    lines += [
        "",
        "## Filters",
        "",
        f"- dedup: **{data.dedup}** (image radius {c.image_radius} bits of a 64-bit pHash; caption dedup "
        f"{'on' if c.caption_dedup else 'off'}, Jaccard >= {c.caption_threshold:g})",
        f"- images: shorter side >= {c.min_side} px, aspect <= {c.max_aspect:g}, pixel std >= {c.blank_std:g}; "
        f"resized and centre-cropped to {data.image_shape[0]} px, {data.image_shape[1]} channel(s)",
        f"- captions: {c.min_words}..{c.max_words} words",
        (
            f"- model filter: {c.model_filter.model}, keep the top {c.model_filter.keep_fraction:g} by caption "
            "likelihood given the image"
            if c.model_filter
            else "- model filter: none"
        ),
        f"- split: train {data.split.train:g}, val {data.split.val:g}, test {data.split.test:g} "
        "(by content hash; near-duplicates never straddle splits under `near`)",
        "",
        "## Counts",
        "",
        f"- kept: **{counts['kept']}**, dropped: **{counts['dropped']}**",
    ]
    lines += [f"- {r}: {n}" for r, n in counts["dropped_by_reason"].items() if n]
    if leakage:
        lines += [
            "",
            "## Leakage",
            "",
            f"A naive per-sample split of the same samples would have put "
            f"**{leakage['naive_test_with_train_near_duplicate']}** of its {leakage['naive_test_samples']} test "
            f"samples ({leakage['naive_leakage_fraction']:.1%}) next to a near-duplicate image in train."
            + (" Under `near` dedup this dataset has none." if data.dedup == "near" else ""),
        ]
    return "\n".join(lines) + "\n"
