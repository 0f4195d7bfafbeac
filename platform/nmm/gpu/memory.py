"""Will a model train on one GPU, and with how many rows per forward? Every byte the step holds.

Counted the way nmm trains (bf16 autocast over fp32 parameters, fused AdamW, the fused output
layer + loss of nmm.train.loss), from the tensors autograd really keeps:

- states: fp32 weights (4 B), fp32 gradients (4 B), Adam's m and v (8 B) per parameter, in full
  on every data-parallel rank;
- saved activations, per layer and token (`_layer_bytes_per_token`): the fp32 residual stream
  at each RMSNorm's input and its rstd, every linear layer's input and the attention's q, k, v
  and output in the compute dtype, the SwiGLU's gate, up and SiLU outputs, QK-norm's fp32
  outputs, the attention's log-sum-exp (flash / FlexAttention: no T×T scores); under autocast
  also the bf16 copy of every layer weight, which autocast keeps for backward;
- the fused loss: the gradient of the final states and of the output layer, kept from forward;
- workspace: the loss's largest chunk (logits in the compute dtype, their fp32 copy and
  gradient) or the backward's largest transient, whichever is larger; and a fixed CUDA
  context / cuBLAS / allocator allowance.

Where devices differ it says so: CPU RMSNorm is composite (also keeps the normalised input),
CUDA's is one kernel. QK-norm runs in fp32 on both (nmm.model upcasts bf16 q and k for it). The tests check the
saved-activation and state bytes against one real step on the CPU (saved_tensors_hooks);
`benchmarks/gpu_check.py` checks the total against `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
BYTES_PER_PARAM = 16  # fp32 weight + fp32 gradient + Adam m and v
FP32 = 4
CONTEXT_BYTES = 1.5 * GIB  # CUDA context, cuBLAS workspaces, allocator slack
USABLE_FRACTION = 0.92  # leave headroom for fragmentation
LOSS_CHUNK_TOKENS = 2048  # nmm.train.loss.CHUNK_TOKENS (nmm.gpu sits below nmm.train: kept equal by a test)


def model_shape(cfg, seq_len: int) -> dict:
    """`estimate`'s shape arguments of a model config (nmm.model.ModelConfig's dim, layers,
    heads, vocab_size, ffn_dim, qk_norm: read by name, nmm.gpu sits below nmm.model)."""
    return dict(
        dim=cfg.dim,
        layers=cfg.layers,
        heads=cfg.heads,
        vocab=cfg.vocab_size,
        seq_len=seq_len,
        ffn_dim=cfg.ffn_dim,
        qk_norm=cfg.qk_norm,
    )


def count_params(dim: int, layers: int, heads: int, vocab: int, ffn_dim: int, qk_norm: bool) -> int:
    """Exactly nmm.model.Transformer's count: attention, SwiGLU (`ffn_dim` as the model config
    derives it), norms (and QK-norm when on), embeddings, head."""
    return layers * _layer_params(dim, heads, ffn_dim, qk_norm) + 2 * vocab * dim + dim


def _layer_params(dim: int, heads: int, ffn_dim: int, qk_norm: bool) -> int:
    return _layer_matmul_params(dim, ffn_dim) + 2 * dim + (2 * (dim // heads) if qk_norm else 0)


def _layer_matmul_params(dim: int, ffn_dim: int) -> int:
    return 4 * dim * dim + 3 * dim * ffn_dim  # qkv, out; gate, up, down


def _layer_bytes_per_token(dim: int, heads: int, ffn_dim: int, qk_norm: bool, low: int, device: str) -> int:
    """Bytes one transformer block keeps for backward per token. `low`: bytes of the compute
    dtype (2 under bf16 autocast, 4 in fp32)."""
    composite = device != "cuda"  # CPU's RMSNorm keeps x·rstd as well
    norm = (dim + 1) * FP32 + (dim * FP32 if composite else 0)  # input (+ normalised) and rstd
    compute = (
        3 * dim
        + ffn_dim  # inputs of qkv, out, gate/up (shared), down
        + 3 * dim  # the qkv output: v and QK-norm's inputs are views of it
        + 3 * dim  # attention's q, k (after RoPE) and output
        + 3 * ffn_dim  # gate, up and SiLU outputs
    ) * low
    qk = 0
    if qk_norm:  # per q and k: fp32 output and rstd per head (+ normalised on CPU, + the fp32 copy of a bf16 input)
        upcast = dim * FP32 if low < FP32 else 0
        qk = 2 * ((dim + heads) * FP32 + (dim * FP32 if composite else 0) + upcast)
    return 2 * norm + compute + qk + heads * FP32  # + the attention's log-sum-exp per head


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float  # saved for backward, the loss's kept gradients included
    workspace_gib: float  # the largest transient: a loss chunk or a backward buffer
    overhead_gib: float  # CUDA context and allocator slack (0 on CPU)

    @property
    def step_gib(self) -> float:
        """What one step holds at once: states plus saved activations (no transients)."""
        return self.weights_gib + self.gradients_gib + self.optimizer_gib + self.activations_gib

    @property
    def total_gib(self) -> float:
        return self.step_gib + self.workspace_gib + self.overhead_gib

    def fits(self, gpu_memory_gib: float) -> bool:
        return self.total_gib <= gpu_memory_gib * USABLE_FRACTION

    def describe(self) -> str:
        return (
            f"{self.params / 1e6:,.0f}M parameters need ~{self.total_gib:.1f} GiB per GPU "
            f"(weights {self.weights_gib:.1f} + gradients {self.gradients_gib:.1f} + optimizer "
            f"{self.optimizer_gib:.1f} + activations {self.activations_gib:.1f} + workspace "
            f"{self.workspace_gib:.1f} + overhead {self.overhead_gib:.1f})"
        )


def estimate(
    dim: int,
    layers: int,
    heads: int,
    vocab: int,
    seq_len: int,
    micro_batch: int,
    *,
    ffn_dim: int,
    qk_norm: bool,
    precision: str = "bf16",
    device: str = "cuda",
) -> MemoryEstimate:
    """The memory of one training step on one rank: `micro_batch` rows of `seq_len` tokens,
    `precision` "bf16" (autocast) or "fp32", on a "cuda" or "cpu" device."""
    p = count_params(dim, layers, heads, vocab, ffn_dim, qk_norm)
    low = 2 if precision == "bf16" else FP32
    tokens = seq_len * micro_batch
    per_layer = layers * (
        tokens * _layer_bytes_per_token(dim, heads, ffn_dim, qk_norm, low, device)
        + (_layer_matmul_params(dim, ffn_dim) * low if low < FP32 else 0)
    )  # autocast's weight copies
    final_norm = tokens * ((dim + 1) * FP32 + (dim * FP32 if device != "cuda" else 0))
    loss = tokens * dim * FP32 + vocab * dim * FP32 + tokens * 8  # grad of the states, of the head; token ids
    chunk = min(tokens, LOSS_CHUNK_TOKENS) * vocab * (2 * low + 2 * FP32) + vocab * dim * low
    backward = 2 * tokens * max(ffn_dim, 3 * dim) * FP32  # an activation gradient and its input's
    return MemoryEstimate(
        params=p,
        weights_gib=FP32 * p / GIB,
        gradients_gib=FP32 * p / GIB,
        optimizer_gib=2 * FP32 * p / GIB,
        activations_gib=(per_layer + final_norm + loss) / GIB,
        workspace_gib=max(chunk, backward) / GIB,
        overhead_gib=CONTEXT_BYTES / GIB if device == "cuda" else 0.0,
    )


def largest_micro_batch(rows: int, gpu_memory_gib: float, **shape) -> int | None:
    """The most rows (≤ `rows`) per forward whose estimate fits `gpu_memory_gib`; gradient
    accumulation makes up the batch. None when not even one row fits. `shape`: `estimate`'s
    arguments but `micro_batch`."""
    lo, hi = 0, rows
    while lo < hi:  # the estimate grows with the rows: bisect
        mid = (lo + hi + 1) // 2
        if estimate(micro_batch=mid, **shape).fits(gpu_memory_gib):
            lo = mid
        else:
            hi = mid - 1
    return lo or None
