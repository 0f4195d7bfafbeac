"""An ablation's variants on several seeds: each metric's mean and standard deviation per
variant, and which differences between variants are larger than the seed spread.

Two variants differ on a metric when their means are further apart than the sum of their
standard deviations (their mean ± std intervals do not overlap): with 3 seeds that is a rough
screen, not a significance test, and the report says only that.
"""

from __future__ import annotations

import itertools
import math


def aggregate(
    per_run: dict[str, dict[str, float]], groups: dict[str, list[str]]
) -> dict[str, dict[str, tuple[float, float, int]]]:
    """`per_run`: run name → its metrics; `groups`: variant → its runs. Returns variant → metric
    → (mean, sample standard deviation, seeds measured), over the runs that reported it."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for variant, runs in groups.items():
        found = [per_run[r] for r in runs if r in per_run]
        metrics = sorted({k for m in found for k in m})
        out[variant] = {}
        for k in metrics:
            vals = [m[k] for m in found if k in m]
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            out[variant][k] = (mean, std, len(vals))
    return out


def apart(agg: dict[str, dict[str, tuple[float, float, int]]]) -> list[tuple[str, str, str]]:
    """(metric, variant a, variant b) for every pair whose means differ by more than the sum of
    their standard deviations; only metrics measured on at least two seeds on both sides."""
    out = []
    for a, b in itertools.combinations(agg, 2):
        for k in sorted(set(agg[a]) & set(agg[b])):
            (ma, sa, na), (mb, sb, nb) = agg[a][k], agg[b][k]
            if na > 1 and nb > 1 and abs(ma - mb) > sa + sb:
                out.append((k, a, b))
    return out


def as_metrics(agg: dict[str, dict[str, tuple[float, float, int]]]) -> dict[str, float]:
    """MLflow metrics of the aggregate: `<variant>/<metric>.mean` and `.std`."""
    return {
        f"{v}/{k}.{stat}": x
        for v, ms in agg.items()
        for k, (mean, std, _) in ms.items()
        for stat, x in (("mean", mean), ("std", std))
    }
