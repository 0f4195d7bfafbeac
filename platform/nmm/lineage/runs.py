"""Pipeline and stage runs in MLflow: find-or-create by tags, log, finish.

Runs are found by their run's whole identity (`nmm.run_key`: namespace/pipeline/owner-uid/run-id)
and stage, in the experiment `<namespace>/<pipeline>`: a pipeline recreated under the same name,
or the same name in another namespace, never finds another's runs. Every MLflow failure leaves
this module as a `TrackingError` (nmm.lineage.errors).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nmm.home import home_dir
from nmm.identity import RunIdentity
from nmm.lineage.errors import TrackingError, already_exists, tracked

log = logging.getLogger(__name__)

TAG_PIPELINE = "nmm.pipeline"
TAG_RUN_ID = "nmm.run_id"
TAG_RUN_KEY = "nmm.run_key"
TAG_NAMESPACE = "nmm.namespace"
TAG_OWNER_UID = "nmm.owner_uid"
TAG_STAGE = "nmm.stage"
TAG_CODE = "nmm.code_version"
TAG_CACHE = "nmm.cache_key"
_FORBIDDEN_IN_PATHS = ("..", "#", ";")


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = home_dir()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def _client():
    import mlflow
    from mlflow.tracking import MlflowClient

    for noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking", "mlflow.models"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        location = (home_dir() / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        if not already_exists(exc):
            raise
        return client.get_experiment_by_name(name).experiment_id


def _identity_tags(run: RunIdentity) -> dict[str, str]:
    return {
        TAG_PIPELINE: run.pipeline,
        TAG_RUN_ID: run.run_id,
        TAG_RUN_KEY: run.key,
        TAG_NAMESPACE: run.namespace,
        TAG_OWNER_UID: run.owner_uid,
    }


def _find(client, exp_id: str, tags: dict[str, str]):
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in sorted(tags.items()))
    runs = client.search_runs([exp_id], filter_string=flt, max_results=5, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def _open_run(client, exp_id: str, tags: dict[str, str], run_name: str):
    """The run of one stage (or phase) of one pipeline run: found again by its run id and stage
    tags when the step is retried (R13: no duplicate runs) and marked RUNNING, else created."""
    found = _find(client, exp_id, {TAG_RUN_KEY: tags[TAG_RUN_KEY], TAG_STAGE: tags[TAG_STAGE]})
    if found is None:
        return client.create_run(exp_id, run_name=run_name, tags=tags)
    client.update_run(found.info.run_id, status="RUNNING")
    for k, v in tags.items():
        client.set_tag(found.info.run_id, k, v)
    return found


def _safe_artifact_path(path: str | None) -> str | None:
    """S8: refuse artifact paths that could escape the run's folder."""
    if path is None:
        return None
    if any(bad in path for bad in _FORBIDDEN_IN_PATHS) or path.startswith(("/", "file:")):
        raise ValueError(f"refusing artifact path {path!r}: no '..', '#', ';' or absolute paths")
    return path


@dataclass
class StageRun:
    """The MLflow run of one stage of one pipeline run (rank 0 only)."""

    client: object
    run_id: str
    parent_run_id: str
    experiment_id: str
    stage: str
    run: RunIdentity

    @tracked("open a nested run")
    def child(self, name: str, params: dict | None = None) -> StageRun:
        """A run nested under this one (one per training phase, say), RUNNING until `finish`.
        A retried step finds the same nested run again."""
        stage = f"{self.stage}/{name}"
        tags = _identity_tags(self.run) | {TAG_STAGE: stage, "mlflow.parentRunId": self.run_id}
        found = _open_run(self.client, self.experiment_id, tags, f"{self.run.run_id}-{self.stage}-{name}")
        run = StageRun(self.client, found.info.run_id, self.parent_run_id, self.experiment_id, stage, self.run)
        if params:
            run.log_params(params)
        return run

    @tracked("finish the run")
    def finish(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")

    @tracked("log params")
    def log_params(self, params: dict) -> None:
        existing = self.client.get_run(self.run_id).data.params
        fresh = {k: str(v)[:6000] for k, v in params.items() if k not in existing}
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in fresh.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    @tracked("log metrics")
    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    @tracked("set tags")
    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    @tracked("tag the pipeline run")
    def set_parent_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.parent_run_id, k, str(v))

    @tracked("log an artifact")
    def log_bytes(self, data: bytes, name: str, artifact_path: str | None = None) -> None:
        _safe_artifact_path(name)
        _safe_artifact_path(artifact_path)
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.write_bytes(data)
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    @tracked("log the dataset")
    def log_dataset(self, name: str, digest: str, source_uri: str, context: str = "training") -> None:
        """Log a curated dataset as an input of this run (and of the parent run)."""
        import mlflow
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import InputTag

        dataset = MetaDataset(source=_dataset_source(source_uri), name=name, digest=digest[-32:])
        tags = [InputTag(key="mlflow.data.context", value=context)]
        for run_id in (self.run_id, self.parent_run_id):
            self.client.log_inputs(run_id, datasets=[mlflow.entities.DatasetInput(dataset._to_mlflow_entity(), tags)])

    @tracked("log the model")
    def log_pyfunc_model(
        self, model_dir: str, loader_module: str, pip_requirements: list[str], signature: dict | None = None
    ) -> str:
        """Log a folder as an MLflow pyfunc model served by `loader_module`; returns its URI.
        `signature`: {"inputs": {column: type}, "params": {name: (type, default)}}, every column
        optional (made into MLflow's ModelSignature here: only this module talks to MLflow)."""
        import mlflow

        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                loader_module=loader_module,
                data_path=model_dir,
                pip_requirements=pip_requirements,
                signature=_signature(signature) if signature else None,
            )
        # start_run's exit marked the run FINISHED; it is still being worked on.
        self.client.update_run(self.run_id, status="RUNNING")
        return info.model_uri


