"""Decoding speed: `nmm.model.generate` (KV cache, tokens and stop flags kept on the device) against
the same model recomputing the whole sequence for every new token, same prompts, same run.

    python benchmarks/generate.py                       # this machine's device (cuda if present)
    python benchmarks/generate.py --device cpu --new 256

Greedy, batch 16, 64-token prompts, `--new` new tokens (no stop token, so every row runs to the
end). Both paths must produce the same tokens (checked). Prints tokens/s and the ratio and writes
benchmarks/results/generate-<device>.json with `cached_over_uncached_ratio`. Target (issue 13):
cached ≥ 5x uncached at 256 new tokens, on CPU and on GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from nmm.model import ModelConfig
from nmm.model.generate import generate

SIZES = {"small": (256, 4, 4, 2048), "125m": (768, 12, 12, 32768)}  # dim, layers, heads, vocab


@torch.no_grad()
def uncached(model, prompts: torch.Tensor, new: int, allowed: tuple[int, int]) -> list[list[int]]:
    """The full forward over everything so far, for every new token."""
    seq = prompts
    mask = torch.full((model.cfg.vocab_size,), float("-inf"), device=seq.device)
    mask[allowed[0] : allowed[1]] = 0.0
    for _ in range(new):
        logits = model(seq)[:, -1, :].float() + mask
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompts.shape[1] :].tolist()


def timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: small on CPU, 125m on GPU")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=256)
    args = ap.parse_args()
    size = args.size or ("125m" if args.device == "cuda" else "small")
    dim, layers, heads, vocab = SIZES[size]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, dim=dim, layers=layers, heads=heads, max_seq_len=args.prompt + args.new)
    model = cfg.build().to(args.device).eval()
    prompts = torch.randint(0, vocab, (args.batch, args.prompt), device=args.device)
    allowed = (0, vocab)
    generate(model, prompts[:2, :8].tolist(), 4, allowed)  # warm up
    eager = args.device != "cuda"  # generate's default: the compiled step on CUDA only
    cached_out, t_cached = timed(lambda: generate(model, prompts.tolist(), args.new, allowed), args.device)
    plain_out, t_plain = timed(lambda: uncached(model, prompts, args.new, allowed), args.device)
    same = sum(a == b for a, b in zip(cached_out, plain_out))
    # the other decode step: compiled on the CPU, eager on CUDA (compiling once, outside the timing)
    generate(model, prompts.tolist(), 2, allowed, compiled=eager)
    other_out, t_other = timed(
        lambda: generate(model, prompts.tolist(), args.new, allowed, compiled=eager), args.device
    )
    tokens = args.batch * args.new
    result = {
        "device": args.device,
        "machine": platform.node(),
        "torch": torch.__version__,
        "size": size,
        "batch": args.batch,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "cached_tokens_per_s": tokens / t_cached,
        "uncached_tokens_per_s": tokens / t_plain,
        "cached_ms_per_step": 1000 * t_cached / args.new,
        "uncached_ms_per_step": 1000 * t_plain / args.new,
        "cached_over_uncached_ratio": t_plain / t_cached,
        "rows_identical": f"{same}/{args.batch}",
        "cached_step": "eager" if eager else "compiled (CUDA graph)",
        f"cached_{'compiled' if eager else 'eager'}_tokens_per_s": tokens / t_other,
        f"cached_{'compiled' if eager else 'eager'}_rows_identical": (
            f"{sum(a == b for a, b in zip(other_out, cached_out))}/{args.batch}"
        ),
    }
    print(f"{'path':10} {'tokens/s':>10} {'ms/step':>9}")
    print(f"{'cached':10} {result['cached_tokens_per_s']:10.0f} {result['cached_ms_per_step']:9.1f}")
    print(f"{'uncached':10} {result['uncached_tokens_per_s']:10.0f} {result['uncached_ms_per_step']:9.1f}")
    other = "compiled" if eager else "eager"
    print(f"{'cached, ' + other:10} {tokens / t_other:10.0f} {1000 * t_other / args.new:9.1f}")
    print(
        f"cached is {result['cached_over_uncached_ratio']:.2f}x uncached ({size}, {args.device}); "
        f"rows identical {same}/{args.batch}"
    )
    out = Path(__file__).parent / "results" / f"generate-{args.device}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
