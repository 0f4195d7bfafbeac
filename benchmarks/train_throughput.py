"""Training throughput of nmm's early-fusion transformer vs a same-size Hugging Face Llama,
on the same data and device, in the same run (the ratio is the figure; absolute tokens/s depend
on the machine). On CUDA also MFU, counted the torchtitan way:
FLOPs/token = 6·N + 12·L·H·Q·T (N parameters without embeddings, L layers, H heads, Q head dim,
T sequence length), against the device's dense bf16 peak (H100: 989 TFLOP/s).

    python benchmarks/train_throughput.py --device cpu            # tiny config, CPU
    python benchmarks/train_throughput.py --device cuda --size 125m   # on a GPU machine

Prints a table and writes benchmarks/results/train_throughput-<device>-<size>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from nmm.model import ModelConfig
from nmm.train.loss import head_loss
from nmm.train.parallelize import PEAK_BF16_FLOPS, transformer_flops_per_token

SIZES = {
    # name: (dim, layers, heads, vocab, seq_len, batch)
    "tiny": (128, 4, 4, 512, 64, 32),
    "small": (256, 6, 8, 4096, 128, 16),
    "125m": (768, 12, 12, 32768, 1024, 8),
}


def ours(dim, layers, heads, vocab, seq):
    return ModelConfig(vocab_size=vocab, dim=dim, layers=layers, heads=heads, max_seq_len=seq).build()


def llama(dim, layers, heads, vocab, seq):
    from transformers import LlamaConfig, LlamaForCausalLM

    ffn = ModelConfig(vocab_size=vocab, dim=dim).ffn_dim  # same SwiGLU width as ours
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg)


def measure(name, model, tokens, steps, warmup, device, amp, compile_blocks=False):
    """Tokens/s of `steps` training steps after `warmup` (fused AdamW, as nmm trains; nmm with
    its fused output layer + loss). `compile_blocks`: torch.compile each decoder layer first."""
    model.to(device).train()
    if compile_blocks:
        layers = model.blocks if name == "nmm" else model.model.layers
        for block in layers:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    mask = torch.ones_like(tokens)
    vocab = model.cfg.vocab_size if name == "nmm" else 0
    head = head_loss(tokens, mask, {"image": (vocab, vocab)}, 1e-4, norms=False) if name == "nmm" else None

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if name == "nmm":
                loss, _ = model(tokens, head=head)
            else:
                loss = model(input_ids=tokens, labels=tokens).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return tokens.numel() * steps / wall


def flops_per_token(model, layers, heads, dim, seq, vocab):
    n = sum(p.numel() for p in model.parameters()) - vocab * dim  # without the embedding table
    return transformer_flops_per_token(n, layers, heads, dim // heads, seq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    size = args.size or ("125m" if device.type == "cuda" else "tiny")
    dim, layers, heads, vocab, seq, batch = SIZES[size]
    steps = args.steps or (20 if device.type == "cuda" else 10)
    amp = device.type == "cuda"
    torch.manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq), device=device)
    results = {}
    for name, build in (("nmm", ours), ("hf_llama", llama)):
        torch.manual_seed(0)
        model = build(dim, layers, heads, vocab, seq)
        tps = measure(name, model, tokens, steps, args.warmup, device, amp)
        entry = {"tokens_per_s": round(tps, 1), "params": sum(p.numel() for p in model.parameters())}
        if device.type == "cuda":
            gpu = torch.cuda.get_device_name(device)
            peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
            if peak:
                entry["mfu"] = round(tps * flops_per_token(model, layers, heads, dim, seq, vocab) / peak, 4)
        results[name] = entry
        del model
    ratio = results["nmm"]["tokens_per_s"] / results["hf_llama"]["tokens_per_s"]
    report = {
        "benchmark": "train_throughput",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "size": size,
        "config": dict(zip(("dim", "layers", "heads", "vocab", "seq_len", "batch"), SIZES[size])),
        "steps": steps,
        "bf16": amp,
        "torch": torch.__version__,
        "results": results,
        "ratio_nmm_over_hf_llama": round(ratio, 3),
    }
    out = Path(__file__).parent / "results" / f"train_throughput-{device.type}-{size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{'model':<10} {'params':>12} {'tokens/s':>12}" + ("  MFU" if device.type == "cuda" else ""))
    for name, r in results.items():
        print(
            f"{name:<10} {r['params']:>12,} {r['tokens_per_s']:>12,.0f}"
            + (f"  {r.get('mfu', 0):.1%}" if "mfu" in r else "")
        )
    print(f"ratio nmm / hf_llama: {ratio:.3f}   (saved {out})")


if __name__ == "__main__":
    main()
