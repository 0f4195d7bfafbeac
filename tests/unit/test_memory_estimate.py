"""The memory estimate against one real training step on this CPU: the bytes of every tensor
autograd saves for backward (torch.autograd.graph.saved_tensors_hooks, each storage once,
parameters excluded) plus parameters, gradients and AdamW's states after the step. The estimate
must be within ±15 % of it and never low by more than 5 %: it admits or rejects a model on a GPU
pool and picks the micro-batch, so an estimate that is low means an OOM.

CPU caveats (nmm.gpu.memory says where CUDA differs): RMSNorm is composite here, and CPU
autocast is the CPU's policy; the estimate takes the device, and these are the CPU's numbers."""

from __future__ import annotations

import pytest
import torch

from nmm.gpu import memory
from nmm.model import ModelConfig
from nmm.train import loss as loss_mod
from nmm.train.loss import head_loss

CONFIGS = [  # (dim, layers, heads, vocab, seq, batch, qk_norm, precision)
    (64, 2, 4, 512, 64, 4, True, "fp32"),
    (96, 3, 4, 1000, 128, 2, True, "bf16"),
    (128, 2, 8, 2048, 96, 3, False, "fp32"),
    (128, 4, 4, 4096, 256, 2, True, "bf16"),
    (192, 2, 6, 3000, 64, 8, False, "bf16"),
    (256, 3, 8, 8192, 128, 4, True, "fp32"),
]


def measured_step_bytes(cfg: ModelConfig, seq: int, batch: int, precision: str) -> int:
    """Saved-for-backward bytes of one forward, plus parameters, gradients and optimizer states
    after backward and one fused AdamW step."""
    torch.manual_seed(0)
    model = cfg.build()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        loss, _ = model(x, head=head_loss(x, torch.ones_like(x), {"image": (cfg.vocab_size - 8, cfg.vocab_size)}, 1e-4))
    activations = sum(saved.values())
    loss.backward()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    opt.step()
    states = sum(t.nbytes for s in opt.state.values() for t in s.values() if t.dim() > 0)
    weights = sum(p.nbytes for p in model.parameters())
    grads = sum(p.grad.nbytes for p in model.parameters())
    return activations + weights + grads + states


@pytest.mark.parametrize("dim,layers,heads,vocab,seq,batch,qk_norm,precision", CONFIGS)
def test_memory_estimate_holds_against_a_real_step(dim, layers, heads, vocab, seq, batch, qk_norm, precision):
    cfg = ModelConfig(vocab_size=vocab, dim=dim, layers=layers, heads=heads, max_seq_len=seq, qk_norm=qk_norm)
    measured = measured_step_bytes(cfg, seq, batch, precision)
    est = memory.estimate(
        dim, layers, heads, vocab, seq, batch, ffn_dim=cfg.ffn_dim, qk_norm=qk_norm, precision=precision, device="cpu"
    )
    ratio = est.step_gib * memory.GIB / measured
    assert 0.95 <= ratio <= 1.15, (
        f"estimate {est.step_gib * memory.GIB:,.0f} B vs measured {measured:,} B (×{ratio:.3f})"
    )


def test_the_estimate_counts_what_the_gpu_adds():
    shape = dict(dim=768, layers=12, heads=12, vocab=32_768, seq_len=1024, ffn_dim=2048, qk_norm=True)
    gpu = memory.estimate(micro_batch=8, **shape)
    cpu = memory.estimate(micro_batch=8, device="cpu", precision="fp32", **shape)
    assert gpu.overhead_gib > 0 and cpu.overhead_gib == 0
    assert gpu.activations_gib < cpu.activations_gib  # bf16 activations
    assert memory.estimate(micro_batch=32, **shape).activations_gib > 3.9 * gpu.activations_gib - 0.5
    assert memory.LOSS_CHUNK_TOKENS == loss_mod.CHUNK_TOKENS


def test_the_largest_micro_batch_is_the_most_rows_that_fit():
    shape = dict(dim=768, layers=12, heads=12, vocab=32_768, seq_len=1024, ffn_dim=2048, qk_norm=True)
    rows = memory.largest_micro_batch(64, 24.0, **shape)
    assert rows is not None and 1 <= rows < 64
    assert memory.estimate(micro_batch=rows, **shape).fits(24.0)
    assert not memory.estimate(micro_batch=rows + 1, **shape).fits(24.0)
    assert memory.largest_micro_batch(4, 141.0, **shape) == 4  # all of it fits an H200
    assert memory.largest_micro_batch(8, 1.0, **shape) is None  # not one row fits 1 GiB
