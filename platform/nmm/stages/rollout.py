"""Roll out: register the model version (alias `candidate`) and move `champion` to it when the
gates passed and it is at least as good as the current champion on every gated metric.

Usage:
    nmm stage rollout --spec '<pipeline JSON>' --run-id RUN --store URI \
        --model-uri URI --metrics '<JSON>' --gate pass --outputs DIR

With `spec.rollout.serving`, a promoted version is first rolled out as a canary against the
champion (nmm.stages.rollout_serving): locally here, on a cluster by the operator through the NMMService.

Output parameters: `decision` (promoted | kept | rolled_back | rolling_out), `version`.
"""

from __future__ import annotations

import json
import math

from nmm import lineage, storage
from nmm.lineage.registry import TAG_MODEL_FOLDER
from nmm.spec import Gate
from nmm.stages import rollout_serving
from nmm.stages.context import ModelMissing, StageContext, cache_key, setup_logging
from nmm.version import code_version

METRIC_TAG = "nmm.metric."


def worse(gate: Gate, candidate: float, champion: float) -> bool:
    """Whether the candidate is worse than the champion on the gate's metric, in the gate's
    direction: `>=`/`>` want more, `<=`/`<` want less, `==` wants the threshold."""
    if gate.op in (">=", ">"):
        return candidate < champion
    if gate.op in ("<=", "<"):
        return candidate > champion
    return abs(candidate - gate.threshold) > abs(champion - gate.threshold)


def decide(
    gate_ok: bool, candidate: dict[str, float], champion: dict[str, float] | None, gates: list[Gate]
) -> tuple[bool, str]:
    """(promote?, reason). Fails closed: no gates, or a gated metric missing (or not a finite
    number) on either side, is no comparison and so no promotion. Pure: tested without MLflow."""
    if not gate_ok:
        return False, "gates failed"
    if not gates:
        return False, "the spec has no gates: nothing to judge the candidate on, not promoting"
    missing = [g.metric for g in gates if not math.isfinite(candidate.get(g.metric, math.nan))]
    if missing:
        return False, f"candidate lacks gated metrics {missing}, not promoting"
    if champion is None:
        return True, "no champion yet"
    absent = [g.metric for g in gates if not math.isfinite(champion.get(g.metric, math.nan))]
    if absent:
        return False, f"champion has no {absent} to compare with, not promoting (promote by hand if intended)"
    lost = [g for g in gates if worse(g, candidate[g.metric], champion[g.metric])]
    if lost:
        detail = ", ".join(f"{g.metric} {candidate[g.metric]:.4f} vs {champion[g.metric]:.4f} ({g.op})" for g in lost)
        return False, f"worse than champion on {detail}"
    return True, "at least as good as champion on " + ", ".join(g.metric for g in gates)


def run(ctx: StageContext, model_uri: str, metrics_json: str, gate: str) -> int:
    log = setup_logging()
    name = ctx.spec.spec.rollout.registered_model_name
    manifest = storage.read_manifest(model_uri, verify=True)
    if manifest is None:
        raise ModelMissing(f"no model published at {model_uri}")
    metrics = {k: float(v) for k, v in json.loads(metrics_json).items()}
    serving = ctx.spec.spec.rollout.serving
    key = cache_key("rollout", name, manifest["digest"], metrics)
    with lineage.stage_run(ctx.run, "rollout", cache_key=key, code_version=code_version()) as run_:
        mv = lineage.register_version(
            name,
            manifest["mlflow_model_uri"],
            ctx.run,
            manifest["digest"],
            {METRIC_TAG + k: f"{v:.6f}" for k, v in metrics.items()}
            | {"nmm.pipeline": ctx.pipeline, TAG_MODEL_FOLDER: model_uri},
        )
        lineage.promote(name, mv.version, "candidate")
        champ = lineage.alias_version(name, "champion")  # None only when MLflow says there is none
        champion_metrics = None  # none yet, or this very version already holds it (a retried rollout)
        if champ is not None and champ.version != mv.version:
            champion_metrics = {
                k[len(METRIC_TAG) :]: float(v) for k, v in champ.tags.items() if k.startswith(METRIC_TAG)
            }
        promote, reason = decide(gate == "pass", metrics, champion_metrics, ctx.spec.spec.evaluation.parsed_gates)
        if champ is not None and champ.version == mv.version:
            promote, reason = True, "already champion (a retried rollout)"
        decision = "promoted" if promote else "kept"
        if promote and serving is not None:
            decision, reason = _serve(ctx, run_, name, mv.version, champ, manifest, reason, log)
        if decision == "promoted":
            lineage.promote(name, mv.version, "champion")
        tags = {"nmm.rollout.decision": decision, "nmm.rollout.reason": reason, "nmm.rollout.version": mv.version}
        run_.set_tags(tags)
        run_.set_parent_tags(tags)
        lineage.promote(name, mv.version, "candidate", {"nmm.rollout.decision": decision, "nmm.rollout.reason": reason})
        log.info("model %s version %s: %s (%s)", name, mv.version, decision, reason)
        ctx.write_outputs({"decision": decision, "version": mv.version})
    return 0


def _serve(
    ctx: StageContext, run_, name: str, version: str, champ, manifest: dict, reason: str, log
) -> tuple[str, str]:
    """(decision, reason) once the version passed the offline comparison: locally a canary
    against the champion, run here (promoted | rolled_back); on a cluster the NMMService is
    pointed at the version and the operator rolls it out (rolling_out)."""
    serving = ctx.spec.spec.rollout.serving
    ds = rollout_serving.held_out(manifest)
    cases_uri, cases = rollout_serving.write_probe(ctx, serving, ds)
    if not rollout_serving.local_engine():
        how = rollout_serving.apply_service(rollout_serving.service_body(ctx, serving, name, version, cases_uri))
        return "rolling_out", (
            f"{reason}; NMMService {ctx.pipeline} {how}: the operator rolls version {version} out "
            "as a canary and moves champion when every step passes"
        )
    if champ is None or champ.version == version:
        return "promoted", f"{reason}; no other version served to compare against: no canary"
    chat, drawn = rollout_serving.traffic(ctx, cases, ds)
    outcome = rollout_serving.run_local(
        ctx, run_, serving, f"models:/{name}/{champ.version}", f"models:/{name}/{version}", cases, chat, drawn, log
    )
    run_.set_tags(
        {
            "nmm.canary.result": "promoted" if outcome.promoted else "rolled_back",
            "nmm.canary.reason": outcome.reason,
            "nmm.canary.stable": champ.version,
        }
    )
    if outcome.promoted:
        return "promoted", f"{reason}; canary against version {champ.version}: {outcome.reason}"
    return "rolled_back", f"canary against version {champ.version} rolled back: {outcome.reason}"
