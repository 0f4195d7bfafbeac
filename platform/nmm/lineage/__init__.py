"""The only module that talks to MLflow.

One parent run per pipeline run, one child run per stage, in the experiment
`<namespace>/<pipeline>`, found again by the run's identity (`nmm.run_key`) and stage tags so
that a retried step reuses its run instead of adding one. "Does not exist" is an answer; any
other failure is a `TrackingError` (retryable exit 130), never a guess.
With `MLFLOW_TRACKING_URI` unset, tracking goes to `sqlite:///.nmm/mlflow.db` with artifacts
under `.nmm/mlartifacts`.
"""

from nmm.lineage.errors import RegistryConflict, TrackingError
from nmm.lineage.registry import (
    ForeignModel,
    ModelVersionInfo,
    alias_version,
    check_owner,
    model_version,
    promote,
    register_version,
    tag_version,
)
from nmm.lineage.runs import (
    StageRun,
    find_stage_run,
    finish_pipeline_run,
    log_pipeline_metrics,
    pipeline_tags,
    stage_run,
    tracking_uri,
    ui_command,
)

__all__ = [
    "ForeignModel",
    "ModelVersionInfo",
    "RegistryConflict",
    "StageRun",
    "TrackingError",
    "alias_version",
    "check_owner",
    "model_version",
    "find_stage_run",
    "finish_pipeline_run",
    "log_pipeline_metrics",
    "pipeline_tags",
    "promote",
    "register_version",
    "stage_run",
    "tag_version",
    "tracking_uri",
    "ui_command",
]
