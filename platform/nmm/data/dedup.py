"""The decisions that need every sample: exact and near duplicates, the split, and the leakage a
naive split would have had. They read only the small columns (hashes, signatures: ~600 bytes a
sample), never pixels, and follow the canonical order (first one wins), so Ray's parallelism and
block order cannot change them.

- exact: identical decoded pixels (`content_id`); the first is kept.
- near: then an image within `radius` bits of pHash of a kept image is a `near_duplicate`, and a
  caption with estimated Jaccard >= `threshold` to a kept caption a `caption_near_duplicate`;
  each names the kept sample it duplicates. Kept samples are never near-duplicates of each other,
  so a cluster (kept sample + its duplicates) has one member in the splits: none straddles.
- leakage: under a naive per-sample split of the same samples, how many test samples would have a
  near-duplicate image in train (exactly what `near` prevents; with `exact`, what remains).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nmm.data import signatures
from nmm.data.curate import split_of

PAIR_CHUNK = 1024  # rows of a big bucket compared with the rest at a time (bounds memory, not work)


@dataclass
class Decisions:
    reason: np.ndarray  # final reason per row ("" = keep)
    duplicate_of: np.ndarray  # the kept sample's key, for duplicates
    hamming: np.ndarray  # bits to the kept image a near_duplicate matched (-1: none)
    caption_jaccard: np.ndarray  # estimated Jaccard to the kept caption a caption_near_duplicate matched
    split: np.ndarray  # train | val | test for kept rows, "" otherwise
    leakage: dict = field(default_factory=dict)


def _exact(cols: dict, d: Decisions) -> None:
    first: dict[str, int] = {}
    for i, cid in enumerate(cols["content_id"]):
        if d.reason[i]:
            continue
        if cid in first:
            d.reason[i], d.duplicate_of[i] = "exact_duplicate", cols["key"][first[cid]]
        else:
            first[cid] = i


def _pairs_within(groups: list[np.ndarray], close) -> list[tuple[int, int]]:
    """(lower, higher) pairs of items sharing a bucket that `close(a, b)` accepts."""
    found = []
    for g in groups:
        for start in range(0, len(g) - 1, PAIR_CHUNK):  # a big bucket: a slice of its items at a time
            ii = np.arange(start, min(start + PAIR_CHUNK, len(g) - 1))
            counts = len(g) - 1 - ii  # item i pairs with every later item of the bucket
            a = np.repeat(ii, counts)
            b = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(ii + 1, counts)
            a, b = g[a], g[b]
            ok = close(a, b)
            found += zip(a[ok].tolist(), b[ok].tolist())
    return found


def _buckets(keys: np.ndarray) -> list[np.ndarray]:
    """Indices of `keys` grouped by equal key (groups of two or more)."""
    order = np.argsort(keys, kind="stable")
    cuts = np.flatnonzero(keys[order][1:] != keys[order][:-1]) + 1
    return [part for part in np.split(order, cuts) if len(part) > 1]


_MIX = np.random.default_rng(20_261_130).integers(1, 2**63, size=512, dtype=np.uint64) | np.uint64(1)


def _unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct rows, each input's index among them): identical hashes are compared once. Rows
    are grouped by a 64-bit fingerprint (one sort of integers, not of whole rows), and every group
    is then checked member by member, so a fingerprint collision cannot merge different rows."""
    flat = values.reshape(len(values), -1).astype(np.uint64)
    if flat.shape[1] == 1:
        uniq, inverse = np.unique(flat[:, 0], return_inverse=True)
        return uniq.reshape((len(uniq), *values.shape[1:])), inverse
    with np.errstate(over="ignore"):
        fp = (flat * _MIX[: flat.shape[1]]).sum(axis=1, dtype=np.uint64)
    _, first, inverse = np.unique(fp, return_index=True, return_inverse=True)
    if not (flat == flat[first[inverse]]).all():  # a collision: fall back to comparing whole rows
        uniq, inverse = np.unique(flat, axis=0, return_inverse=True)
        return uniq.reshape((len(uniq), *values.shape[1:])), inverse.reshape(-1)
    return values[first], inverse


