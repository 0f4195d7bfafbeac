"""Model registry: versions, aliases (`candidate`, `champion`) and promotion decisions."""

from __future__ import annotations

from dataclasses import dataclass

from nmm.lineage.runs import TAG_RUN_ID, _client


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]


def _info(v) -> ModelVersionInfo:
    return ModelVersionInfo(v.name, str(v.version), v.run_id, dict(v.tags or {}))


def register_version(name: str, model_uri: str, pipeline_run_id: str, tags: dict[str, str]) -> ModelVersionInfo:
    """Register `model_uri` under `name`, once per pipeline run (R13: a retry reuses it)."""
    client = _client()
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name)
    for v in client.search_model_versions(f"name='{name}'"):
        if (v.tags or {}).get(TAG_RUN_ID) == pipeline_run_id:
            return _info(v)
    import mlflow

    mv = mlflow.register_model(model_uri, name, tags={TAG_RUN_ID: pipeline_run_id, **tags})
    return _info(client.get_model_version(name, mv.version))


def alias_version(name: str, alias: str) -> ModelVersionInfo | None:
    client = _client()
    try:
        return _info(client.get_model_version_by_alias(name, alias))
    except Exception:
        return None


def promote(name: str, version: str, alias: str, tags: dict[str, str] | None = None) -> None:
    client = _client()
    client.set_registered_model_alias(name, alias, version)
    for k, v in (tags or {}).items():
        client.set_model_version_tag(name, version, k, str(v))
