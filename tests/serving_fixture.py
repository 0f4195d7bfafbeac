"""Models to serve in tests.

`publish_small_model`: a small untrained model published as train publishes it (its words are
noise; protocols are what such tests check).

For the canary tests: `register_champion` registers a weak model (the small untrained one) as
version 1 and `champion` of the registry a local run uses; then one real local pipeline run of a
small digits captioner with `rollout.serving` (400 steps) passes the offline comparison and is
rolled out as a canary against it. `early_model` publishes an interval checkpoint of that run
(step 100) as a model folder: the deliberately worse candidate."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from nmm.ports import free_port
from tests.conftest import NMM, wait_for

SPEC = """\
apiVersion: nmm.dev/v1alpha1
kind: NMMPipeline
metadata:
  name: canary
spec:
  data:
    sources: [{kind: digits}]
    split: {train: 0.7, val: 0.1, test: 0.2}
    curation: {dedup: exact}
    captionsPerImage: 2
  model:
    fusion: early
    tasks: [m2t]
    size: {dim: 64, layers: 2, heads: 2, dropout: 0.0}
    tokenizers:
      text: {kind: bpe, vocabSize: 160}
      image: {kind: patch-vq, patchSize: 2, codebookSize: 32}
  training:
    seed: 0
    phases:
      - {name: sft, recipe: sft, steps: STEPS, batchSize: 64, lr: 0.003, warmupSteps: 20, mixture: {m2t: 1.0}}
    resources: {nodes: 1, processesPerNode: 1}
    checkpoint: {intervalSteps: 100, keepLatest: 1}
  evaluation:
    suites: [m2t.digits]
    gates: ["m2t.digits.accuracy >= 0.0"]
    seesaw: SEESAW
  rollout:
    registeredModelName: nmm-canary
    serving:
      canary:
        steps: [{weight: 20, pauseSeconds: 2}, {weight: 50, pauseSeconds: 2}, {weight: 100, pauseSeconds: 1}]
        analysis:
          minRequests: 5
          maxP95LatencyMs: 20000
          maxTimeToFirstTokenMs: 20000
          qualityProbe: {cases: 40, maxQualityDrop: 0.05}
"""


def clean_env(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "NMM_HOME", "NMM_STORE", "NMM_S3_ENDPOINT", "NMM_S3_BUCKET", "RAY_ADDRESS")
    }
    return env | {"NMM_HOME": str(home)}


def run_pipeline(cwd: Path, name: str, steps: int, seesaw: bool) -> subprocess.CompletedProcess:
    spec = cwd / f"{name}.yaml"
    spec.write_text(SPEC.replace("STEPS", str(steps)).replace("SEESAW", str(seesaw).lower()))
    r = subprocess.run(
        [NMM, "run", str(spec)], cwd=cwd, env=clean_env(cwd / ".nmm"), capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def register_champion(cwd: Path, name: str, accuracy: float) -> str:
    """The small untrained model published under `cwd`'s store and registered as version 1 of
    `name`, holding `champion`, with the metric the rollout compares against; its folder URI."""
    from mlflow.tracking import MlflowClient

    from nmm import storage

    folder = (cwd / ".nmm" / "store" / "champion").as_uri()
    publish_small_model(folder)
    manifest = storage.read_manifest(folder, verify=True)
    db = f"sqlite:///{cwd / '.nmm' / 'mlflow.db'}"
    (cwd / ".nmm").mkdir(exist_ok=True)
    client = MlflowClient(tracking_uri=db, registry_uri=db)
    client.create_registered_model(name)
    client.create_model_version(
        name,
        source=folder,
        tags={
            "nmm.model_store_uri": folder,
            "nmm.model_digest": manifest["digest"],
            "nmm.metric.m2t.digits.accuracy": f"{accuracy:.6f}",
        },
    )
    client.set_registered_model_alias(name, "champion", "1")
    return folder


def model_folder(cwd: Path, version: int) -> str:
    """The published folder of a registered version (its registry tag)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / '.nmm' / 'mlflow.db'}")
    return client.get_model_version("nmm-canary", str(version)).tags["nmm.model_store_uri"]


def early_model(folder: str, out: str) -> int:
    """Publish the earliest interval checkpoint of the model at `folder` as a model folder at
    `out` (same tokenizers, its own prompt style); returns its step."""
    from nmm import storage
    from nmm.serve.model_dir import CONFIG, WEIGHTS, read_files

    manifest = storage.read_manifest(folder, verify=True)
    snap = min(manifest["snapshots"], key=lambda s: s["step"])
    files = read_files(lambda name: storage.read_file(folder, manifest, name))
    config = json.loads(files[CONFIG]) | {"prompts": snap["prompts"]}
    files |= {
        WEIGHTS: storage.read_file(folder, manifest, snap["file"]),
        CONFIG: json.dumps(config, indent=2, sort_keys=True).encode(),
    }
    storage.publish(out, files, {"kind": "nmm.model", "steps": snap["step"]})
    return snap["step"]


def small_model_files(max_seq_len: int = 96, **config) -> dict[str, bytes]:
    """A small untrained model's published files (`config` overrides its config.json's keys)."""
    from nmm.data.sequences import instruction_texts
    from nmm.data.sources import load_digits
    from nmm.model import ModelConfig
    from nmm.serve.model_dir import model_files
    from nmm.tokenizers import PatchVQ, SharedVocab, TextTokenizer

    d = load_digits(1)
    vq = PatchVQ.fit(d.images[:300], 2, 16, seed=0)
    text = TextTokenizer.train("bpe", [c for cs in d.captions[:300] for c in cs] + instruction_texts(50), 128)
    vocab = SharedVocab(text_size=text.size, image_size=vq.size)
    torch_model = ModelConfig(vocab_size=vocab.size, dim=32, layers=1, heads=2, max_seq_len=max_seq_len).build()
    base = {
        "model": json.loads(torch_model.cfg.to_json()),
        "vocab": {"text_size": vocab.text_size, "image_size": vocab.image_size},
        "tokens_per_image": vq.tokens_per_image,
        "image_shape": list(vq.image_shape),
        "source": "digits",
        "prompts": "plain",
    }
    return model_files(torch_model, base | config, {"text": text.to_bytes(), "image": vq.to_bytes()})


def publish_small_model(folder: str, max_seq_len: int = 96) -> None:
    from nmm import storage

    storage.publish(folder, small_model_files(max_seq_len), {"kind": "nmm.model"})


def png_url(side: int = 8) -> str:
    pixels = (np.random.default_rng(0).random((side, side)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class InProcess:
    """`create_app` under uvicorn in a thread of this process, so a test can break its model."""

    def __init__(self, model_dir, **app_options):
        import uvicorn

        from nmm.serve import http as serve_http
        from nmm.serve.model_dir import load_from_dir
        from nmm.serve.server import create_app

        self.port = free_port()
        app = create_app(load_from_dir(model_dir), "nmm", max_wait_ms=20, **app_options)
        self.server = uvicorn.Server(serve_http.config(app, "127.0.0.1", self.port))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "uvicorn started")
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def counts(base: str) -> dict[tuple[str, str], float]:
    """`nmm_requests_total` by (route, status), read from the server's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    return {
        (s.labels["route"], s.labels["status"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "nmm_requests_total"
    }
