"""The GPU path, torchtitan style: bf16 autocast, `torch.compile` per transformer block, FSDP2
(`fully_shard`) for configs too big to replicate, micro-batches from the memory estimate, and
MFU. Every piece is optional; the defaults ("auto") are bf16, compiled and packed on CUDA, and
fp32, eager, padded elsewhere.

MFU counts FLOPs the torchtitan way: 6·N + 12·L·H·Q·T per token (N parameters without the
embedding table, L layers, H heads, Q head dim, T sequence length), against the device's dense
bf16 peak (H100: 989 TFLOP/s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from dataclasses import dataclass

import torch

from nmm.gpu import memory
from nmm.model import ModelConfig

logger = logging.getLogger(__name__)

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


@dataclass(frozen=True, kw_only=True)
class Parallelism:
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 elsewhere; or "bf16" / "fp32"
    compile: bool | str = "auto"  # auto: on CUDA
    fsdp: bool = False
    pack: bool | str = "auto"  # pack each batch's rows end to end with document masks; auto: on CUDA, early fusion

    def resolved(self, device: torch.device, fusion: str) -> Parallelism:
        """The same with every "auto" decided for `device` and the model's fusion."""
        cuda = device.type == "cuda"
        return dataclasses.replace(
            self,
            compile=cuda if self.compile == "auto" else bool(self.compile),
            pack=(cuda and fusion == "early") if self.pack == "auto" else bool(self.pack),
        )

    def dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype, or None for full fp32."""
        bf16 = self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")
        return torch.bfloat16 if bf16 else None


def autocast(p: Parallelism, device: torch.device):
    dtype = p.dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def apply(model: torch.nn.Module, p: Parallelism, world_size: int) -> torch.nn.Module:
    """Compile each block in place (state-dict keys unchanged), then wrap for data parallelism:
    FSDP2 shards every block and the root; otherwise DDP when there are several ranks.
    Returns what the training step calls; `model` stays the unwrapped module."""
    if p.compile:
        for block in model.blocks:
            block.compile()
    if p.fsdp and world_size > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model)
    return model


def micro_batch(
    model: ModelConfig, rows: int, requested: int | None, p: Parallelism, device: torch.device
) -> int | None:
    """Rows per forward on one rank: `requested` when set; on CUDA the most rows (of `rows`)
    whose memory estimate (nmm.gpu.memory, at the model's full context) fits the device, the
    rest made up by gradient accumulation; elsewhere None, the whole batch at once."""
    if requested:
        return min(requested, rows)
    if device.type != "cuda":
        return None
    gib = torch.cuda.get_device_properties(device).total_memory / memory.GIB
    shape = memory.model_shape(model, model.max_seq_len) | {"precision": "bf16" if p.dtype(device) else "fp32"}
    n = memory.largest_micro_batch(rows, gib, **shape)
    if n is None:
        logger.warning(
            "one row is estimated not to fit this %.0f GiB GPU (%s); trying one row per forward",
            gib,
            memory.estimate(micro_batch=1, **shape).describe(),
        )
        return 1
    if n < rows:
        logger.info("%d rows per rank do not fit at once: %d micro-batches of up to %d rows", rows, -(-rows // n), n)
    return n


@contextlib.contextmanager
def gradient_sync(module: torch.nn.Module, sync: bool):
    """Backward inside this block synchronises gradients across ranks only when `sync` (the
    last micro-batch): DDP's `no_sync`, FSDP2's `set_requires_gradient_sync`."""
    if sync:
        yield
    elif hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def sharded(p: Parallelism, world_size: int) -> bool:
    return p.fsdp and world_size > 1


def full_state(model: torch.nn.Module, opt, p: Parallelism, world_size: int) -> tuple[dict, dict | None]:
    """Whole (unsharded) model and optimizer state on CPU, for a checkpoint. Under FSDP this is
    a collective: every rank calls it; only rank 0 receives the state (the others get empty
    dicts) and writes it."""
    if not sharded(p, world_size):
        return model.state_dict(), (opt.state_dict() if opt is not None else None)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if opt is None:
        return get_model_state_dict(model, options=options), None
    return get_state_dict(model, opt, options=options)


def load_optimizer(model: torch.nn.Module, opt, state: dict, p: Parallelism, world_size: int) -> None:
    """Restore optimizer state saved by `full_state` (every rank reads the same checkpoint)."""
    if not sharded(p, world_size):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


def transformer_flops_per_token(params: int, layers: int, heads: int, head_dim: int, seq_len: int) -> float:
    """torchtitan's count for any decoder: 6·N + 12·L·H·Q·T (N without the embedding table)."""
    return 6 * params + 12 * layers * heads * head_dim * seq_len


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return transformer_flops_per_token(_param_count(cfg), cfg.layers, cfg.heads, cfg.head_dim, seq_len)


@functools.lru_cache(maxsize=8)
def _param_count(cfg: ModelConfig) -> int:
    """Parameters without the embedding table (torchtitan's N), from the architecture alone."""
    with torch.device("meta"):
        model = cfg.build()
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(("embed.", "code_embed.")))


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def mfu(tokens_per_s: float, cfg: ModelConfig, seq_len: int, device: torch.device) -> float | None:
    """Model FLOPs utilisation, or None where the peak is unknown (CPU)."""
    peak = peak_flops(device)
    return None if peak is None else tokens_per_s * flops_per_token(cfg, seq_len) / peak
