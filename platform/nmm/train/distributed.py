"""torch.distributed from the env a PyTorchJob pod (or torchrun) provides."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> DistInfo:
    """Join the process group when WORLD_SIZE > 1: nccl on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, local, world, device)


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= info.world_size
    return t


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when it is true on any rank. A signal reaches each rank at its own
    moment; agreeing on it each step keeps every rank at the same collectives (no hang)."""
    if info.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def shutdown(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
