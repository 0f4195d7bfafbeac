"""Where things live in the store: the one definition of the layout (the compiler, the stages and
the CLI all build keys here).

    <store>/runs/<namespace>/<pipeline>/<owner-uid>/<run-id>/<step>/   a step's outputs and logs
    <store>/cache/<namespace>/<stage>/<cache-key>.json                  content-addressed reuse

Parts may be Argo placeholders (`{{workflow.name}}`): the compiler lays out URIs before the run.
"""

from __future__ import annotations

from nmm.identity import RunIdentity
from nmm.storage.objects import join


def run_uri(store: str, run: RunIdentity) -> str:
    return join(store, "runs", run.namespace, run.pipeline, run.owner_uid, run.run_id)


def stage_uri(store: str, run: RunIdentity, step: str) -> str:
    """Where a step (`curate`, `train`, `train-<variant>`, …) publishes its outputs and logs."""
    return join(run_uri(store, run), step)


def cache_index_uri(store: str, namespace: str, stage: str, key: str) -> str:
    """A stage's cache entry: content-addressed within one namespace (never shared across)."""
    return join(store, "cache", namespace, stage, f"{key}.json")
