"""The operator under load: N NMMPipelines created at once (16 client threads) against the
Kubernetes API emulator on loopback (tests/integration/kube_emulator.py, in this process), the
operator a real `kopf run`; the time from the first create until every pipeline's status names
its Workflow. Once steady, once with the operator killed (SIGKILL) halfway and restarted.

    python benchmarks/operator_load.py [--pipelines 200]

Prints a table and writes benchmarks/results/operator_load.json. The emulator shares this
machine's cores with the operator: on a 2-core machine both are CPU-bound, so the figure is an
upper bound for a real API server.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.faults import operator_load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipelines", type=int, default=200)
    args = ap.parse_args()
    runs = {}
    for name, kill in (("steady", False), ("killed_halfway", True)):
        with tempfile.TemporaryDirectory() as d:
            runs[name] = operator_load.run(args.pipelines, Path(d), kill_halfway=kill)
    report = {"benchmark": "operator_load", "machine": platform.node(), "pipelines": args.pipelines, "runs": runs}
    out = Path(__file__).parent / "results" / "operator_load.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'run':16} {'seconds':>8} {'workflows':>10} {'with status':>12}")
    for name, r in runs.items():
        print(f"{name:16} {r['seconds']:8.1f} {r['workflows']:10d} {r['with_status']:12d}")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
