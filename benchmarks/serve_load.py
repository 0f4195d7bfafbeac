"""Serving throughput: `/v1/chat/completions` requests/s and p50/p99 latency at concurrency 1, 8 and
32, with dynamic batching on (`--max-batch 32`) and off (`--max-batch 1`), same model, same run.

    python benchmarks/serve_load.py                     # a quickstart-size model (random weights)
    python benchmarks/serve_load.py --requests 64       # a quicker look

The model has the quickstart's shape (d128, 4 layers, 8×8 digits, 16 image codes) with random
weights: every answer runs to `max_tokens`, so each request does the same work. The load comes from
threads in this process, the server is `nmm serve` in its own. Prints a table and writes
benchmarks/results/serve_load.json. Target (issue 12): batching ≥ 3x the throughput at concurrency 32.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from nmm.ports import free_port

NMM = str(Path(sys.executable).parent / "nmm")


def publish_model(folder: Path) -> None:
    from nmm import storage
    from nmm.data.sequences import instruction_texts
    from nmm.data.sources import load_digits
    from nmm.model import ModelConfig
    from nmm.serve.model_dir import model_files
    from nmm.tokenizers import PatchVQ, SharedVocab, TextTokenizer

    d = load_digits(2)
    vq = PatchVQ.fit(d.images[:1000], 2, 32, seed=0)
    text = TextTokenizer.train("bpe", [c for cs in d.captions for c in cs] + instruction_texts(200), 160)
    vocab = SharedVocab(text_size=text.size, image_size=vq.size)
    model = ModelConfig(vocab_size=vocab.size, dim=128, layers=4, heads=4, max_seq_len=128).build()
    config = {
        "model": json.loads(model.cfg.to_json()),
        "vocab": {"text_size": vocab.text_size, "image_size": vocab.image_size},
        "tokens_per_image": vq.tokens_per_image,
        "image_shape": list(vq.image_shape),
        "source": "digits",
        "prompts": "plain",
    }
    files = model_files(model, config, {"text": text.to_bytes(), "image": vq.to_bytes()})
    storage.publish(folder.as_uri(), files, {"kind": "nmm.model"})


def image_url() -> str:
    from PIL import Image

    from nmm.data.sources import load_digits

    pixels = (load_digits(1).images[0][..., 0] * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def start(folder: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            NMM,
            "serve",
            folder.as_uri(),
            "--port",
            str(port),
            "--max-batch",
            str(max_batch),
            "--max-wait-ms",
            "10",
            "--max-queue",
            "1024",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(base + "/healthz", timeout=1)
            return proc, base
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("nmm serve did not start")


def load(base: str, body: bytes, concurrency: int, requests: int) -> dict:
    def one(_):
        t0 = time.perf_counter()
        req = urllib.request.Request(
            base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=300) as r:
            assert r.status == 200
            r.read()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = np.array(list(pool.map(one, range(requests))))
    wall = time.perf_counter() - t0
    return {
        "requests": requests,
        "requests_per_s": round(requests / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1),
        "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=128, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="nmm-bench-serve-"))
    publish_model(folder)
    body = json.dumps(
        {
            "model": "nmm",
            "max_tokens": args.max_tokens,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url()}}]}],
        }
    ).encode()
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "max_tokens": args.max_tokens,
        "runs": {},
    }
    for mode, max_batch in (("batching", 32), ("no_batching", 1)):
        proc, base = start(folder, max_batch)
        try:
            load(base, body, 4, 8)  # warm up
            report["runs"][mode] = {
                str(c): load(base, body, c, args.requests if c > 1 else max(16, args.requests // 4)) for c in (1, 8, 32)
            }
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    on, off = report["runs"]["batching"]["32"], report["runs"]["no_batching"]["32"]
    report["ratio_batching_at_32"] = round(on["requests_per_s"] / off["requests_per_s"], 2)
    out = Path(__file__).parent / "results" / "serve_load.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{'mode':12s} {'conc':>4s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for mode, runs in report["runs"].items():
        for c, r in runs.items():
            print(f"{mode:12s} {c:>4s} {r['requests_per_s']:8.2f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f}")
    print(f"batching at concurrency 32: {report['ratio_batching_at_32']}x the throughput; wrote {out}")


if __name__ == "__main__":
    main()
