"""Decoder-only transformer over one shared text+image vocabulary.

RMSNorm pre-norm blocks, rotary position embeddings, SwiGLU feed-forward, QK-norm. Early fusion
embeds image codes like any token; mid and late fusion replace the embeddings at the image
positions with their stem's output (nmm.model.fusion).
Attention is causal, except (with `image_attention: bidirectional`, Transfusion-style) among the
positions of each image the caller marks as an input (`spans`, from `image_spans`): those see the
whole image. Images the model is generating stay causal.
Architecture only: the loss (with z-loss) lives in nmm.train.loss, sampling in nmm.model.generate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nmm.model.config import ModelConfig
from nmm.model.fusion import build_stem


def rope_cache(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    half = cfg.head_dim // 2
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(half, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin (T, D/2), or (B, T, D/2) when positions differ per row (packing).
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = (cos[None, None], sin[None, None]) if cos.dim() == 2 else (cos[:, None], sin[:, None])
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        # QK-norm (Chameleon): normalise queries and keys per head to keep logits bounded.
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q, k, v (B, H, T, D) of x: QK-normed in fp32 (the norm's own dtype; under autocast q
        and k come out of a bf16 matmul) and rotated, then in v's dtype for attention."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.cfg.heads, self.cfg.head_dim).permute(2, 0, 3, 1, 4)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q.float()), self.k_norm(k.float())
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.to(v.dtype), k.to(v.dtype), v

    def decode(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int, pos: torch.Tensor
    ) -> torch.Tensor:
        """One new token per row (x: (B, 1, dim)) at position `pos` ((1,), on the device): its
        keys and values are written into the static cache and it attends to the whole cache with
        the positions after `pos` masked. No shape ever changes, so the step compiles once and a
        CUDA graph can replay it."""
        q, k, v = self.project(x, cos, sin)
        cache.k[layer].index_copy_(2, pos, k)
        cache.v[layer].index_copy_(2, pos, v)
        y = F.scaled_dot_product_attention(
            q, cache.k[layer], cache.v[layer], attn_mask=(cache.positions <= pos).view(1, 1, 1, -1)
        )
        return self.out(y.transpose(1, 2).reshape(x.shape[0], 1, self.cfg.dim))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        mask=None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        drop = self.cfg.dropout if self.training else 0.0
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
        if mask is not None:  # packed rows, images seen whole (`block_mask`)
            if past:
                raise ValueError("document and image-span masks apply to a whole sequence, not after a cached prefix")
            y = masked_attention(q, k, v, mask, drop)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        elif t == 1:  # one new token attends to everything cached
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:  # a chunk after a cached prefix: causal, offset by the prefix
            allowed = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=drop)
        return self.out(y.transpose(1, 2).reshape(b, t, self.cfg.dim))


def image_spans(
    tokens: torch.Tensor, image_range: tuple[int, int], tokens_per_image: int, given: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T) ids of the input images whose positions attend to each other both ways: each
    complete run of `tokens_per_image` image positions gets an id (1, 2, … per row), everything
    else 0. `given` (B,) bool picks the rows whose images are inputs (an image being generated
    — an M2G target — must stay causal); default every row."""
    at = (tokens >= image_range[0]) & (tokens < image_range[1])
    if given is not None:
        at &= given[:, None]
    starts = at & ~F.pad(at, (1, 0))[:, :-1]
    ids = torch.where(at, starts.long().cumsum(1), 0)
    # a run shorter than a whole image is one being generated: leave it causal
    counts = torch.zeros(tokens.shape[0], tokens.shape[1] + 1, dtype=torch.long, device=tokens.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids))
    whole = counts.gather(1, ids) == tokens_per_image
    return torch.where(at & whole, ids, 0)


def image_index(
    tokens: torch.Tensor, image_range: tuple[int, int], tokens_per_image: int, before: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T) the index of each image position inside its image (0 … tokens_per_image - 1, in
    raster order), -1 elsewhere. `before` (B,): the image positions that directly precede the
    first token (an image continued across a KV-cache boundary)."""
    at = (tokens >= image_range[0]) & (tokens < image_range[1])
    pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    last_other = torch.where(at, -1, pos).cummax(1).values  # the last non-image position so far
    k = pos - last_other - 1
    if before is not None:
        k = torch.where(last_other < 0, k + before[:, None], k)
    return torch.where(at & (k < tokens_per_image), k, -1)


def attention_mask(t: int, device, docs: torch.Tensor | None = None, spans: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, T, T) boolean mask: causal, or both ways inside one image span (`spans` ids > 0),
    and only inside one document (`docs` ids)."""
    allowed = torch.ones(t, t, dtype=torch.bool, device=device).tril()[None]
    if spans is not None:
        allowed = allowed | ((spans[:, :, None] == spans[:, None, :]) & (spans[:, :, None] > 0))
    if docs is not None:
        allowed = allowed & (docs[:, :, None] == docs[:, None, :])
    return allowed[:, None]


