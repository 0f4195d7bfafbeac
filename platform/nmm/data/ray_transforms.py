"""Per-sample transforms on Ray Data: VQ-encode each image and tokenize its texts (captions,
questions, answers).

`ray.init` is local by default; with `RAY_ADDRESS` set the same code runs on a (Kube)Ray cluster.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np


def init_ray():
    import ray

    if ray.is_initialized():
        return ray
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        # A private local cluster for this process only: token auth protects shared clusters.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        tmp = os.path.join(tempfile.gettempdir(), "nmm-ray")
        ray.init(num_cpus=os.cpu_count() or 2, _temp_dir=tmp, **kwargs)
    return ray


def _transform(batch: dict, vq_bytes: bytes, text_bytes: bytes) -> dict:
    from nmm.tokenizers.image import load_image_tokenizer
    from nmm.tokenizers.text import TextTokenizer

    vq = load_image_tokenizer(vq_bytes)
    text = TextTokenizer.from_bytes(text_bytes)
    codes = vq.encode(batch["image"])
    ids = [json.dumps([text.encode(c) for c in json.loads(caps)]) for caps in batch["captions"]]
    return {"index": batch["index"], "codes": codes, "text": np.asarray(ids)}


def tokenize_samples(
    images: np.ndarray,
    texts: list[list[str]],
    vq_bytes: bytes,
    text_bytes: bytes,
    *,
    engine: str = "ray",
    batch_size: int = 256,
):
    """Returns (codes (N, P) int32, per-image list of token-id lists, one per text).

    `engine="loop"` runs the same transform over the same batches in this process (for inputs so
    small that Ray's start-up would dominate); both give the same arrays."""
    items = {
        "index": np.arange(len(images)),
        "image": images,
        "captions": np.asarray([json.dumps(t) for t in texts], dtype=object),
    }
    if engine == "loop":
        out = [
            _transform({k: v[i : i + batch_size] for k, v in items.items()}, vq_bytes, text_bytes)
            for i in range(0, len(images), batch_size)
        ]
        codes = np.concatenate([b["codes"] for b in out]) if out else np.zeros((0, 0))
        text = [str(t) for b in out for t in b["text"]]
        return codes.astype(np.int32), [json.loads(t) for t in text]
    init_ray()
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False

    rows = [{"index": i, "image": images[i], "captions": items["captions"][i]} for i in range(len(images))]
    ds = ray.data.from_items(rows).map_batches(
        _transform, fn_args=(vq_bytes, text_bytes), batch_format="numpy", batch_size=batch_size
    )
    done = sorted(ds.take_all(), key=lambda r: int(r["index"]))
    codes = np.stack([r["codes"] for r in done]).astype(np.int32)
    return codes, [json.loads(str(r["text"])) for r in done]


def shutdown():
    import ray

    if ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        ray.shutdown()
