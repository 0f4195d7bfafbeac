"""Finalize (the Workflow's onExit handler): close the pipeline's parent MLflow run with the
workflow's final status.

Usage:
    nmm stage finalize --spec '<pipeline JSON>' --run-id RUN --store URI --status Succeeded --outputs DIR
"""

from __future__ import annotations

from nmm import lineage
from nmm.stages.context import StageContext, setup_logging
from nmm.version import code_version


def run(ctx: StageContext, status: str) -> int:
    log = setup_logging()
    parent = lineage.finish_pipeline_run(ctx.run, status, code_version())
    log.info("pipeline run %s finished: %s (MLflow run %s)", ctx.run_id, status, parent)
    ctx.write_outputs({"mlflow_run_id": parent})
    return 0
