"""The operator's pure parts: custom resource → Workflow, Workflow → status (plain dicts)."""

import pytest
import yaml

from nmm.compile import CompileSettings
from nmm.spec import SpecError
from nmm_operator import builders, status
from nmm_operator.settings import from_dict
from tests.conftest import WORKFLOWS
from tests.schemas import ARGO_WORKFLOW, crd_errors

NOW = "2026-11-22T12:00:00Z"


def cr(generation: int = 1, **spec_changes) -> dict:
    doc = yaml.safe_load((WORKFLOWS / "quickstart.yaml").read_text())
    doc["metadata"] = {"name": "qs", "namespace": "team-a", "uid": "u-123", "generation": generation}
    doc["spec"].update(spec_changes)
    return doc


def test_workflow_is_named_per_generation_owned_and_schema_valid():
    wf = builders.build_workflow(cr(3), CompileSettings())
    meta = wf["metadata"]
    assert meta["name"] == "qs-g3" and "generateName" not in meta and meta["namespace"] == "team-a"
    assert meta["labels"]["nmm.dev/owner"] == "qs" and meta["labels"]["nmm.dev/generation"] == "3"
    (owner,) = meta["ownerReferences"]
    assert owner == {
        "apiVersion": "nmm.dev/v1alpha1",
        "kind": "NMMPipeline",
        "name": "qs",
        "uid": "u-123",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert crd_errors(ARGO_WORKFLOW, "v1alpha1", wf) == []


def test_building_twice_is_identical_r2():
    assert builders.build_workflow(cr(), CompileSettings()) == builders.build_workflow(cr(), CompileSettings())


def test_invalid_custom_resource_raises_spec_error_with_paths():
    bad = cr()
    bad["spec"]["training"]["phases"][0]["steps"] = -1
    with pytest.raises(SpecError) as exc:
        builders.build_workflow(bad, CompileSettings())
    assert any(p.startswith("spec.training.phases[0].steps") for p in exc.value.problems)


def workflow(phase: str, nodes: dict) -> dict:
    return {"metadata": {"name": "qs-g1"}, "status": {"phase": phase, "startedAt": "t0", "nodes": nodes}}


def node(name: str, phase: str, kind: str = "Pod", outputs: dict | None = None) -> dict:
    n = {"displayName": name, "type": kind, "phase": phase}
    if outputs:
        n["outputs"] = {"parameters": [{"name": k, "value": v} for k, v in outputs.items()]}
    return n


def test_running_workflow_mirrors_phase_stage_and_stage_phases():
    wf = workflow(
        "Running",
        {"a": node("curate", "Succeeded"), "b": node("train", "Running", "Retry"), "c": node("train", "Running")},
    )
    s = status.from_workflow(wf, NOW)
    assert s["phase"] == "Running" and s["stage"] == "train" and s["workflow"] == "qs-g1"
    assert s["stages"] == {"curate": "Succeeded", "train": "Running", "evaluate": "Pending", "rollout": "Pending"}
    ready, failed = s["conditions"]
    assert ready["type"] == "Ready" and ready["status"] == "False" and failed["status"] == "False"


def test_an_ablation_combines_its_variant_steps_into_one_stage_phase():
    nodes = {
        "a": {"displayName": "curate", "type": "Pod", "phase": "Succeeded"},
        "b": {"displayName": "train-early", "type": "Pod", "phase": "Succeeded"},
        "c": {"displayName": "train-mid", "type": "Pod", "phase": "Running"},
        "d": {"displayName": "evaluate-early", "type": "Pod", "phase": "Succeeded"},
    }
    patch = status.from_workflow(workflow("Running", nodes), NOW)
    assert patch["stages"] == {"curate": "Succeeded", "train": "Running", "evaluate": "Succeeded", "rollout": "Pending"}
    assert patch["stage"] == "train"
    nodes["c"]["phase"] = "Failed"
    assert status.from_workflow(workflow("Failed", nodes), NOW)["stages"]["train"] == "Failed"


def test_a_curate_rayjob_and_its_outputs_step_are_one_curate_stage():
    nodes = {
        "a": {"displayName": "curate", "type": "Pod", "phase": "Succeeded"},  # the RayJob's resource step
        "b": {"displayName": "curate-outputs", "type": "Pod", "phase": "Running"},
    }
    patch = status.from_workflow(workflow("Running", nodes), NOW)
    assert patch["stages"]["curate"] == "Running" and patch["stage"] == "curate"


def test_succeeded_workflow_reports_champion_and_mlflow_run():
    wf = workflow(
        "Succeeded",
        {
            "a": node("curate", "Succeeded"),
            "b": node("train", "Succeeded"),
            "c": node("evaluate", "Succeeded"),
            "d": node("rollout", "Succeeded", outputs={"decision": "promoted", "version": "4"}),
            "e": node("finalize", "Succeeded", outputs={"mlflow_run_id": "abc"}),
        },
    )
    wf["status"]["finishedAt"] = "t1"
    s = status.from_workflow(wf, NOW)
    assert s["phase"] == "Succeeded" and s["stage"] == "" and s["champion"] == "4" and s["mlflowRunId"] == "abc"
    assert s["conditions"][0]["status"] == "True" and s["finishedAt"] == "t1"


def test_kept_model_is_not_reported_as_champion():
    wf = workflow("Succeeded", {"d": node("rollout", "Succeeded", outputs={"decision": "kept", "version": "5"})})
    assert "champion" not in status.from_workflow(wf, NOW)


def test_failed_workflow_sets_failed_condition():
    wf = workflow("Failed", {"a": node("curate", "Failed")})
    wf["status"]["message"] = "child 'curate' failed"
    s = status.from_workflow(wf, NOW)
    assert s["conditions"][1] == {
        "type": "Failed",
        "status": "True",
        "reason": "WorkflowFailed",
        "message": "child 'curate' failed",
        "lastTransitionTime": NOW,
    }


def test_invalid_spec_and_missing_child_patches():
    s = status.invalid_spec(["spec.x: bad"], NOW)
    assert s["phase"] == "Failed" and s["conditions"][1]["reason"] == "InvalidSpec"
    gone = status.child_missing("qs-g1", recreated=False, now=NOW)
    assert gone["phase"] == "Error" and gone["conditions"][1]["reason"] == "WorkflowMissing"
    assert "recreated" in status.child_missing("qs-g1", recreated=True, now=NOW)["message"]


def test_events_only_on_transitions():
    assert status.transition({"phase": "Running", "stage": "train"}, {"phase": "Running", "stage": "train"}) is None
    assert (
        status.transition({"phase": "Running", "stage": "curate"}, {"phase": "Running", "stage": "train"})[0]
        == "StageStarted"
    )
    assert status.transition(None, {"phase": "Running", "stage": ""})[0] == "WorkflowRunning"


def test_settings_from_the_chart_configmap():
    s = from_dict(
        {
            "resolved": {"image": "reg/nmm:1", "s3SecretName": "sec"},
            "gpuPools": {"h100": {"product": "H100", "memoryGiB": 80, "gpusPerNode": 8}},
            "operator": {"onChildDeleted": "recreate"},
            "kueue": {"enabled": True, "localQueue": "nmm"},
        }
    )
    assert s.compile.image == "reg/nmm:1" and s.compile.gpu_pools[0].name == "h100"
    assert s.operator.on_child_deleted == "recreate" and s.compile.default_queue == "nmm"
    for bad, key in (
        ({"operator": {"onChildDeleted": "ignore"}}, "operator.onChildDeleted"),
        ({"operator": {"recheckSeconds": 0}}, "operator.recheckSeconds"),
        ({"recheckSeconds": 1}, "recheckSeconds"),  # a setting under another key than the values'
        ({"gpuPools": {"h100": {"product": "H100"}}}, "gpuPools.h100.memoryGiB"),
    ):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            from_dict(bad)


def test_only_our_older_running_generations_are_superseded():
    from nmm_operator import builders

    def wf(name, gen, uid="mine", phase="Running", shutdown=None):
        return {
            "metadata": {
                "name": name,
                "labels": {builders.LABEL_GENERATION: str(gen)},
                "ownerReferences": [{"uid": uid, "controller": True}],
            },
            "spec": {"shutdown": shutdown} if shutdown else {},
            "status": {"phase": phase},
        }

    pipeline = {"metadata": {"uid": "mine", "generation": 4}}
    found = [
        wf("qs-g1", 1, phase="Succeeded"),
        wf("qs-g2", 2, shutdown="Stop"),
        wf("qs-g3", 3),
        wf("qs-g4", 4),
        wf("x-g1", 1, uid="someone-else"),
    ]
    assert [w["metadata"]["name"] for w in builders.superseded(found, pipeline)] == ["qs-g3"]
    assert builders.owned_by(found[0], "mine") and not builders.owned_by(found[4], "mine")
    assert not builders.owned_by({"metadata": {"ownerReferences": [{"uid": "mine"}]}}, "mine")  # not the controller
