"""Load on the operator: N pipelines created at once against the Kubernetes API emulator, with
the operator (a real `kopf run`) optionally killed with SIGKILL halfway and started again.
Shared by tests/faults/test_operator_load.py (asserts the counts) and
benchmarks/operator_load.py (prints and saves the time)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubernetes import client

from tests.integration.kube_emulator import EmulatorThread
from tests.integration.test_operator import RESOURCES, Operator, pipeline


def run(n: int, workdir: Path, kill_halfway: bool = False, timeout: float = 300.0) -> dict:
    """Create `n` pipelines in one namespace at once; wait until each has its Workflow and its
    status names it. Returns the counts and the seconds from the first create to the last."""
    with EmulatorThread(RESOURCES) as emu:
        cfg = client.Configuration()
        cfg.host = emu.url
        api = client.CustomObjectsApi(client.ApiClient(cfg))
        settings = workdir / "settings.json"
        settings.write_text(
            json.dumps({"resolved": {"image": "ghcr.io/nmm-dev/nmm:0.1.0"}, "operator": {"recheckSeconds": 30}})
        )
        op = Operator(emu.url, workdir / "operator.log", settings, verbose=False).start()
        kills = 0
        try:
            bodies = [pipeline(f"load-{i:04d}") for i in range(n)]
            t0 = time.monotonic()
            with ThreadPoolExecutor(16) as pool:
                list(
                    pool.map(
                        lambda b: api.create_namespaced_custom_object("nmm.dev", "v1alpha1", "load", "nmmpipelines", b),
                        bodies,
                    )
                )
            while time.monotonic() - t0 < timeout:  # (the pipelines only: small; the emulator is in this process)
                pipes = api.list_namespaced_custom_object("nmm.dev", "v1alpha1", "load", "nmmpipelines")["items"]
                done = sum(1 for p in pipes if (p.get("status") or {}).get("workflow"))
                if kill_halfway and not kills and done >= n // 2:
                    op.kill()  # SIGKILL mid-flight: whatever it had in hand is lost
                    kills += 1
                    op = Operator(emu.url, workdir / "operator.log", settings, verbose=False).start()
                if done >= n:
                    break
                time.sleep(0.5)
            seconds = time.monotonic() - t0
            wfs = api.list_namespaced_custom_object("argoproj.io", "v1alpha1", "load", "workflows")["items"]
            pipes = api.list_namespaced_custom_object("nmm.dev", "v1alpha1", "load", "nmmpipelines")["items"]
        finally:
            op.stop()
    names = [w["metadata"]["name"] for w in wfs]
    owners = {w["metadata"]["ownerReferences"][0]["uid"] for w in wfs}
    return {
        "pipelines": n,
        "workflows": len(wfs),
        "distinct_workflows": len(set(names)),
        "owners": len(owners),
        "with_status": sum(1 for p in pipes if (p.get("status") or {}).get("workflow")),
        "operator_killed": kills,
        "seconds": round(seconds, 2),
    }
