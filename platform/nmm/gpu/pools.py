"""GPU node pools (declared in chart values) and the placement of a training request on them.

Nodes are labelled by the nmm node-inventory daemon (or NVIDIA GPU Feature Discovery):
`nmm.dev/gpu.pool`, `nmm.dev/gpu.product`, `nmm.dev/gpu.memory-gib`, `nmm.dev/gpu.count`.
"""

from __future__ import annotations

from dataclasses import dataclass

LABEL_POOL = "nmm.dev/gpu.pool"
LABEL_PRODUCT = "nmm.dev/gpu.product"
LABEL_MEMORY = "nmm.dev/gpu.memory-gib"
LABEL_COUNT = "nmm.dev/gpu.count"


@dataclass(frozen=True, kw_only=True)
class GpuPool:
    name: str
    product: str
    memory_gib: int
    gpus_per_node: int
    taints: tuple[tuple[str, str, str], ...] = (("nvidia.com/gpu", "present", "NoSchedule"),)

    def matches(self, gpus: int, min_memory_gib: int | None, product: str | None) -> bool:
        if gpus > self.gpus_per_node:
            return False
        if min_memory_gib is not None and self.memory_gib < min_memory_gib:
            return False
        return product is None or product.lower() in self.product.lower()


# The example pools of the chart's values.yaml (charts/nmm-platform/values.yaml → gpuPools).
EXAMPLE_POOLS = (
    GpuPool(name="l4", product="NVIDIA-L4", memory_gib=24, gpus_per_node=4),
    GpuPool(name="a100-40gb", product="NVIDIA-A100-SXM4-40GB", memory_gib=40, gpus_per_node=8),
    GpuPool(name="h100", product="NVIDIA-H100-80GB-HBM3", memory_gib=80, gpus_per_node=8),
    GpuPool(name="h200", product="NVIDIA-H200", memory_gib=141, gpus_per_node=8),
)


def pools_from_values(raw: dict) -> tuple[GpuPool, ...]:
    """Chart values `gpuPools` ({name: {product, memoryGiB, gpusPerNode}}) as pools, by name."""
    return tuple(
        GpuPool(name=name, product=p["product"], memory_gib=int(p["memoryGiB"]), gpus_per_node=int(p["gpusPerNode"]))
        for name, p in sorted(raw.items())
    )


class PlacementError(ValueError):
    """No declared pool can hold the request, or the model does not fit its GPUs."""


def choose(pools: tuple[GpuPool, ...], gpus: int, min_memory_gib: int | None, product: str | None) -> list[GpuPool]:
    matching = [p for p in pools if p.matches(gpus, min_memory_gib, product)]
    if not matching:
        want = (
            f"{gpus} GPU(s) per node"
            + (f" with >= {min_memory_gib} GiB" if min_memory_gib else "")
            + (f" of product {product!r}" if product else "")
        )
        have = (
            ", ".join(f"{p.name} ({p.gpus_per_node}x {p.product}, {p.memory_gib} GiB)" for p in pools)
            or "none declared"
        )
        raise PlacementError(f"no GPU pool satisfies {want}; pools: {have}")
    return matching


def affinity(pools: list[GpuPool]) -> dict:
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": LABEL_POOL, "operator": "In", "values": sorted(p.name for p in pools)}
                        ]
                    }
                ]
            }
        }
    }


def tolerations(pools: list[GpuPool]) -> list[dict]:
    seen = sorted({t for p in pools for t in p.taints})
    return [{"key": k, "operator": "Equal", "value": v, "effect": e} for k, v, e in seen]