def _signature(sig: dict):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(t, name, required=False) for name, t in sig["inputs"].items()]),
        params=ParamSchema([ParamSpec(name, t, default) for name, (t, default) in sig["params"].items()]),
    )


def _dataset_source(uri: str):
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    try:
        with warnings.catch_warnings():
            # file:// matches two registered local sources that are the same class; either is right.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            return resolve_dataset_source(uri)
    except Exception:  # no registered source understands this scheme
        return HTTPDatasetSource(url=uri)


def _parent(client, exp_id: str, run: RunIdentity, code_version: str):
    parent = _find(client, exp_id, {TAG_RUN_KEY: run.key, TAG_STAGE: "pipeline"})
    if parent is None:
        tags = _identity_tags(run) | {TAG_STAGE: "pipeline", TAG_CODE: code_version}
        parent = client.create_run(exp_id, run_name=run.run_id, tags=tags)
    elif parent.info.status != "RUNNING":  # a resumed run: the same parent, reopened (finalize closes it)
        client.update_run(parent.info.run_id, status="RUNNING")
    return parent


@tracked("open the stage's run")
def _open_stage(run: RunIdentity, stage: str, cache_key: str, code_version: str) -> StageRun:
    client = _client()
    exp_id = _experiment_id(client, run.experiment)
    parent = _parent(client, exp_id, run, code_version)
    tags = _identity_tags(run) | {
        TAG_STAGE: stage,
        TAG_CODE: code_version,
        TAG_CACHE: cache_key,
        "mlflow.parentRunId": parent.info.run_id,
    }
    child = _open_run(client, exp_id, tags, f"{run.run_id}-{stage}")
    return StageRun(client, child.info.run_id, parent.info.run_id, exp_id, stage, run)


@contextlib.contextmanager
def stage_run(run: RunIdentity, stage: str, *, cache_key: str = "", code_version: str = "") -> Iterator[StageRun]:
    """Find or create the pipeline's parent run and this stage's child run; finish it on exit.

    A retried step finds the same child run again (R13: no duplicate runs).
    """
    stage_run_ = _open_stage(run, stage, cache_key, code_version)
    try:
        yield stage_run_
    except BaseException:
        try:
            stage_run_.finish(ok=False)
        except TrackingError as exc:  # the stage's own error is the one to report
            log.warning("could not mark run %s failed: %s", stage_run_.run_id, exc)
        raise
    stage_run_.finish(ok=True)


@tracked("find the stage's run")
def find_stage_run(run: RunIdentity, stage: str):
    """The MLflow run entity of a stage, or None."""
    client = _client()
    exp = client.get_experiment_by_name(run.experiment)
    if exp is None:
        return None
    return _find(client, exp.experiment_id, {TAG_RUN_KEY: run.key, TAG_STAGE: stage})


def _pipeline_run(run: RunIdentity, code_version: str):
    """(client, the pipeline's parent run)."""
    client = _client()
    return client, _parent(client, _experiment_id(client, run.experiment), run, code_version)


@tracked("read the pipeline's run")
def pipeline_tags(run: RunIdentity, code_version: str = "") -> dict[str, str]:
    """The tags of the pipeline's parent run (each evaluation files its metrics there)."""
    return dict(_pipeline_run(run, code_version)[1].data.tags)


@tracked("log the pipeline's metrics")
def log_pipeline_metrics(run: RunIdentity, metrics: dict[str, float], code_version: str = "") -> None:
    """Metrics on the pipeline's parent run (an ablation's per-variant aggregates)."""
    import time

    from mlflow.entities import Metric

    client, parent = _pipeline_run(run, code_version)
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(parent.info.run_id, metrics=items[i : i + 1000])


@tracked("finish the pipeline's run")
def finish_pipeline_run(run: RunIdentity, status: str, code_version: str = "") -> str:
    """Close the parent run with the workflow's final status (Succeeded/Failed/Error)."""
    client, parent = _pipeline_run(run, code_version)
    mlflow_status = "FINISHED" if status == "Succeeded" else "FAILED"
    client.set_tag(parent.info.run_id, "nmm.workflow_status", status)
    client.set_terminated(parent.info.run_id, status=mlflow_status)
    return parent.info.run_id


def ui_command(host: str, port: int) -> list[str]:
    """The `mlflow ui` command line for the configured (or default) tracking store."""
    import sys

    argv = [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port)]
    uri = tracking_uri()
    if uri.startswith("sqlite:"):
        argv += ["--backend-store-uri", uri, "--default-artifact-root", (home_dir() / "mlartifacts").as_uri()]
    else:
        argv += ["--backend-store-uri", uri]
    return argv
