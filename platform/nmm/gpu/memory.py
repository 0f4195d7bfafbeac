"""Will a model train on one GPU? Parameters, gradients, optimizer states and activations.

Mixed-precision AdamW the way nmm trains on GPU (bf16 autocast over fp32 parameters):
fp32 weights (4 B) + fp32 gradients (4 B) + Adam m and v (8 B) = 16 bytes per parameter, held in
full on every data-parallel rank. Activations per layer and token follow Korthikanti et al.
(34·d bytes in 16-bit, attention scores excluded because SDPA/flash attention does not store
them), plus fp32 logits for the loss, plus a fixed CUDA context/workspace allowance.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
BYTES_PER_PARAM = 16
CONTEXT_BYTES = 1.5 * GIB  # CUDA context, cuBLAS/NCCL workspaces, allocator slack
USABLE_FRACTION = 0.92  # leave headroom for fragmentation


def count_params(dim: int, layers: int, heads: int, vocab: int, ffn_dim: int, qk_norm: bool) -> int:
    """Exactly nmm.model.Transformer's count: attention, SwiGLU (`ffn_dim` as the model config
    derives it), norms (and QK-norm when on), embeddings, head."""
    per_layer = 4 * dim * dim + 3 * dim * ffn_dim + 2 * dim + (2 * (dim // heads) if qk_norm else 0)
    return layers * per_layer + 2 * vocab * dim + dim


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    overhead_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.gradients_gib + self.optimizer_gib + self.activations_gib + self.overhead_gib

    def fits(self, gpu_memory_gib: float) -> bool:
        return self.total_gib <= gpu_memory_gib * USABLE_FRACTION

    def describe(self) -> str:
        return (
            f"{self.params / 1e6:,.0f}M parameters need ~{self.total_gib:.1f} GiB per GPU "
            f"(weights {self.weights_gib:.1f} + gradients {self.gradients_gib:.1f} + optimizer "
            f"{self.optimizer_gib:.1f} + activations {self.activations_gib:.1f} + overhead {self.overhead_gib:.1f})"
        )


def estimate(dim: int, layers: int, heads: int, vocab: int, seq_len: int, micro_batch: int, *, ffn_dim: int,
             qk_norm: bool) -> MemoryEstimate:
    p = count_params(dim, layers, heads, vocab, ffn_dim, qk_norm)
    tokens = seq_len * micro_batch
    activations = layers * tokens * dim * 34 + tokens * vocab * 4 * 2  # logits + their gradient
    return MemoryEstimate(
        params=p,
        weights_gib=4 * p / GIB,
        gradients_gib=4 * p / GIB,
        optimizer_gib=8 * p / GIB,
        activations_gib=activations / GIB,
        overhead_gib=CONTEXT_BYTES / GIB,
    )
