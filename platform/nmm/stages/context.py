"""What every stage gets from its command line: the spec, the run, the store, where outputs go."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from nmm import storage
from nmm.identity import RunIdentity
from nmm.spec import PipelineSpec, names, step_name
from nmm.spec.parse import parse_json
from nmm.storage import layout
from nmm.version import code_version

STAGES = names.STAGES + (names.EXIT_STAGE,)


class UnknownVariant(ValueError):
    """--variant names no variant of the spec."""


class ModelMissing(RuntimeError):
    """A model URI with no published manifest."""


class OutputsConflict(RuntimeError):
    """Outputs already published under this run's identity were made from something else (their
    cache key differs): nmm neither reuses nor overwrites them."""


@dataclass(frozen=True)
class StageContext:
    spec: PipelineSpec  # with the variant's overrides applied
    run: RunIdentity
    store: str
    outputs: Path
    variant: str | None = None
    outputs_uri: str | None = None  # also write the output parameters here, as JSON (a RayJob's driver)

    @classmethod
    def create(
        cls,
        spec_json: str,
        namespace: str,
        owner_uid: str,
        run_id: str,
        store: str,
        outputs: str,
        variant: str | None = None,
        outputs_uri: str | None = None,
    ) -> StageContext:
        spec = parse_json(spec_json, "--spec")
        if variant is not None:
            if variant not in spec.variant_names:
                raise UnknownVariant(f"{variant!r} is not one of the spec's variants {spec.variant_names}")
            spec = spec.for_variant(variant)
        run = RunIdentity(namespace, spec.metadata.name, owner_uid, run_id)
        return cls(spec, run, store.rstrip("/"), Path(outputs), variant, outputs_uri)

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def pipeline(self) -> str:
        return self.spec.metadata.name

    def step(self, stage: str) -> str:
        """The step's name: the stage, suffixed with the variant (`train-mid`) in an ablation."""
        return step_name(stage, self.variant)

    def stage_uri(self, step: str) -> str:
        return layout.stage_uri(self.store, self.run, step)

    def cache_index_uri(self, stage: str, key: str) -> str:
        return layout.cache_index_uri(self.store, self.run.namespace, stage, key)

    def reusable(self, uri: str, key: str) -> dict | None:
        """The manifest of outputs published at `uri` under this identity when they were made
        from the same inputs (cache key); None when nothing is published there. Anything else
        published there is a conflict, never silently reused."""
        manifest = storage.read_manifest(uri, verify=True)
        if manifest is None:
            return None
        if manifest.get("cache_key") != key:
            raise OutputsConflict(
                f"{uri} already holds outputs of cache key {manifest.get('cache_key')!r}, not {key!r}: they were "
                "made from another spec, dataset or code version; refusing to reuse or overwrite them"
            )
        return manifest

    def write_outputs(self, values: dict[str, str]) -> None:
        """Output parameters, one file each (what Argo's `valueFrom.path` reads)."""
        self.outputs.mkdir(parents=True, exist_ok=True)
        for name, value in values.items():
            (self.outputs / name).write_text(value)
        if self.outputs_uri:
            storage.write_json(self.outputs_uri, values)


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
