"""One GPU check anyone can run: everything issue 13 measures, on whatever GPU this machine has,
in one go (well under 6 minutes on an H200), written to one JSON file.

    PYTHONPATH=platform:. python benchmarks/gpu_check.py            # the GPU, the 125M config
    PYTHONPATH=platform:. python benchmarks/gpu_check.py --device cpu  # a smoke run, small config

Imports torch, nmm.model, nmm.train and nmm.gpu only (no pydantic, MLflow or Ray: GPU machines
may lack them); the Hugging Face Llama baseline needs `transformers` and is skipped without it.
Sections, each timed and each failing on its own (the error is recorded, the rest still runs):

1. training throughput at batch 32 (small config on CPU): nmm eager and compiled vs the same-size
   Llama eager and compiled, fused AdamW, bf16; tokens/s, MFU, peak memory, the ratios;
2. the memory estimate (nmm.gpu.memory) vs `torch.cuda.max_memory_allocated` at batch 8 and 32;
3. decoding: `generate()` with the KV cache vs a full forward per token, batch 16, 64-token
   prompts, 256 new tokens;
4. FlexAttention (compiled, block mask once) vs SDPA with the dense mask on packed rows: time and
   the largest difference;
5. a short run of the real trainer (`nmm.train.trainer`) on generated shapes-like sequences,
   with NVML telemetry read at each logging step.

Writes benchmarks/results/gpu_check-<device>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import generate as gen_bench
import train_throughput as tt

from nmm.gpu import memory
from nmm.model import ModelConfig
from nmm.model.generate import generate
from nmm.model.transformer import block_mask, masked_attention
from nmm.train.parallelize import peak_flops

CONFIGS = {"cuda": (768, 12, 12, 32768, 1024), "cpu": (128, 2, 4, 1024, 128)}  # dim, layers, heads, vocab, seq


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / memory.GIB if device.type == "cuda" else None


def throughput(device, shape, batch, steps) -> dict:
    dim, layers, heads, vocab, seq = shape
    amp = device.type == "cuda"
    tokens = torch.randint(0, vocab, (batch, seq), device=device)
    peak = peak_flops(device)
    out = {}
    builders = [("nmm", tt.ours)]
    if importlib.util.find_spec("transformers") is not None:
        builders.append(("hf_llama", tt.llama))
    else:
        out["hf_llama"] = "skipped: transformers is not installed"
    for name, build in builders:
        for compiled in (False, True):
            torch.manual_seed(0)
            reset_peak(device)
            model = build(dim, layers, heads, vocab, seq)
            tps = tt.measure(name, model, tokens, steps, 3, device, amp, compile_blocks=compiled)
            key = f"{name}_{'compiled' if compiled else 'eager'}"
            out[key] = {"tokens_per_s": round(tps, 1), "peak_gib": peak_gib(device)}
            if peak:
                out[key]["mfu"] = round(tps * tt.flops_per_token(model, layers, heads, dim, seq, vocab) / peak, 4)
            del model
    for mode in ("eager", "compiled"):
        if f"hf_llama_{mode}" in out:
            out[f"ratio_nmm_over_llama_{mode}"] = round(
                out[f"nmm_{mode}"]["tokens_per_s"] / out[f"hf_llama_{mode}"]["tokens_per_s"], 3
            )
    return out


def memory_estimate(device, shape, batches) -> dict:
    if device.type != "cuda":
        return {"skipped": "max_memory_allocated needs CUDA; tests/unit/test_memory_estimate.py checks the CPU"}
    dim, layers, heads, vocab, seq = shape
    out = {}
    for batch in batches:
        torch.manual_seed(0)
        tokens = torch.randint(0, vocab, (batch, seq), device=device)
        reset_peak(device)
        model = tt.ours(dim, layers, heads, vocab, seq)
        tt.measure("nmm", model, tokens, 2, 1, device, True)
        measured = peak_gib(device)
        est = memory.estimate(dim, layers, heads, vocab, seq, batch, ffn_dim=model.cfg.ffn_dim, qk_norm=True)
        # the CUDA context is not in max_memory_allocated: compare what the allocator holds
        held = est.total_gib - est.overhead_gib
        out[f"batch_{batch}"] = {
            "estimate_gib": round(held, 2),
            "measured_gib": round(measured, 2),
            "ratio": round(held / measured, 3),
            "estimate": est.describe(),
        }
        del model
    return out


def decoding(device, shape, batch=16, prompt=64, new=256) -> dict:
    dim, layers, heads, vocab, _ = shape
    torch.manual_seed(0)
    model = (
        ModelConfig(vocab_size=vocab, dim=dim, layers=layers, heads=heads, max_seq_len=prompt + new).build().to(device)
    )
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    prompts = torch.randint(0, vocab, (batch, prompt), device=device)
    allowed = (0, vocab)
    out = {"batch": batch, "prompt": prompt, "new_tokens": new, "dtype": str(next(model.parameters()).dtype)}
    for step in ("compiled", "eager"):  # generate's decode step: compiled (a CUDA graph on GPUs) or eager
        compiled = step == "compiled"
        generate(model, prompts.tolist(), 4, allowed, compiled=compiled)  # warm up (and compile) at this batch shape
        _, seconds = gen_bench.timed(
            lambda compiled=compiled: generate(model, prompts.tolist(), new, allowed, compiled=compiled), device.type
        )
        out[f"cached_{step}_tokens_per_s"] = round(batch * new / seconds, 1)
        out[f"cached_{step}_ms_per_step"] = round(1000 * seconds / new, 2)
    _, uncached_s = gen_bench.timed(lambda: gen_bench.uncached(model, prompts, new, allowed), device.type)
    out["uncached_tokens_per_s"] = round(batch * new / uncached_s, 1)
    best = max(out["cached_compiled_tokens_per_s"], out["cached_eager_tokens_per_s"])
    out["cached_over_uncached_ratio"] = round(best / out["uncached_tokens_per_s"], 2)
    return out


def flex_vs_dense(device, shape, batch=8) -> dict:
    if device.type != "cuda":
        return {"skipped": "FlexAttention is nmm's CUDA path; the CPU uses the dense mask"}
    dim, _, heads, _, seq = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    docs = torch.cumsum(torch.rand(batch, seq, generator=g) < 4 / seq, dim=1).to(device)  # ~4 documents a row
    q, k, v = (torch.randn(batch, heads, seq, dim // heads, device=device, dtype=torch.bfloat16) for _ in range(3))

    def run(flex):
        mask = block_mask(seq, device, docs, None, flex)
        return masked_attention(q, k, v, mask, 0.0)

    out = {}
    for name, flex in (("flex", True), ("dense", False)):
        run(flex)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            y = run(flex)
        sync(device)
        out[f"{name}_ms"] = round(100 * (time.perf_counter() - t0), 3)
        out[f"_{name}"] = y
    out["max_abs_diff"] = float((out.pop("_flex").float() - out.pop("_dense").float()).abs().max())
    return out


def trainer_run(device, steps=40) -> dict:
    from nmm.gpu import inventory
    from nmm.train.batches import TrainData
    from nmm.train.distributed import DistInfo
    from nmm.train.trainer import PhaseConfig, TrainConfig, train

    # shapes-like rows: a text prefix, <boi>, 64 image codes, <eoi>, a caption; half M2T, half M2G
    g = np.random.default_rng(0)
    rows, width, text, image = 512, 96, (5, 1000), (1000, 1512)
    tokens = np.zeros((rows, width), np.int32)
    tokens[:, :16] = g.integers(*text, (rows, 16))
    tokens[:, 16:80] = g.integers(*image, (rows, 64))
    tokens[:, 80:] = g.integers(*text, (rows, 16))
    data = TrainData(
        tokens=tokens,
        loss_mask=np.ones_like(tokens, np.uint8),
        task=(np.arange(rows) % 2).astype(np.int8),
        image_range=image,
        text_range=text,
    )
    cfg = TrainConfig(
        model=ModelConfig(vocab_size=1512, dim=256, layers=4, heads=4, max_seq_len=128, image_lo=1000, image_hi=1512),
        phases=(PhaseConfig(name="pretrain", steps=steps, batch_size=32, lr=1e-3, mixture={"m2t": 0.5, "m2g": 0.5}),),
        checkpoint_interval=10**6,
        log_every=10,
    )
    logged = []

    def log(metrics, step):
        logged.append({"step": step, **metrics, **(inventory.telemetry() if device.type == "cuda" else {})})

    import tempfile

    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        _, summary = train(cfg, data, DistInfo(0, 0, 1, device), Path(root).as_uri(), log)
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "first_loss": logged[0]["train/loss"],
        "final_loss": summary["final_loss"],
        "tokens_per_s": summary["tokens_per_s"],
        "logged": logged,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per model (default: 20 GPU, 3 CPU)")
    args = ap.parse_args()
    device = torch.device(args.device)
    shape = CONFIGS[device.type]
    steps = args.steps or (20 if device.type == "cuda" else 3)
    sections = {
        "throughput_batch32": lambda: throughput(device, shape, 32 if device.type == "cuda" else 4, steps),
        "memory_estimate": lambda: memory_estimate(device, shape, (8, 32)),
        "decode": lambda: decoding(device, shape, new=256 if device.type == "cuda" else 32),
        "flex_attention": lambda: flex_vs_dense(device, shape),
        "trainer": lambda: trainer_run(device, 40 if device.type == "cuda" else 4),
    }
    report = {
        "benchmark": "gpu_check",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "config": dict(zip(("dim", "layers", "heads", "vocab", "seq_len"), shape)),
    }
    t_all = time.perf_counter()
    for name, run in sections.items():
        t0 = time.perf_counter()
        try:
            report[name] = run()
        except Exception as exc:  # one section's failure must not lose the others' figures
            report[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=4)}
        report[name + "_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{name} ({report[name + '_seconds']} s): {json.dumps(report[name], default=str)[:600]}", flush=True)
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    out = Path(__file__).parent / "results" / f"gpu_check-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"all sections in {report['seconds']} s; saved {out}")


if __name__ == "__main__":
    main()
