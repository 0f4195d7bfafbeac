"""Atomic, resumable checkpoints in the object store.

A checkpoint is `<dir>/step-<N>/state.pt` published with its manifest LAST (the commit marker):
a crash mid-save leaves no manifest, so it is never loaded. `latest.json` names the committed
steps; older ones are deleted only after the new one is committed (keepLatest).
"""

from __future__ import annotations

import io

import torch

from nmm import storage


def _step_dir(root: str, step: int) -> str:
    return storage.join(root, f"step-{step:08d}")


def save(root: str, step: int, state: dict, keep_latest: int) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.publish(_step_dir(root, step), {"state.pt": buf.getvalue()}, {"step": step})
    index_uri = storage.join(root, "latest.json")
    steps = storage.read_json(index_uri)["steps"] if storage.exists(index_uri) else []
    steps = sorted(set(steps) | {step})
    keep, drop = steps[-keep_latest:], steps[:-keep_latest]
    storage.write_json(index_uri, {"steps": keep, "latest": keep[-1]})
    for old in drop:
        for name in ("manifest.json", "state.pt"):  # manifest first: uncommit, then delete
            storage.delete(storage.join(_step_dir(root, old), name))


def load_latest(root: str) -> tuple[int, dict] | None:
    """(step, state) of the newest committed checkpoint, or None."""
    index_uri = storage.join(root, "latest.json")
    if not storage.exists(index_uri):
        return None
    for step in reversed(storage.read_json(index_uri)["steps"]):
        folder = _step_dir(root, step)
        manifest = storage.read_manifest(folder)
        if manifest is None:
            continue
        data = storage.read_file(folder, manifest, "state.pt")
        return step, torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    return None