def block_mask(t: int, device, docs: torch.Tensor | None, spans: torch.Tensor | None, flex: bool):
    """The mask of packed rows and/or images seen whole, built once per batch for every layer:
    FlexAttention's block mask (`flex`: CUDA; whole blocks of other documents are skipped), or
    the dense (B, 1, T, T) boolean mask for SDPA elsewhere."""
    if not flex:
        return attention_mask(t, device, docs, spans)
    from torch.nn.attention.flex_attention import create_block_mask

    ref = docs if docs is not None else spans
    docs_ = docs if docs is not None else torch.zeros_like(ref)
    spans_ = spans if spans is not None else torch.zeros_like(ref)

    def allowed(b, h, qi, ki):
        same_image = (spans_[b, qi] == spans_[b, ki]) & (spans_[b, qi] > 0)
        return ((qi >= ki) | same_image) & (docs_[b, qi] == docs_[b, ki])

    return create_block_mask(allowed, ref.shape[0], None, t, t, device=device)


_flex = None


def masked_attention(q, k, v, mask, dropout: float) -> torch.Tensor:
    """Attention under `block_mask`'s mask: FlexAttention, compiled (eager FlexAttention is a
    slow reference), for a block mask; SDPA for a dense one."""
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    global _flex
    if _flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex = torch.compile(flex_attention, dynamic=False)
    return _flex(q, k, v, block_mask=mask)


