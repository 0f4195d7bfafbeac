"""Curation as a stream: every unit examined on Ray Data (a local Ray, or the cluster at
`RAY_ADDRESS`), batches flowing back in canonical order. The driver keeps the small columns
(keys, hashes, signatures) and appends the pixels of every sample that decoded to a spill
file on local disk, so neither it nor any step holds the dataset's pixels in memory.

`examine(..., engine="loop")` does the same work in this process, one unit after another: the
baseline of benchmarks/curate_throughput.py and the path for tiny inputs.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nmm.data import ray_transforms
from nmm.data.examine import COLUMNS, Settings, examine_unit
from nmm.data.readers import Unit

SMALL = tuple(c for c in COLUMNS if c != "pixels")
log = logging.getLogger("nmm.curate")


@dataclass
class Examined:
    """Every sample's small columns (canonical order) and a spill file of the decoded samples' pixels."""

    cols: dict[str, np.ndarray]
    spill_row: np.ndarray  # row → its index in the spill file, -1 when it has no pixels (did not decode)
    spill_path: Path
    shape: tuple[int, int, int]

    def pixels(self, rows) -> np.ndarray:
        """(len(rows), side, side, channels) uint8 of the given rows (each must have decoded)."""
        idx = self.spill_row[np.asarray(rows, dtype=np.int64)]
        if (idx < 0).any():
            raise ValueError("pixels asked for a sample that did not decode")
        count = int(self.spill_row.max()) + 1 if len(self.spill_row) else 0
        if count == 0:
            return np.zeros((0, *self.shape), np.uint8)
        spill = np.memmap(self.spill_path, np.uint8, "r", shape=(count, *self.shape))
        return np.asarray(spill[idx])


def _ray_batches(units: list[Unit], settings: Settings) -> Iterator[dict]:
    ray_transforms.init_ray()
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # canonical order, whatever finishes first
    ctx.enable_progress_bars = False
    ctx.op_resource_reservation_enabled = False  # one map stage: let it use every CPU from the first task
    by_index = {u.index: u for u in units}

    def work(batch: dict) -> dict:
        from nmm.data.examine import examine_unit as run

        return run(by_index[int(batch["unit"][0])], settings)

    ds = ray.data.from_items([{"unit": u.index} for u in units], override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(work, batch_size=1, batch_format="numpy")
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=4)
    except Exception as exc:  # Ray wraps a worker's error: surface a store outage as itself (retryable)
        cause = _storage_cause(exc)
        if cause is not None:
            raise cause from exc
        raise


def _storage_cause(exc: BaseException | None):
    from nmm.storage import StorageError

    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, StorageError):
            return StorageError(str(exc))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _loop_batches(units: list[Unit], settings: Settings) -> Iterator[dict]:
    for u in units:
        yield examine_unit(u, settings)


def examine(
    units: list[Unit],
    settings: Settings,
    first: Iterable[dict] = (),
    *,
    engine: str = "ray",
    workdir: str | None = None,
) -> Examined:
    """Examine every unit (after the `first` batches: built-in sources, examined already)."""
    shape = (settings.side, settings.side, settings.channels)
    spill_dir = Path(tempfile.mkdtemp(prefix="nmm-curate-", dir=workdir))
    spill_path = spill_dir / "pixels.u8"
    parts: dict[str, list] = {c: [] for c in SMALL}
    spill_rows, spilled, seen, t0 = [], 0, 0, time.perf_counter()
    stream = _ray_batches(units, settings) if engine == "ray" and units else _loop_batches(units, settings)
    try:
        with open(spill_path, "wb") as spill:
            for n, batch in enumerate(_chain(first, stream)):
                decoded = np.asarray(batch["has_pixels"], bool)  # the kept, and drops a grid can show
                spill.write(np.ascontiguousarray(np.asarray(batch["pixels"])[decoded], np.uint8).tobytes())
                rows = np.full(len(decoded), -1, np.int64)
                rows[decoded] = spilled + np.arange(int(decoded.sum()))
                spilled += int(decoded.sum())
                spill_rows.append(rows)
                for c in SMALL:
                    parts[c].append(np.asarray(batch[c]))
                seen += len(decoded)
                if n and n % 50 == 0:
                    log.info("examined %d batches, %d samples (%.0f/s)", n, seen, seen / (time.perf_counter() - t0))
    except BaseException:
        shutil.rmtree(spill_dir, ignore_errors=True)  # a failed examination leaves no spill behind
        raise
    cols = {c: _concat(v) for c, v in parts.items()}
    order = np.argsort(cols["order"], kind="stable")
    if not np.array_equal(order, np.arange(len(order))):  # preserve_order should make this moot
        log.warning("batches came back out of order: re-sorted to the canonical order")
    cols = {c: v[order] for c, v in cols.items()}
    spill_row = _concat(spill_rows)[order] if spill_rows else np.zeros(0, np.int64)
    return Examined(cols, spill_row, spill_path, shape)


def _chain(first: Iterable[dict], rest: Iterator[dict]) -> Iterator[dict]:
    yield from first
    yield from rest


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    if not arrays:
        return np.zeros(0)
    out = np.concatenate(arrays)
    return out.astype(object) if out.dtype.kind in "US" else out


def cleanup(ex: Examined) -> None:
    try:
        os.remove(ex.spill_path)
        os.rmdir(ex.spill_path.parent)
    except OSError:
        pass
