"""Pure: observed state (the child Workflow, or its absence) → the pipeline's status patch."""

from __future__ import annotations

from nmm.spec import split_step
from nmm.spec.names import EXIT_STAGE, STAGES

DONE = ("Succeeded", "Failed", "Error")


def _condition(kind: str, status: bool, reason: str, message: str, now: str) -> dict:
    return {
        "type": kind,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": now,
    }


def _outputs(node: dict) -> dict[str, str]:
    return {p["name"]: p.get("value", "") for p in node.get("outputs", {}).get("parameters", [])}


# How the steps of one stage combine when an ablation has one per variant (train-early, …):
# the first phase in this order that any of them has.
_COMBINE = ("Failed", "Error", "Running", "Pending", "Omitted", "Skipped", "Succeeded")


def stage_nodes(wf: dict) -> dict[str, dict]:
    """The newest node per step (retries make several; the Retry node sums them up)."""
    out: dict[str, dict] = {}
    for node in (wf.get("status", {}).get("nodes") or {}).values():
        name = node.get("displayName", "")
        if split_step(name)[0] in STAGES + (EXIT_STAGE,) and node.get("type") in ("Retry", "Pod", "Skipped", "Omitted"):
            if name not in out or node.get("type") == "Retry":
                out[name] = node
    return out


def _stage_phase(nodes: dict[str, dict], stage: str) -> str:
    """A stage's phase: its step's, or the combination of its variants' steps (`train-mid`)."""
    phases = [n.get("phase", "Pending") for name, n in nodes.items() if split_step(name)[0] == stage]
    if not phases:
        return "Pending"
    return next(p for p in _COMBINE + tuple(phases) if p in phases)


def from_workflow(wf: dict, now: str) -> dict:
    """Status patch mirroring a Workflow: phase, running stage, per-stage phases, times,
    MLflow run, champion version, and Ready/Failed conditions."""
    st = wf.get("status") or {}
    phase = st.get("phase") or "Pending"
    nodes = stage_nodes(wf)
    stages = {s: _stage_phase(nodes, s) for s in STAGES}
    running = next((s for s in STAGES if stages[s] == "Running"), "")
    if not running and phase not in DONE:
        running = next((s for s in STAGES if stages[s] == "Pending"), "")
    rollout = _outputs(nodes.get("rollout", {}))
    finalize = _outputs(nodes.get(EXIT_STAGE, {}))
    patch = {
        "phase": phase,
        "stage": running if phase not in DONE else "",
        "stages": stages,
        "workflow": wf["metadata"]["name"],
        "startedAt": st.get("startedAt"),
        "finishedAt": st.get("finishedAt"),
        "mlflowRunId": finalize.get("mlflow_run_id"),
        "champion": rollout.get("version", "") if rollout.get("decision") == "promoted" else None,
        "message": st.get("message"),
    }
    failed = phase in ("Failed", "Error")
    patch["conditions"] = [
        _condition("Ready", phase == "Succeeded", phase, st.get("message") or f"workflow {phase.lower()}", now),
        _condition("Failed", failed, "WorkflowFailed" if failed else phase, st.get("message") or "", now),
    ]
    return {k: v for k, v in patch.items() if v is not None}


def training(patch: dict) -> bool:
    """Whether the mirrored Workflow is running its train stage (where a job can be queued)."""
    return patch.get("phase") == "Running" and patch.get("stages", {}).get("train") == "Running"


def queued(patch: dict, jobs: list[str], now: str) -> dict:
    """A running pipeline whose training jobs Kueue has not admitted yet: phase Queued."""
    if not jobs:
        return patch
    message = f"training job(s) {', '.join(jobs)} wait for Kueue to admit them"
    return patch | {
        "phase": "Queued",
        "stage": "train",
        "message": message,
        "conditions": [
            _condition("Ready", False, "Queued", message, now),
            _condition("Failed", False, "Queued", "", now),
        ],
    }


def _failed(phase: str, reason: str, message: str, now: str) -> dict:
    return {
        "phase": phase,
        "stage": "",
        "message": message,
        "conditions": [
            _condition("Ready", False, reason, message, now),
            _condition("Failed", True, reason, message, now),
        ],
    }


def invalid_spec(problems: list[str], now: str) -> dict:
    return _failed("Failed", "InvalidSpec", "; ".join(problems), now)


def not_owned(workflow: str, now: str) -> dict:
    """The child's name is taken by a Workflow this pipeline does not own (retried: it may be the
    previous incarnation's, awaiting garbage collection)."""
    return _failed(
        "Pending",
        "WorkflowNotOwned",
        f"workflow {workflow} exists and is not owned by this pipeline; "
        "waiting for it to go (delete it if it is not the previous pipeline's)",
        now,
    )


def child_missing(workflow: str, recreated: bool, now: str) -> dict:
    if recreated:
        return {"message": f"workflow {workflow} was deleted; recreated it", "workflow": workflow}
    return _failed("Error", "WorkflowMissing", f"workflow {workflow} was deleted outside the operator", now)


def transition(old: dict | None, new: dict) -> tuple[str, str] | None:
    """(reason, message) for a Kubernetes event when phase or stage changed, else None."""
    old = old or {}
    if old.get("phase") != new.get("phase"):
        return (
            f"Workflow{new.get('phase')}",
            f"pipeline {new.get('phase', '').lower()} (workflow {new.get('workflow', '')})",
        )
    if new.get("stage") and old.get("stage") != new.get("stage"):
        return "StageStarted", f"stage {new['stage']} running"
    return None


# Node types that stand for a group of steps (kept, reset to Running, when a step under them is retried).
_BOUNDARIES = ("DAG", "Steps", "StepGroup", "TaskGroup", "Retry")


def retry_patch(wf: dict) -> dict:
    """The merge patch that does to a failed Workflow what `argo retry` does (the argo-server's
    FormulateRetryWorkflow): nodes that succeeded or were skipped stay (their steps are not run
    again); failed and errored steps, the exit handler's nodes and everything omitted are dropped,
    so the controller schedules them anew; the groups above a dropped step are Running again, and
    so is the Workflow."""
    nodes = (wf.get("status") or {}).get("nodes") or {}
    parents = {c: i for i, n in nodes.items() for c in n.get("children", [])}
    exit_handler = wf.get("spec", {}).get("onExit")
    on_exit = {i for i, n in nodes.items() if exit_handler and n.get("templateName") == exit_handler}
    for i in nodes:  # everything under the exit handler goes with it
        if any(p in on_exit for p in _ancestors(parents, i)):
            on_exit.add(i)
    dropped = {
        i
        for i, n in nodes.items()
        if i in on_exit or (n.get("type") not in _BOUNDARIES and n.get("phase") not in ("Succeeded", "Skipped"))
    }
    reset = {p for i in dropped if i not in on_exit for p in _ancestors(parents, i)}
    patch_nodes: dict = {i: None for i in dropped}
    for i in reset - dropped:
        patch_nodes[i] = {"phase": "Running", "finishedAt": None, "message": None}
    return {
        "metadata": {"labels": {"workflows.argoproj.io/completed": "false"}},
        "status": {"phase": "Running", "finishedAt": None, "message": None, "nodes": patch_nodes},
    }


def _ancestors(parents: dict[str, str], node_id: str) -> list[str]:
    """The node's parent, its parent's, … (`parents`: child id → parent id)."""
    out, cur = [], parents.get(node_id)
    while cur is not None and cur not in out:
        out.append(cur)
        cur = parents.get(cur)
    return out