class KVCache:
    """Keys and values of the tokens seen so far, per layer: (B, H, T, D) each, preallocated to
    max_seq_len (static: decoding never reallocates). `length` counts the positions a prefill
    (`forward` with the cache) has written; `Transformer.decode` takes its position as a device
    tensor instead and leaves `length` alone."""

    def __init__(self, cfg: ModelConfig, batch: int, device, dtype=torch.float32):
        shape = (cfg.layers, batch, cfg.heads, cfg.max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.positions = torch.arange(cfg.max_seq_len, device=device)
        self.image_run = torch.zeros(batch, dtype=torch.long, device=device)  # image positions ending the sequence
        self.length = 0
        self._pending = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        end = self.length + t
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        self._pending = t
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self) -> None:
        """Called once per forward, after every layer has written its keys and values."""
        self.length += self._pending
        self._pending = 0


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        mask=None,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, layer, mask))
        return x + self.drop(self.ffn(self.ffn_norm(x)))

    def decode(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int, pos: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn.decode(self.attn_norm(x), cos, sin, cache, layer, pos)
        return x + self.ffn(self.ffn_norm(x))


class FactorCodes(nn.Module):
    """Rows (embeddings, or output-layer weights) of codes that are tuples of factors — the image
    tokenizer's (colour, mask) pairs: the row of code (a, b) = a * len(b's table) + b is the sum
    of a's row and b's row. A pair that training never showed still gets a row, built from
    factors it did (compositional codes: a red triangle's edge from red and a triangle's edge)."""

    def __init__(self, factors: tuple[int, ...], dim: int):
        super().__init__()
        self.tables = nn.ParameterList(nn.Parameter(torch.empty(f, dim)) for f in factors)
        for t in self.tables:
            nn.init.normal_(t, std=0.02)

    def weight(self) -> torch.Tensor:
        w = self.tables[0]
        for t in self.tables[1:]:
            w = (w[:, None, :] + t[None, :, :]).reshape(-1, w.shape[-1])
        return w


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        plain = cfg.vocab_size - cfg.factored_codes  # factored image codes are the vocabulary's last ids
        self.embed = nn.Embedding(plain, cfg.dim)
        self.stem = build_stem(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, plain, bias=False)
        if cfg.image_factors:
            self.code_embed = FactorCodes(cfg.image_factors, cfg.dim)
            self.code_head = FactorCodes(cfg.image_factors, cfg.dim)
        if cfg.image_positions == "grid":  # row and column of each image position in the patch grid
            self.image_row = nn.Embedding(cfg.grid_side, cfg.dim)
            self.image_col = nn.Embedding(cfg.grid_side, cfg.dim)
        cos, sin = rope_cache(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        if self.stem is not None:  # pixels need PyTorch's fan-in init, not the embeddings' 0.02:
            for m in self.stem.modules():  # at 0.02 a patch barely moves the residual stream
                if isinstance(m, nn.Linear):
                    m.reset_parameters()

    def embed_weight(self) -> torch.Tensor:
        """(vocab, dim): every id's input embedding."""
        if not self.cfg.image_factors:
            return self.embed.weight
        return torch.cat([self.embed.weight, self.code_embed.weight()])

    def head_weight(self) -> torch.Tensor:
        """(vocab, dim): the output layer's weight, a row per id."""
        if not self.cfg.image_factors:
            return self.head.weight
        return torch.cat([self.head.weight, self.code_head.weight()])

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        patches: torch.Tensor | None = None,
        docs: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        spans: torch.Tensor | None = None,
        head=None,
    ):
        """tokens (B, T) → logits (B, T, vocab); or, with `head`, whatever `head(states, weight)`
        makes of the final normed states (B, T, dim) and the output layer's weight (V, dim) —
        training's fused loss (nmm.train.loss.head_loss), which never holds the logits. With a
        cache, `tokens` continue the cached prefix (positions start at cache.length) and their
        keys and values are appended.
        Mid/late fusion: `patches` (B, tokens_per_image, patch_dim) are the pixels of each row's
        image, whose positions hold image ids in the token sequence.
        Packed rows: `docs` (B, T) document ids and `positions` (B, T) positions inside each
        document (nmm.data.sequences.pack_documents); attention stays inside a document.
        `spans` (B, T) (`image_spans`): the input images seen whole; used only when the config's
        image_attention is bidirectional."""
        if self.cfg.image_attention != "bidirectional":
            spans = None
        x = self.embed_inputs(tokens, patches)
        if self.cfg.image_positions == "grid":
            x = x + self.grid_embedding(tokens, cache)
        states = self.norm(self.hidden(x, cache, docs, positions, spans))
        weight = self.head_weight()
        return F.linear(states, weight) if head is None else head(states, weight)

    def grid_embedding(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(B, T, dim): row + column embeddings at the image positions, 0 elsewhere. With a cache,
        an image continued from the cached prefix keeps counting, and the cache learns how many
        image positions end these tokens."""
        cfg = self.cfg
        k = image_index(tokens, cfg.image_range, cfg.tokens_per_image, None if cache is None else cache.image_run)
        if cache is not None:
            run = (k[:, -1] + 1).clamp(min=0)
            cache.image_run.copy_(torch.where(k[:, -1] >= 0, run, 0))
        kk = k.clamp(min=0)
        return (self.image_row(kk // cfg.grid_side) + self.image_col(kk % cfg.grid_side)) * (k >= 0)[..., None]

    def embed_inputs(self, tokens: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        x = F.embedding(tokens, self.embed_weight())
        if self.stem is None:
            return x
        at = (tokens >= self.cfg.image_lo) & (tokens < self.cfg.image_hi)
        if patches is None:
            if bool(at.any()):
                raise ValueError(f"{self.cfg.fusion} fusion reads pixels: pass the image patches")
            return x
        if not bool((at.sum(1) == patches.shape[1]).all()):
            raise ValueError(f"each row needs exactly {patches.shape[1]} image positions")
        return x.masked_scatter(at[..., None], self.stem(patches.to(x.dtype)))

    def hidden(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        docs: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        spans: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings (B, T, dim) → final hidden states, before the output norm."""
        start = cache.length if cache is not None else 0
        t = x.shape[1]
        if start + t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + t} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        if positions is not None:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        else:
            cos, sin = self.rope_cos[start : start + t], self.rope_sin[start : start + t]
        mask = None
        if docs is not None or spans is not None:
            flex = x.is_cuda and not (self.training and self.cfg.dropout > 0)
            mask = block_mask(t, x.device, docs, spans, flex)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.advance()
        return x

    def decode(self, tokens: torch.Tensor, cache: KVCache, pos: torch.Tensor) -> torch.Tensor:
        """One decoding step with static shapes: tokens (B, 1) at position `pos` ((1,) long, on
        the device; the caller advances it) → logits (B, vocab). Text and image codes only (a
        mid/late-fusion image is read at prefill). What nmm.model.generate compiles."""
        x = F.embedding(tokens, self.embed_weight())
        if self.cfg.image_positions == "grid":
            x = x + self.grid_embedding(tokens, cache)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        for i, block in enumerate(self.blocks):
            x = block.decode(x, cos, sin, cache, i, pos)
        return F.linear(self.norm(x), self.head_weight())[:, -1]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
