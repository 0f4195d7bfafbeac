"""Finalize (the Workflow's onExit handler): close the pipeline's parent MLflow run with the
workflow's final status.

Usage:
    nmm stage finalize --spec '<pipeline JSON>' --run-id RUN --store URI --status Succeeded --outputs DIR
"""

from __future__ import annotations

from nmm import lineage
from nmm.evaluate import seeds
from nmm.stages.context import StageContext, setup_logging
from nmm.version import code_version

METRIC_TAG = "nmm.metric."  # evaluate files each variant's metrics on the parent run: nmm.metric.<variant>.<metric>


def run(ctx: StageContext, status: str) -> int:
    log = setup_logging()
    groups = ctx.spec.seed_groups
    if groups:
        _seed_spread(ctx, groups, log)
    parent = lineage.finish_pipeline_run(ctx.run, status, code_version())
    log.info("pipeline run %s finished: %s (MLflow run %s)", ctx.run_id, status, parent)
    ctx.write_outputs({"mlflow_run_id": parent})
    return 0


def _seed_spread(ctx: StageContext, groups: dict[str, list[str]], log) -> None:
    """The variants run on several seeds: each metric's mean and standard deviation per variant
    on the pipeline's run (`<variant>/<metric>.mean`, `.std`); the log names the differences
    larger than the seed spread."""
    per_run: dict[str, dict[str, float]] = {}
    for key, value in lineage.pipeline_tags(ctx.run, code_version()).items():
        if key.startswith(METRIC_TAG):
            run_name, _, metric = key.removeprefix(METRIC_TAG).partition(".")
            per_run.setdefault(run_name, {})[metric] = float(value)
    agg = seeds.aggregate(per_run, groups)
    lineage.log_pipeline_metrics(ctx.run, seeds.as_metrics(agg), code_version())
    for variant, ms in agg.items():
        for k, (mean, std, n) in ms.items():
            log.info("%s %s: %.4f ± %.4f over %d seeds", variant, k, mean, std, n)
    for k, a, b in seeds.apart(agg):
        log.info("%s: %s and %s differ by more than the seed spread", k, a, b)
