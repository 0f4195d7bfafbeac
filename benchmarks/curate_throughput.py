"""Curation throughput: nmm's Ray Data pipeline vs a plain single-process loop doing the same steps
(read the tar, decode, validate, hash, pHash, MinHash; then the same dedup, split and ledger) on the
same WebDataset samples, in the same run. Also how the near-duplicate step scales (10k vs 40k
samples) and the curate pipeline's peak memory at 40k (the driver and every Ray process, summed
as PSS so shared object-store pages count once).

    python benchmarks/curate_throughput.py                 # 20k for throughput, 10k/40k for scaling
    python benchmarks/curate_throughput.py --samples 4000 --scale 2000 8000   # a quick look

The data: the built-in shapes source exported as WebDataset shards (64-pixel PNGs, 1,000 a shard),
curated to the model's 32 pixels. Prints a table and writes benchmarks/results/curate_throughput.json.
Targets (issue 11): ratio >= 1.6 on 2 cores, near-dup 40k/10k <= 5x, peak <= 2 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import threading
import time
from pathlib import Path

from nmm.data import dedup, export, ledger, ray_transforms, readers, stream, userdata
from nmm.data.examine import Settings
from nmm.spec.data import Source

SHARD = 1000


def make_shards(n: int, folder: Path) -> str:
    """n shapes samples as WebDataset shards under folder (made once, reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / f"done-{n}"
    if not done.exists():
        t0 = time.perf_counter()
        data = export.load_source("shapes", n, 64, 0, 1)
        export.export_webdataset(data, folder.as_uri(), SHARD)
        done.write_text("")
        print(f"made {n} samples in {time.perf_counter() - t0:.1f}s")
    return f"{folder}/shard-{{000000..{(n - 1) // SHARD:06d}}}.tar"


def settings() -> Settings:
    return Settings(32, 3, userdata.Limits(), {"web": None})


def curate(uri: str, engine: str) -> tuple[float, float, int]:
    """(seconds for the whole pipeline, of which near-dup decisions, samples)."""
    t0 = time.perf_counter()
    units, _ = readers.units(Source(kind="webdataset", name="web", uri=uri))
    ex = stream.examine(units, settings(), engine=engine)
    t1 = time.perf_counter()
    d = dedup.decide(ex.cols, "near", radius=6, caption_dedup=True, threshold=0.9, train=0.7, val=0.1)
    t2 = time.perf_counter()
    ledger.to_bytes(ledger.table(ex.cols, d))
    stream.cleanup(ex)
    return time.perf_counter() - t0, t2 - t1, len(ex.cols["key"])


class PeakMemory:
    """Samples the PSS of this process and all its descendants (Ray's raylet, workers, object store)."""

    def __init__(self, every: float = 0.5):
        import psutil

        self.psutil, self.every, self.peak, self._stop = psutil, every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = self.psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=20_000, help="samples for the throughput comparison")
    ap.add_argument(
        "--scale", type=int, nargs=2, default=[10_000, 40_000], help="sizes for near-dup scaling and memory"
    )
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "nmm-bench-curate")
    args = ap.parse_args()
    big = max(args.samples, *args.scale)
    make_shards(big, args.data / "all")
    subset = lambda n: f"{args.data / 'all'}/shard-{{000000..{(n - 1) // SHARD:06d}}}.tar"

    t0 = time.perf_counter()
    ray_transforms.init_ray()
    ray_start = time.perf_counter() - t0
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "ray_init_s": round(ray_start, 2),
    }
    loop_s, _, n = curate(subset(args.samples), "loop")
    cold_s, _, _ = curate(subset(args.samples), "ray")  # Ray's workers start and import here
    warm_s, _, _ = curate(subset(args.samples), "ray")
    report["throughput"] = {
        "samples": n,
        "loop_s": round(loop_s, 2),
        "ray_first_pass_s": round(cold_s, 2),
        "ray_s": round(warm_s, 2),
        "loop_samples_per_s": round(n / loop_s, 1),
        "ray_samples_per_s": round(n / warm_s, 1),
        "ratio_ray_over_loop": round(loop_s / warm_s, 3),
        "ratio_first_pass": round(loop_s / cold_s, 3),
    }
    small, large = args.scale
    with PeakMemory() as mem:
        large_s, large_near, n_large = curate(subset(large), "ray")
    _, small_near, n_small = curate(subset(small), "ray")
    report["near_dup_scaling"] = {
        "small": n_small,
        "large": n_large,
        "small_s": round(small_near, 3),
        "large_s": round(large_near, 3),
        "growth": round(large_near / small_near, 2),
        "size_ratio": round(n_large / n_small, 2),
    }
    report["memory"] = {
        "samples": n_large,
        "pipeline_s": round(large_s, 2),
        "peak_pss_gib_driver_and_ray": round(mem.peak / 2**30, 3),
        "peak_rss_gib_driver": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }
    ray_transforms.shutdown()
    out = Path(__file__).parent / "results" / "curate_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    t = report["throughput"]
    print(
        f"{n} samples: loop {t['loop_s']}s ({t['loop_samples_per_s']}/s), Ray {t['ray_s']}s "
        f"({t['ray_samples_per_s']}/s; first pass {t['ray_first_pass_s']}s): ratio {t['ratio_ray_over_loop']} "
        f"(first pass {t['ratio_first_pass']})"
    )
    s = report["near_dup_scaling"]
    print(
        f"near-dup decisions: {s['small']} samples {s['small_s']}s, {s['large']} samples {s['large_s']}s: "
        f"{s['growth']}x for {s['size_ratio']}x the data"
    )
    m = report["memory"]
    print(
        f"peak memory at {m['samples']} samples: {m['peak_pss_gib_driver_and_ray']} GiB (driver + Ray, PSS); "
        f"driver RSS {m['peak_rss_gib_driver']} GiB"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
