"""The node-inventory daemon's one write: label its own node with its GPUs (kubernetes client)."""

from __future__ import annotations

import json
import os

from nmm.gpu.inventory import Inventory, from_gfd, labels, read_gpus
from nmm.gpu.pools import GpuPool, pools_from_values


def pools_from_env() -> tuple[GpuPool, ...]:
    """`NMM_GPU_POOLS`: {"h100": {"product": …, "memoryGiB": 80, "gpusPerNode": 8}, …} (chart values)."""
    return pools_from_values(json.loads(os.environ.get("NMM_GPU_POOLS") or "{}"))


def label_node(node_name: str, pools: tuple[GpuPool, ...]) -> tuple[Inventory | None, dict[str, str]]:
    """Read GFD labels (or NVML) and patch this node's nmm.dev/gpu.* labels. Returns what it set."""
    from nmm import kubeclient

    api = kubeclient.core()
    node = api.read_node(node_name)
    inv = from_gfd(node.metadata.labels or {}) or read_gpus()
    if inv is None:
        return None, {}
    wanted = labels(inv, pools)
    api.patch_node(node_name, {"metadata": {"labels": wanted}})
    return inv, wanted