def image_edges(hashes: np.ndarray, radius: int) -> list[tuple[int, int]]:
    """Pairs of distinct 64-bit hashes that differ in at most `radius` bits: exact multi-index
    hashing (radius + 1 bands: two hashes that close agree on one band, by pigeonhole), each
    band's buckets compared inside, vectorized."""
    h = hashes.astype(np.uint64)
    cuts = [round(i * 64 / (radius + 1)) for i in range(radius + 2)]
    close = lambda a, b: np.bitwise_count(h[a] ^ h[b]) <= radius
    edges: set[tuple[int, int]] = set()
    for lo, hi in zip(cuts, cuts[1:]):
        band = (h >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        edges.update(_pairs_within(_buckets(band), close))
    return sorted(edges)


def caption_edges(sigs: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Pairs of distinct MinHash signatures whose estimated Jaccard is at least `threshold`: LSH
    bands (datasketch's choice of bands and rows), candidates checked on the signatures."""
    bands, per = signatures.lsh_shape(threshold)
    close = lambda a, b: (sigs[a] == sigs[b]).mean(axis=1) >= threshold
    edges: set[tuple[int, int]] = set()
    for b in range(bands):
        _, keys = _unique(np.ascontiguousarray(sigs[:, b * per : (b + 1) * per]))
        edges.update(_pairs_within(_buckets(keys), close))
    return sorted(edges)


def _greedy(group: np.ndarray, edges: list[tuple[int, int]], alive: np.ndarray) -> dict[int, int]:
    """Walk the rows in canonical order. A row whose group (identical hash) already has a kept row
    duplicates it; else one whose group has an edge to a group with a kept row duplicates the
    earliest such; else it is kept. Returns {duplicate row: kept row}; `alive` updated."""
    near: dict[int, list[int]] = {}
    for a, b in edges:
        near.setdefault(a, []).append(b)
        near.setdefault(b, []).append(a)
    kept_in: dict[int, int] = {}
    dup: dict[int, int] = {}
    for r in np.flatnonzero(alive):
        g = int(group[r])
        if g in kept_in:
            dup[int(r)] = kept_in[g]
            continue
        matches = [kept_in[h] for h in near.get(g, ()) if h in kept_in]
        if matches:
            dup[int(r)] = min(matches)
        else:
            kept_in[g] = int(r)
    for r in dup:
        alive[r] = False
    return dup


def leakage(group: np.ndarray, edges: list[tuple[int, int]], naive: np.ndarray) -> dict:
    """Test samples of a naive per-sample split with a near-duplicate image (identical hash, or
    within the radius) among its train samples."""
    has_train = np.zeros(int(group.max()) + 1 if len(group) else 0, bool)
    np.logical_or.at(has_train, group[naive == "train"], True)
    touches = has_train.copy()
    for a, b in edges:
        touches[a] |= has_train[b]
        touches[b] |= has_train[a]
    test = naive == "test"
    leaked = int((test & touches[group]).sum()) if len(group) else 0
    tests = int(test.sum())
    return {
        "naive_test_samples": tests,
        "naive_test_with_train_near_duplicate": leaked,
        "naive_leakage_fraction": round(leaked / tests, 6) if tests else 0.0,
    }


def _mark(d: Decisions, cols: dict, dup: dict[int, int], reason: str) -> None:
    for later, kept in dup.items():
        d.reason[later], d.duplicate_of[later] = reason, cols["key"][kept]


def decide(
    cols: dict, mode: str, *, radius: int, caption_dedup: bool, threshold: float, train: float, val: float
) -> Decisions:
    """Every row's fate. `cols` are in canonical order (as stream.examine returns them), and
    `cols["reason"]` holds the per-sample filters' verdicts ("" = passed)."""
    if np.any(np.diff(np.asarray(cols["order"])) <= 0):
        raise ValueError("dedup.decide needs the rows in canonical order (stream.examine sorts them)")
    n = len(cols["key"])
    d = Decisions(
        reason=np.array(cols["reason"], dtype=object, copy=True),
        duplicate_of=np.full(n, "", object),
        hamming=np.full(n, -1, np.int16),
        caption_jaccard=np.full(n, np.nan, np.float32),
        split=np.full(n, "", object),
    )
    # Each passing sample's split by its content: what a naive split gives it, and what it gets if kept.
    splits = np.array(
        [split_of(cid, train, val) if not r else "" for cid, r in zip(cols["content_id"], d.reason)], object
    )
    if mode != "none":
        _exact(cols, d)
        alive = np.array([not r for r in d.reason], bool)
        phash = np.asarray(cols["phash"], np.uint64)
        uniq, group = _unique(np.where(alive, phash, np.uint64(0)))
        edges = image_edges(uniq, radius)
        d.leakage = leakage(np.where(alive, group, 0), edges, np.where(alive, splits, ""))
        if mode == "near":
            dup = _greedy(group, edges, alive)
            _mark(d, cols, dup, "near_duplicate")
            d.hamming[list(dup)] = [signatures.hamming(int(phash[a]), int(phash[b])) for a, b in dup.items()]
            if caption_dedup:
                sigs = np.asarray(cols["minhash"])
                uniq, group = _unique(sigs)
                dup = _greedy(group, caption_edges(uniq, threshold), alive)
                _mark(d, cols, dup, "caption_near_duplicate")
                d.caption_jaccard[list(dup)] = [signatures.jaccard(sigs[a], sigs[b]) for a, b in dup.items()]
    kept = np.array([not r for r in d.reason], bool)
    d.split[kept] = splits[kept]
    return d
