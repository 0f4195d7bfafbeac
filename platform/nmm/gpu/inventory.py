"""What GPUs a machine has (NVML via nvidia-ml-py), as node labels, and live telemetry.

Where NVIDIA GPU Feature Discovery already labelled the node (`nvidia.com/gpu.*`), those labels
are the source; otherwise NVML is read directly. No NVML (no GPU or no driver) is not an error:
`read_gpus()` returns None and callers say so.
"""

from __future__ import annotations

from dataclasses import dataclass

from nmm.gpu.pools import LABEL_COUNT, LABEL_MEMORY, LABEL_POOL, LABEL_PRODUCT, GpuPool

LABEL_DRIVER = "nmm.dev/gpu.driver"
LABEL_HEALTHY = "nmm.dev/gpu.healthy"
LABEL_SOURCE = "nmm.dev/gpu.source"
GFD_PRODUCT = "nvidia.com/gpu.product"
GFD_MEMORY_MIB = "nvidia.com/gpu.memory"
GFD_COUNT = "nvidia.com/gpu.count"
GFD_DRIVER = "nvidia.com/cuda.driver-version.full"


@dataclass(frozen=True)
class Gpu:
    index: int
    product: str
    memory_mib: int
    healthy: bool


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[Gpu, ...]
    driver: str
    source: str  # "nvml" or "gfd"


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def read_gpus() -> Inventory | None:
    """The GPUs NVML sees, or None when there is no NVIDIA GPU / driver here."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            try:
                pynvml.nvmlDeviceGetUtilizationRates(h)
                healthy = True
            except pynvml.NVMLError:
                healthy = False
            mem = pynvml.nvmlDeviceGetMemoryInfo(h).total // (1024 * 1024)
            gpus.append(Gpu(i, _text(pynvml.nvmlDeviceGetName(h)).replace(" ", "-"), int(mem), healthy))
        return Inventory(tuple(gpus), _text(pynvml.nvmlSystemGetDriverVersion()), "nvml")
    finally:
        pynvml.nvmlShutdown()


def from_gfd(node_labels: dict[str, str]) -> Inventory | None:
    """An inventory from GPU Feature Discovery's labels, or None when the node has none."""
    if GFD_PRODUCT not in node_labels or GFD_COUNT not in node_labels:
        return None
    count = int(node_labels[GFD_COUNT])
    mem = int(node_labels.get(GFD_MEMORY_MIB, "0"))
    gpus = tuple(Gpu(i, node_labels[GFD_PRODUCT], mem, True) for i in range(count))
    return Inventory(gpus, node_labels.get(GFD_DRIVER, "unknown"), "gfd")


def pool_of(inv: Inventory, pools: tuple[GpuPool, ...]) -> str | None:
    """The declared pool whose product this node's GPUs are (first match)."""
    if not inv.gpus:
        return None
    product = inv.gpus[0].product.lower()
    for p in pools:
        if p.product.lower() == product or p.product.lower() in product:
            return p.name
    return None


def labels(inv: Inventory, pools: tuple[GpuPool, ...]) -> dict[str, str]:
    """The `nmm.dev/gpu.*` labels for a node (label values: [A-Za-z0-9._-], ≤ 63 characters)."""
    first = inv.gpus[0] if inv.gpus else None
    out = {
        LABEL_COUNT: str(len(inv.gpus)),
        LABEL_PRODUCT: (first.product if first else "none")[:63],
        LABEL_MEMORY: str((first.memory_mib // 1024) if first else 0),
        LABEL_DRIVER: inv.driver.replace(" ", "-")[:63],
        LABEL_HEALTHY: "true" if all(g.healthy for g in inv.gpus) else "false",
        LABEL_SOURCE: inv.source,
    }
    pool = pool_of(inv, pools)
    if pool:
        out[LABEL_POOL] = pool
    return out


def telemetry() -> dict[str, float]:
    """Utilisation and memory of each GPU, as metrics (empty without NVML)."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {}
    try:
        out = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out[f"gpu/{i}/utilization"] = float(util.gpu)
            out[f"gpu/{i}/memory_used_gib"] = mem.used / 1024**3
        return out
    finally:
        pynvml.nvmlShutdown()
