"""Curation of users' shards (issue 11): every planted fault lands in the ledger with its reason,
every clean sample is kept, near-duplicates never straddle splits, and the ledger is the same
bytes whatever order the units come back in. The per-unit work runs in this process here (the
`loop` engine); tests/integration/test_curate_sources.py runs it on Ray, through S3."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from nmm.data import dedup, ledger, readers, signatures, stream, userdata
from nmm.data.curate import split_of
from nmm.data.examine import Settings, examine_builtin
from nmm.data.locate import SourceError, expand_braces, find
from nmm.data.sources import load_digits
from nmm.spec.data import Source
from tests import curation_fixture as fx

RADIUS = 6


def settings() -> Settings:
    return Settings(32, 3, userdata.Limits(), {"web": None})


def write(folder) -> None:
    for name, data in fx.shards(RADIUS).items():
        (folder / name).write_bytes(data)


def curate(uri: str, engine: str = "loop", reverse: bool = False):
    units, _ = readers.units(Source(kind="webdataset", name="web", uri=uri))
    ex = stream.examine(units[::-1] if reverse else units, settings(), engine=engine)
    d = dedup.decide(ex.cols, "near", radius=RADIUS, caption_dedup=True, threshold=0.9, train=0.7, val=0.1)
    return ex, d


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write(folder)
    ex, d = curate(f"{folder}/shard-{{000000..000002}}.tar")
    return folder, ex, d, {k: (r, dup) for k, r, dup in zip(ex.cols["key"], d.reason, d.duplicate_of)}


def test_every_planted_sample_has_its_reason_and_every_clean_one_is_kept(curated):
    _, ex, d, rows = curated
    for key, (reason, dup_of) in fx.EXPECTED.items():
        assert key in rows, f"{key} missing from the ledger"
        assert rows[key][0] == reason, f"{key}: {rows[key][0]!r}, expected {reason!r}"
        if dup_of:
            assert rows[key][1] == dup_of
    assert set(rows) == set(fx.EXPECTED) | set(fx.CLEAN_KEYS)  # one row per input sample, nothing else
    assert all(rows[k] == ("", "") for k in fx.CLEAN_KEYS)
    assert ex.spill_row[[list(ex.cols["key"]).index(k) for k in fx.CLEAN_KEYS]].min() >= 0  # their pixels kept


def test_the_ledger_names_every_sample_once_with_scores_and_splits(curated):
    _, ex, d, _ = curated
    table = ledger.from_bytes(ledger.to_bytes(ledger.table(ex.cols, d)))
    got = table.to_pylist()
    assert len(got) == len(fx.EXPECTED) + len(fx.CLEAN_KEYS) == len({r["key"] for r in got})
    assert all((r["decision"] == "keep") == (r["reason"] is None) for r in got)
    assert all(r["split"] in ("train", "val", "test") for r in got if r["decision"] == "keep")
    assert all(r["split"] is None for r in got if r["decision"] == "drop")
    near = {r["key"]: r for r in got if r["reason"] == "near_duplicate"}
    assert len(near) == 3 and all(0 <= r["hamming"] <= RADIUS for r in near.values())
    assert [r for r in got if r["reason"] == "caption_near_duplicate"][0]["caption_jaccard"] == 1.0
    counts = ledger.counts(table)
    assert counts["kept"] == len(fx.CLEAN_KEYS) and counts["dropped_by_reason"]["decode_error"] == 6
    assert counts["sources"] == {"web": {"samples": len(got), "kept": len(fx.CLEAN_KEYS)}}


def test_near_duplicate_clusters_never_straddle_splits_and_the_naive_leakage_is_reported(curated):
    _, ex, d, _ = curated
    kept = [i for i, r in enumerate(d.reason) if not r]
    hashes = {i: int(ex.cols["phash"][i]) for i in kept}
    for a, b in itertools.combinations(kept, 2):  # no two kept images are near-duplicates, in any split
        assert signatures.hamming(hashes[a], hashes[b]) > RADIUS
    # What a naive per-sample split would have leaked, counted by brute force.
    alive = [i for i, r in enumerate(d.reason) if r in ("", "near_duplicate", "caption_near_duplicate")]
    naive = {i: split_of(ex.cols["content_id"][i], 0.7, 0.1) for i in alive}
    leaked = {
        a if naive[a] == "test" else b
        for a, b in itertools.combinations(alive, 2)
        if {naive[a], naive[b]} == {"train", "test"}
        and signatures.hamming(int(ex.cols["phash"][a]), int(ex.cols["phash"][b])) <= RADIUS
    }
    assert d.leakage["naive_test_with_train_near_duplicate"] == len(leaked)
    assert d.leakage["naive_test_samples"] == sum(1 for s in naive.values() if s == "test")


def test_the_ledger_is_the_same_bytes_whatever_order_units_come_back_in(curated):
    folder, ex, d, _ = curated
    again, d2 = curate(f"file://{folder}/*.tar", reverse=True)
    assert ledger.to_bytes(ledger.table(again.cols, d2)) == ledger.to_bytes(ledger.table(ex.cols, d))


def test_exact_dedup_drops_identical_images_first_one_wins():
    d = load_digits(1)
    images = np.concatenate([d.images[:20], d.images[:5]])
    s = Settings(8, 1, userdata.Limits(), {"digits": "digits"})
    batch = examine_builtin(
        "digits", 0, images, d.captions[:20] + d.captions[:5], np.concatenate([d.labels[:20], d.labels[:5]]), None, s
    )
    out = dedup.decide(batch, "exact", radius=RADIUS, caption_dedup=True, threshold=0.9, train=0.7, val=0.1)
    assert list(out.reason[20:]) == ["exact_duplicate"] * 5 and not any(out.reason[:20])
    assert list(out.duplicate_of[20:]) == [f"digits-{i:08d}" for i in range(5)]


def test_brace_ranges_globs_and_missing_data_are_clear(tmp_path):
    assert list(expand_braces("s-{008..011}.tar")) == ["s-008.tar", "s-009.tar", "s-010.tar", "s-011.tar"]
    assert list(expand_braces("{a,b}/x{1..2}")) == ["a/x1", "a/x2", "b/x1", "b/x2"]
    write(tmp_path)
    assert len(find("webdataset", "web", f"{tmp_path}/*.tar")) == 3
    assert len(find("webdataset", "web", str(tmp_path))) == 3  # a folder: every shard under it
    with pytest.raises(SourceError, match=r"data.sources\[web\].uri: .* matches no .tar shards"):
        find("webdataset", "web", f"{tmp_path}/nothing-*.tar")
    with pytest.raises(SourceError, match="shard-000003.tar, which does not exist"):
        find("webdataset", "web", f"{tmp_path}/shard-{{000000..000007}}.tar")


def test_parquet_and_folder_sources_read_the_same_samples(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [fx.encode(fx.picture(s)) for s in range(6)]
    caps = [fx.caption(s) for s in range(6)]
    pq.write_table(pa.table({"jpeg": images, "text": caps}), tmp_path / "part-0.parquet")
    (tmp_path / "imgs").mkdir()
    for i, data in enumerate(images):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(data)
    (tmp_path / "imgs" / "captions.jsonl").write_text(
        "\n".join(f'{{"file": "{i}.png", "caption": "{c}"}}' for i, c in enumerate(caps[:5]))
    )
    (tmp_path / "imgs" / "5.txt").write_text(caps[5])  # a .txt beside the image works too
    got = {}
    for src in (
        Source(kind="parquet", name="web", uri=f"{tmp_path}/*.parquet", columns={"image": "jpeg", "caption": "text"}),
        Source(kind="folder", name="web", uri=f"{tmp_path}/imgs"),
    ):
        units, listing = readers.units(src)
        ex = stream.examine(units, settings(), engine="loop")
        assert list(ex.cols["reason"]) == [""] * 6, ex.cols["detail"]
        got[src.kind] = sorted(ex.cols["content_id"])
    assert got["parquet"] == got["folder"]


def test_a_parquet_file_without_the_columns_is_one_ledger_row_not_a_crash(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"pixels": [b"x"], "caption": ["y"]}), tmp_path / "p.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    units, _ = readers.units(Source(kind="parquet", name="web", uri=str(tmp_path)))
    ex = stream.examine(units, settings(), engine="loop")
    assert list(ex.cols["reason"]) == ["decode_error", "decode_error"]
    assert "no column(s) ['image']" in ex.cols["detail"][1] or "no column(s) ['image']" in ex.cols["detail"][0]


def test_the_model_filter_keeps_the_top_fraction_ties_by_position():
    from nmm.evaluate.alignment import keep_top

    scores = np.array([-1.0, -3.0, -1.0, -0.5, -2.0, -1.0])
    assert keep_top(scores, 0.5).tolist() == [True, False, True, True, False, False]
    assert keep_top(scores, 0.01).tolist() == [False, False, False, True, False, False]  # at least one
    assert keep_top(scores, 1.0).all()


def test_ground_truth_a_source_promises_is_checked_per_sample(tmp_path):
    from nmm.data.sources import render_shapes

    good = render_shapes(1, 32, 0, 1)
    scene = good.scenes[0]
    pixels = (good.images[0] * 255).astype(np.uint8)
    hostile = dict(scene, objects=[{"shape": "circle", "colour": "red", "cx": "$(id)", "cy": 1, "size": 8}])
    (tmp_path / "s.tar").write_bytes(
        fx.tar(
            [
                (
                    "ok",
                    {
                        "png": fx.encode(pixels),
                        "json": json.dumps({"caption": "a red circle", "scene": scene}).encode(),
                    },
                ),
                ("no-scene", {"png": fx.encode(pixels), "json": b'{"caption": "a red circle"}'}),
                (
                    "bad-scene",
                    {
                        "png": fx.encode(pixels),
                        "json": json.dumps({"caption": "a red circle", "scene": hostile}).encode(),
                    },
                ),
            ]
        )
    )
    units, _ = readers.units(Source(kind="webdataset", name="web", uri=str(tmp_path), groundTruth="shapes"))
    s = Settings(32, 3, userdata.Limits(), {"web": "shapes"})
    ex = stream.examine(units, s, engine="loop")
    got = dict(zip([k.split("/")[-1] for k in ex.cols["key"]], zip(ex.cols["reason"], ex.cols["detail"])))
    assert got["ok"] == ("", "")
    assert got["no-scene"][0] == got["bad-scene"][0] == "decode_error"
    assert "cx, cy, size are numbers" in got["bad-scene"][1]


def test_source_weights_set_each_sources_share_of_the_batches_whatever_its_size():
    from types import SimpleNamespace

    from nmm.train.batches import batch_indices, source_probs

    row_source = np.array([0] * 900 + [1] * 100)  # source 0 has 9x the rows …
    pools = {"m2t": np.arange(1000), "m2g": np.arange(0, 1000, 2)}
    probs = source_probs(pools, row_source, {0: 1.0, 1: 3.0})  # … source 1 three times the weight
    phase = SimpleNamespace(mixture={"m2t": 0.5, "m2g": 0.5}, batch_size=64)
    drawn = np.concatenate([batch_indices(pools, phase, 0, step, probs) for step in range(1, 301)])
    share = float((row_source[drawn] == 1).mean())
    assert abs(share - 0.75) < 0.02, share
    again = np.concatenate([batch_indices(pools, phase, 0, step, probs) for step in range(1, 301)])
    assert np.array_equal(drawn, again)  # a pure function of (seed, step), as before
    uniform = np.concatenate([batch_indices(pools, phase, 0, step) for step in range(1, 301)])
    assert abs(float((row_source[uniform] == 1).mean()) - 0.1) < 0.02  # no weights: rows drawn evenly


def test_the_train_stage_reads_the_mixture_from_the_manifest_and_logs_what_it_drew():
    from types import SimpleNamespace

    from nmm.stages.train import _mixture, _realised_mixture
    from nmm.train.batches import TrainData
    from nmm.train.trainer import PhaseConfig

    manifest = {"sources": [{"name": "shapes"}, {"name": "web"}], "mixture": {"shapes": 0.75, "web": 0.25}}
    ds = SimpleNamespace(manifest=manifest)
    images = np.array([0] * 50 + [1] * 150)  # per image: its source
    a = {"source": images, "row_image": np.repeat(np.arange(200), 2)}  # two rows an image
    mix = _mixture(ds, a)
    assert mix["source_weights"] == {0: 0.75, 1: 0.25} and len(mix["row_source"]) == 400
    data = TrainData(
        tokens=np.zeros((400, 4), np.int64),
        loss_mask=np.ones((400, 4), np.int64),
        task=np.tile([0, 1], 200),
        image_range=(10, 20),
        **mix,
    )
    phase = PhaseConfig(name="p", steps=200, batch_size=32, lr=1e-3, mixture={"m2t": 0.5, "m2g": 0.5})
    got = _realised_mixture(ds, data, SimpleNamespace(phases=(phase,), total_steps=200, seed=0))
    assert abs(got["mixture.realised.shapes"] - 0.75) < 0.03 and abs(sum(got.values()) - 1.0) < 1e-9
    assert _mixture(SimpleNamespace(manifest={"mixture": {"digits": 1.0}}), a) == {}  # one source: rows drawn evenly
