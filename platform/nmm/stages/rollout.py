"""Roll out: register the model version (alias `candidate`) and move `champion` to it when the
gates passed and it is at least as good as the current champion on every gated metric.

Usage:
    nmm stage rollout --spec '<pipeline JSON>' --run-id RUN --store URI \
        --model-uri URI --metrics '<JSON>' --gate pass --outputs DIR

Output parameters: `decision` (promoted|kept), `version`.
"""

from __future__ import annotations

import json

from nmm import lineage, storage
from nmm.stages.context import StageContext, cache_key, setup_logging
from nmm.version import code_version

METRIC_TAG = "nmm.metric."


def decide(gate_ok: bool, candidate: dict[str, float], champion: dict[str, float] | None, gated: list[str]) -> tuple[bool, str]:
    """(promote?, reason). Pure: tested without MLflow."""
    if not gate_ok:
        return False, "gates failed"
    if champion is None:
        return True, "no champion yet"
    worse = [m for m in gated if m in champion and candidate.get(m, float("-inf")) < champion[m]]
    if worse:
        detail = ", ".join(f"{m} {candidate.get(m, float('nan')):.4f} < {champion[m]:.4f}" for m in worse)
        return False, f"worse than champion on {detail}"
    return True, "at least as good as champion on " + (", ".join(gated) or "no gated metrics")


def run(ctx: StageContext, model_uri: str, metrics_json: str, gate: str) -> int:
    log = setup_logging()
    name = ctx.spec.spec.rollout.registeredModelName
    manifest = storage.read_manifest(model_uri, verify=True)
    if manifest is None:
        raise RuntimeError(f"no model published at {model_uri}")
    metrics = {k: float(v) for k, v in json.loads(metrics_json).items()}
    gated = [g.metric for g in ctx.spec.spec.evaluation.parsed_gates]
    key = cache_key("rollout", name, manifest["digest"], metrics)
    with lineage.stage_run(ctx.pipeline, ctx.run_id, "rollout", cache_key=key, code_version=code_version()) as run_:
        mv = lineage.register_version(
            name, manifest["mlflow_model_uri"], ctx.run_id,
            {METRIC_TAG + k: f"{v:.6f}" for k, v in metrics.items()} | {"nmm.pipeline": ctx.pipeline},
        )
        lineage.promote(name, mv.version, "candidate")
        champ = lineage.alias_version(name, "champion")
        champion_metrics = None  # none yet, or this very version already holds it (a retried rollout)
        if champ is not None and champ.version != mv.version:
            champion_metrics = {k[len(METRIC_TAG):]: float(v) for k, v in champ.tags.items() if k.startswith(METRIC_TAG)}
        promote, reason = decide(gate == "pass", metrics, champion_metrics, gated)
        decision = "promoted" if promote else "kept"
        if promote:
            lineage.promote(name, mv.version, "champion")
        tags = {"nmm.rollout.decision": decision, "nmm.rollout.reason": reason, "nmm.rollout.version": mv.version}
        run_.set_tags(tags)
        run_.set_parent_tags(tags)
        lineage.promote(name, mv.version, "candidate", {"nmm.rollout.decision": decision, "nmm.rollout.reason": reason})
        log.info("model %s version %s: %s (%s)", name, mv.version, decision, reason)
        ctx.write_outputs({"decision": decision, "version": mv.version})
    return 0
