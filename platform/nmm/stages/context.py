"""What every stage gets from its command line: the spec, the run, the store, where outputs go."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from nmm import storage
from nmm.spec import PipelineSpec, parse_pipeline_document, step_name
from nmm.version import code_version


STAGES = ("curate", "train", "evaluate", "rollout", "finalize")


def stage_uri(store: str, pipeline: str, run_id: str, stage: str) -> str:
    """`<store>/runs/<pipeline>/<run-id>/<stage>`: where a stage publishes its outputs and logs."""
    return storage.join(store, "runs", pipeline, run_id, stage)


class UnknownVariant(ValueError):
    """--variant names no variant of the spec."""


@dataclass(frozen=True)
class StageContext:
    spec: PipelineSpec  # with the variant's overrides applied
    run_id: str
    store: str
    outputs: Path
    variant: str | None = None

    @classmethod
    def create(cls, spec_json: str, run_id: str, store: str, outputs: str, variant: str | None = None) -> "StageContext":
        spec = parse_pipeline_document(json.loads(spec_json), "--spec")
        if variant is not None:
            if variant not in spec.variant_names:
                raise UnknownVariant(f"{variant!r} is not one of the spec's variants {spec.variant_names}")
            spec = spec.for_variant(variant)
        return cls(spec, run_id, store.rstrip("/"), Path(outputs), variant)

    @property
    def pipeline(self) -> str:
        return self.spec.metadata.name

    def step(self, stage: str) -> str:
        """The step's name: the stage, suffixed with the variant (`train-mid`) in an ablation."""
        return step_name(stage, self.variant)

    def stage_uri(self, stage: str) -> str:
        return stage_uri(self.store, self.pipeline, self.run_id, stage)

    def write_outputs(self, values: dict[str, str]) -> None:
        """Output parameters, one file each (what Argo's `valueFrom.path` reads)."""
        self.outputs.mkdir(parents=True, exist_ok=True)
        for name, value in values.items():
            (self.outputs / name).write_text(value)


def cache_key(*parts) -> str:
    """hash(code version, canonical stage spec, input digests)."""
    h = hashlib.sha256(code_version().encode())
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, separators=(",", ":"), default=str).encode())
    return h.hexdigest()[:32]


def setup_logging() -> logging.Logger:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    return logging.getLogger("nmm.stage")
