"""Model registry: versions, aliases (`candidate`, `champion`). Fails closed: only MLflow's
"does not exist" means "none"; every other failure is a TrackingError, so an outage can never
read as "no champion yet".

A registered model belongs to the namespace that created it (the model's `nmm.namespace` tag): a
registered model name is global in MLflow, so without it two tenants using one name would move
each other's champion. Another namespace's pipeline or NMMService using the name is refused
(`ForeignModel`); a model registered by an nmm that recorded no owner is claimed by the first
namespace that writes to it."""

from __future__ import annotations

from dataclasses import dataclass

from nmm.identity import RunIdentity
from nmm.lineage.errors import RegistryConflict, already_exists, not_found, tracked
from nmm.lineage.runs import TAG_RUN_ID, TAG_RUN_KEY, _client

TAG_MODEL_DIGEST = "nmm.model_digest"
TAG_MODEL_FOLDER = "nmm.model_store_uri"  # on a version: its published model folder (what a server reads)
TAG_NAMESPACE = "nmm.namespace"  # on the registered model: the namespace it belongs to


class ForeignModel(RegistryConflict):
    """The registered model belongs to another namespace."""


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]

    @property
    def folder(self) -> str | None:
        """The published model folder the version was registered from (None: an older nmm's)."""
        return self.tags.get(TAG_MODEL_FOLDER)

    @property
    def digest(self) -> str | None:
        """The folder's manifest digest the version was registered with."""
        return self.tags.get(TAG_MODEL_DIGEST)


def _info(v) -> ModelVersionInfo:
    return ModelVersionInfo(v.name, str(v.version), v.run_id, dict(v.tags or {}))


def _registered_model(client, name: str):
    """The registered model, or None when MLflow says it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if not_found(exc):
            return None
        raise


@tracked("register the model version")
def register_version(
    name: str, model_uri: str, run: RunIdentity, model_digest: str, tags: dict[str, str]
) -> ModelVersionInfo:
    """Register `model_uri` under `name`, once per run identity (R13: a retry reuses its version,
    but only when it holds the same model: another digest under this run is a RegistryConflict)."""
    from mlflow.exceptions import MlflowException

    client = _client()
    if _registered_model(client, name) is None:
        try:
            client.create_registered_model(name, tags={TAG_NAMESPACE: run.namespace})
        except MlflowException as exc:
            if not already_exists(exc):
                raise
    _claim(client, name, run.namespace)
    for v in client.search_model_versions(f"name='{name}'"):
        vtags = v.tags or {}
        if vtags.get(TAG_RUN_KEY) == run.key:
            if vtags.get(TAG_MODEL_DIGEST) != model_digest:
                raise RegistryConflict(
                    f"{name} version {v.version} belongs to run {run.key} "
                    f"but holds model {vtags.get(TAG_MODEL_DIGEST)!r}, "
                    f"not {model_digest!r}; refusing to reuse it"
                )
            return _info(v)
    import mlflow

    mv = mlflow.register_model(
        model_uri, name, tags={TAG_RUN_ID: run.run_id, TAG_RUN_KEY: run.key, TAG_MODEL_DIGEST: model_digest, **tags}
    )
    return _info(client.get_model_version(name, mv.version))


def _claim(client, name: str, namespace: str) -> None:
    """Refuse a model of another namespace; claim one that records no owner."""
    model = _registered_model(client, name)
    owner = (model.tags or {}).get(TAG_NAMESPACE) if model is not None else None
    if owner is None and model is not None:
        client.set_registered_model_tag(name, TAG_NAMESPACE, namespace)
        model = client.get_registered_model(name)  # read back: a claimant that wrote after us owns it
        owner = (model.tags or {}).get(TAG_NAMESPACE)
    if owner is not None and owner != namespace:
        raise ForeignModel(
            f"registered model {name!r} belongs to namespace {owner!r}, not {namespace!r}: a registered "
            "model's name is global in MLflow; give this pipeline or service its own "
            "registeredModelName (e.g. prefixed with its namespace)"
        )


@tracked("check who owns the registered model")
def check_owner(name: str, namespace: str) -> None:
    """ForeignModel when `name` belongs to another namespace (one that records no owner is
    claimed for `namespace`; one that does not exist yet is nobody's)."""
    client = _client()
    if _registered_model(client, name) is not None:
        _claim(client, name, namespace)


@tracked("read the registered model's aliases")
def alias_version(name: str, alias: str) -> ModelVersionInfo | None:
    """The version `alias` points at; None only when the model or the alias does not exist."""
    client = _client()
    model = _registered_model(client, name)
    if model is None:
        return None
    version = (model.aliases or {}).get(alias)
    if version is None:
        return None
    return _info(client.get_model_version(name, str(version)))


@tracked("read the model version")
def model_version(name: str, version: str) -> ModelVersionInfo | None:
    """One version; None only when MLflow says it (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return _info(_client().get_model_version(name, str(version)))
    except MlflowException as exc:
        if not_found(exc):
            return None
        raise


@tracked("move the alias")
def promote(name: str, version: str, alias: str, tags: dict[str, str] | None = None) -> None:
    client = _client()
    client.set_registered_model_alias(name, alias, version)
    for k, v in (tags or {}).items():
        client.set_model_version_tag(name, version, k, str(v))


@tracked("tag the model version")
def tag_version(name: str, version: str, tags: dict[str, str]) -> None:
    """Record on a version what happened to it (a canary's rollback and its reason)."""
    client = _client()
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, str(v)[:5000])
