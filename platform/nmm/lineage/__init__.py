"""The only module that talks to MLflow.

One parent run per pipeline run (tag `nmm.run_id`), one child run per stage (tag `nmm.stage`),
found again by their tags so that a retried step reuses its run instead of adding one.
With `MLFLOW_TRACKING_URI` unset, tracking goes to `sqlite:///.nmm/mlflow.db` with artifacts
under `.nmm/mlartifacts`.
"""

from nmm.lineage.registry import ModelVersionInfo, alias_version, promote, register_version
from nmm.lineage.runs import (
    StageRun,
    finish_pipeline_run,
    find_stage_run,
    stage_run,
    tracking_uri,
    ui_command,
)

__all__ = [
    "ModelVersionInfo",
    "StageRun",
    "alias_version",
    "find_stage_run",
    "finish_pipeline_run",
    "promote",
    "register_version",
    "stage_run",
    "tracking_uri",
    "ui_command",
]
