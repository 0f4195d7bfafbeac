"""Gates: spec thresholds on metrics → pass/fail with a reason per gate."""

from __future__ import annotations

from typing import Protocol


class Gate(Protocol):
    """What a gate offers (nmm.spec.Gate): the library does not import the spec layer."""

    metric: str

    def passes(self, value: float) -> bool: ...


def check(gates: list[Gate], metrics: dict[str, float]) -> tuple[bool, list[str]]:
    ok, reasons = True, []
    for g in gates:
        value = metrics.get(g.metric)
        if value is None:
            ok = False
            reasons.append(f"{g}: metric not measured")
            continue
        passed = g.passes(value)
        ok &= passed
        reasons.append(f"{g}: {value:.4f} {'pass' if passed else 'FAIL'}")
    return ok, reasons
