"""The operator (`kopf run`, a real subprocess) against the Kubernetes API emulator on loopback."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from nmm.compile import CompileSettings
from nmm.spec.crd import crd
from nmm_operator import builders
from tests.conftest import ROOT, WORKFLOWS, wait_for
from tests.integration.kube_emulator import EmulatorThread

pytestmark = pytest.mark.integration
VERBS = ["get", "list", "watch", "create", "patch", "update", "delete"]
RESOURCES = {
    "nmm.dev/v1alpha1/nmmpipelines": dict(kind="NMMPipeline", namespaced=True, verbs=VERBS, subresources=["status"]),
    "argoproj.io/v1alpha1/workflows": dict(kind="Workflow", namespaced=True, verbs=VERBS),
    "kubeflow.org/v1/pytorchjobs": dict(kind="PyTorchJob", namespaced=True, verbs=VERBS),
}
KOPF = str(Path(sys.executable).parent / "kopf")


@pytest.fixture(scope="module")
def emu():
    with EmulatorThread(RESOURCES) as e:
        yield e


@pytest.fixture(scope="module")
def api(emu) -> client.CustomObjectsApi:
    cfg = client.Configuration()
    cfg.host = emu.url
    return client.CustomObjectsApi(client.ApiClient(cfg))


class Operator:
    def __init__(self, url: str, log: Path, settings: Path, verbose: bool = True):
        self.url, self.log, self.settings, self.proc, self.verbose = url, log, settings, None, verbose

    def start(self) -> Operator:
        env = dict(os.environ, NMM_KUBE_SERVER=self.url, NMM_OPERATOR_SETTINGS=str(self.settings))
        self.proc = subprocess.Popen(
            [KOPF, "run", "--standalone", "--all-namespaces", "-m", "nmm_operator.handlers"]
            + (["--verbose"] if self.verbose else []),
            env=env,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def operator(emu, tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "resolved": {"image": "ghcr.io/nmm-dev/nmm:0.1.0"},
                "operator": {"onChildDeleted": "report", "recheckSeconds": 1},
            }
        )
    )
    op = Operator(emu.url, tmp_path / "operator.log", settings).start()
    yield op
    op.stop()


def pipeline(name: str, **spec_changes) -> dict:
    doc = yaml.safe_load((WORKFLOWS / "quickstart.yaml").read_text())
    doc["metadata"] = {"name": name}
    doc["spec"].update(spec_changes)
    return doc


def workflows(api, ns: str) -> list[dict]:
    return api.list_namespaced_custom_object("argoproj.io", "v1alpha1", ns, "workflows")["items"]


def get(api, ns: str, name: str) -> dict:
    return api.get_namespaced_custom_object("nmm.dev", "v1alpha1", ns, "nmmpipelines", name)


def create(api, ns: str, body: dict) -> dict:
    return api.create_namespaced_custom_object("nmm.dev", "v1alpha1", ns, "nmmpipelines", body)


def columns(obj: dict) -> dict:
    """What `kubectl get nmmp` prints: the CRD's printer columns evaluated on the object."""
    out = {}
    for col in crd()["spec"]["versions"][0]["additionalPrinterColumns"]:
        value = obj
        for part in col["jsonPath"].lstrip(".").split("."):
            value = (value or {}).get(part) if isinstance(value, dict) else None
        out[col["name"]] = value
    return out


def test_create_makes_exactly_one_owned_workflow_with_the_compiled_spec(api, operator):
    created = create(api, "ns-create", pipeline("qs"))
    wfs = wait_for(lambda: workflows(api, "ns-create"), what="a workflow")
    time.sleep(1.5)  # give any duplicate a chance to appear
    (wf,) = workflows(api, "ns-create")
    assert wf["metadata"]["name"] == "qs-g1"
    (owner,) = wf["metadata"]["ownerReferences"]
    assert owner["uid"] == created["metadata"]["uid"] and owner["kind"] == "NMMPipeline" and owner["controller"] is True
    expected = builders.build_workflow(get(api, "ns-create", "qs"), CompileSettings(image="ghcr.io/nmm-dev/nmm:0.1.0"))
    assert wf["spec"] == expected["spec"]
    status = wait_for(lambda: get(api, "ns-create", "qs").get("status", {}).get("workflow"), what="status.workflow")
    assert status == "qs-g1" and wfs


def test_workflow_status_flows_into_pipeline_status_and_printer_columns(api, operator, emu):
    create(api, "ns-status", pipeline("qs"))
    wait_for(lambda: workflows(api, "ns-status"), what="a workflow")
    nodes = {
        "1": {"displayName": "curate", "type": "Pod", "phase": "Succeeded"},
        "2": {"displayName": "train", "type": "Retry", "phase": "Running"},
    }
    api.patch_namespaced_custom_object(
        "argoproj.io",
        "v1alpha1",
        "ns-status",
        "workflows",
        "qs-g1",
        {"status": {"phase": "Running", "startedAt": "2026-11-22T10:00:00Z", "nodes": nodes}},
    )
    running = wait_for(
        lambda: (s := get(api, "ns-status", "qs")).get("status", {}).get("stage") == "train" and s, what="stage train"
    )
    assert columns(running)["Phase"] == "Running" and columns(running)["Stage"] == "train"
    assert running["status"]["stages"]["curate"] == "Succeeded"
    nodes.update(
        {
            "2": {"displayName": "train", "type": "Retry", "phase": "Succeeded"},
            "3": {"displayName": "evaluate", "type": "Pod", "phase": "Succeeded"},
            "4": {
                "displayName": "rollout",
                "type": "Pod",
                "phase": "Succeeded",
                "outputs": {
                    "parameters": [{"name": "decision", "value": "promoted"}, {"name": "version", "value": "3"}]
                },
            },
            "5": {
                "displayName": "finalize",
                "type": "Pod",
                "phase": "Succeeded",
                "outputs": {"parameters": [{"name": "mlflow_run_id", "value": "run-abc"}]},
            },
        }
    )
    api.patch_namespaced_custom_object(
        "argoproj.io",
        "v1alpha1",
        "ns-status",
        "workflows",
        "qs-g1",
        {"status": {"phase": "Succeeded", "finishedAt": "2026-11-22T11:00:00Z", "nodes": nodes}},
    )
    done = wait_for(
        lambda: (s := get(api, "ns-status", "qs")).get("status", {}).get("phase") == "Succeeded" and s, what="Succeeded"
    )
    assert columns(done) | {"Age": None} == {"Phase": "Succeeded", "Stage": "", "Champion": "3", "Age": None}
    assert done["status"]["mlflowRunId"] == "run-abc"
    ready = next(c for c in done["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    events = [
        o.raw for (res, ns, _), o in list(emu.emulator.objects.items()) if res.plural == "events" and not o.deleted
    ]
    reasons = {e.get("reason") for e in events if e.get("involvedObject", {}).get("name") == "qs"}
    assert {"WorkflowCreated", "WorkflowSucceeded"} <= reasons


def test_a_training_job_kueue_holds_makes_the_pipeline_queued_until_admitted(api, operator):
    """Kueue suspends a PyTorchJob labelled with a queue until it admits the whole gang. While the
    run's job is suspended the pipeline's phase is Queued (Ready False, reason Queued, the job
    named); once admitted it is Running again (the recheck timer looks within recheckSeconds)."""
    create(api, "ns-queue", pipeline("qs"))
    wait_for(lambda: workflows(api, "ns-queue"), what="a workflow")
    nodes = {
        "1": {"displayName": "curate", "type": "Pod", "phase": "Succeeded"},
        "2": {"displayName": "train", "type": "Retry", "phase": "Running"},
    }
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "qs-g1-train", "labels": {"nmm.dev/run": "qs-g1", "kueue.x-k8s.io/queue-name": "nmm"}},
        "spec": {"runPolicy": {"suspend": True}, "pytorchReplicaSpecs": {}},
        "status": {"conditions": [{"type": "Suspended", "status": "True", "reason": "JobSuspended"}]},
    }
    api.create_namespaced_custom_object("kubeflow.org", "v1", "ns-queue", "pytorchjobs", job)
    api.patch_namespaced_custom_object(
        "argoproj.io", "v1alpha1", "ns-queue", "workflows", "qs-g1", {"status": {"phase": "Running", "nodes": nodes}}
    )
    queued = wait_for(
        lambda: (s := get(api, "ns-queue", "qs")).get("status", {}).get("phase") == "Queued" and s, what="Queued"
    )
    assert columns(queued)["Phase"] == "Queued" and columns(queued)["Stage"] == "train"
    ready = next(c for c in queued["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "Queued" and "qs-g1-train" in ready["message"]
    api.patch_namespaced_custom_object(
        "kubeflow.org",
        "v1",
        "ns-queue",
        "pytorchjobs",
        "qs-g1-train",
        {
            "spec": {"runPolicy": {"suspend": False}},
            "status": {"conditions": [{"type": "Suspended", "status": "False", "reason": "JobResumed"}]},
        },
    )
    wait_for(
        lambda: get(api, "ns-queue", "qs").get("status", {}).get("phase") == "Running", 15, "Running once admitted"
    )


def test_nmm_retry_retries_the_failed_workflow_like_argo_retry(api, operator, emu):
    """`nmm retry NAME -n NS` sets the nmm.dev/retry annotation; the operator resets the failed
    Workflow the way `argo retry` does: succeeded steps stay, the failed step's nodes and the exit
    handler's go, the groups above them and the Workflow are Running again; status.retries counts
    it and an event says so. A retry of a Workflow that has not failed is refused with an event."""
    from nmm import cluster

    create(api, "ns-retry", pipeline("qs"))
    wait_for(lambda: workflows(api, "ns-retry"), what="a workflow")
    nodes = {
        "qs-g1": {
            "id": "qs-g1",
            "displayName": "qs-g1",
            "type": "DAG",
            "phase": "Failed",
            "templateName": "pipeline",
            "children": ["c", "t"],
        },
        "c": {"id": "c", "displayName": "curate", "type": "Pod", "phase": "Succeeded", "templateName": "curate"},
        "t": {
            "id": "t",
            "displayName": "train",
            "type": "Retry",
            "phase": "Failed",
            "templateName": "train",
            "children": ["t0"],
        },
        "t0": {"id": "t0", "displayName": "train(0)", "type": "Pod", "phase": "Failed", "templateName": "train"},
        "f": {"id": "f", "displayName": "finalize", "type": "Pod", "phase": "Succeeded", "templateName": "finalize"},
    }
    api.patch_namespaced_custom_object(
        "argoproj.io",
        "v1alpha1",
        "ns-retry",
        "workflows",
        "qs-g1",
        {"status": {"phase": "Failed", "finishedAt": "2026-11-30T10:00:00Z", "nodes": nodes}},
    )
    wait_for(lambda: get(api, "ns-retry", "qs").get("status", {}).get("phase") == "Failed", what="Failed")
    uid = api.get_namespaced_custom_object("argoproj.io", "v1alpha1", "ns-retry", "workflows", "qs-g1")["metadata"][
        "uid"
    ]

    def job(plural: str, name: str, owner: str | None, status: dict) -> None:
        group, kind = ("ray.io", "RayJob") if plural == "rayjobs" else ("kubeflow.org", "PyTorchJob")
        owners = (
            [{"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow", "name": "qs-g1", "uid": owner}] if owner else []
        )
        api.create_namespaced_custom_object(
            group,
            "v1",
            "ns-retry",
            plural,
            {
                "apiVersion": f"{group}/v1",
                "kind": kind,
                "status": status,
                "spec": {},
                "metadata": {"name": name, "labels": {"nmm.dev/run": "qs-g1"}, "ownerReferences": owners},
            },
        )

    failed = {"conditions": [{"type": "Failed", "status": "True", "reason": "PyTorchJobFailed"}]}
    job("pytorchjobs", "qs-g1-train", uid, failed)  # the failed step's job: deleted, so the retry can create it again
    job(
        "pytorchjobs", "qs-g1-train-mid", uid, {"conditions": [{"type": "Running", "status": "True"}]}
    )  # not failed: kept
    job("pytorchjobs", "impostor", None, failed)  # the run's label, not owned by its Workflow: kept
    job("rayjobs", "qs-g1-curate", uid, {"jobStatus": "FAILED"})  # deleted
    os.environ["NMM_KUBE_SERVER"] = emu.url
    try:
        cluster.retry("qs", "ns-retry")
    finally:
        del os.environ["NMM_KUBE_SERVER"]
    wf = wait_for(
        lambda: (
            (w := api.get_namespaced_custom_object("argoproj.io", "v1alpha1", "ns-retry", "workflows", "qs-g1"))[
                "status"
            ]["phase"]
            == "Running"
            and w
        ),
        what="the workflow retried",
    )
    assert set(wf["status"]["nodes"]) == {"qs-g1", "c", "t"}  # failed pod and exit handler dropped, curate kept
    assert wf["status"]["nodes"]["t"]["phase"] == "Running" and wf["status"]["nodes"]["qs-g1"]["phase"] == "Running"
    assert wf["status"]["nodes"]["c"]["phase"] == "Succeeded" and "finishedAt" not in wf["status"]
    assert wf["metadata"]["labels"]["workflows.argoproj.io/completed"] == "false"
    assert wait_for(lambda: get(api, "ns-retry", "qs").get("status", {}).get("retries") == 1, what="status.retries")

    def reasons() -> set:
        events = [
            o.raw for (res, ns, _), o in list(emu.emulator.objects.items()) if res.plural == "events" and not o.deleted
        ]
        return {e.get("reason") for e in events if e.get("involvedObject", {}).get("name") == "qs"}

    wait_for(lambda: "WorkflowRetried" in reasons(), what="the WorkflowRetried event")
    left = {
        o["metadata"]["name"]
        for plural, group in (("pytorchjobs", "kubeflow.org"), ("rayjobs", "ray.io"))
        for o in api.list_namespaced_custom_object(group, "v1", "ns-retry", plural)["items"]
    }
    assert left == {"qs-g1-train-mid", "impostor"}, left
    os.environ["NMM_KUBE_SERVER"] = emu.url
    try:
        cluster.retry("qs", "ns-retry")  # running now: nothing to retry
    finally:
        del os.environ["NMM_KUBE_SERVER"]
    wait_for(lambda: "RetryIgnored" in reasons(), what="the RetryIgnored event")
    assert get(api, "ns-retry", "qs")["status"]["retries"] == 1


def test_deleting_the_pipeline_garbage_collects_its_workflow_r5(api, operator):
    create(api, "ns-delete", pipeline("qs"))
    wait_for(lambda: workflows(api, "ns-delete"), what="a workflow")
    # The only finalizer is the one kopf needs to stop the recheck timer, under our own name.
    assert get(api, "ns-delete", "qs")["metadata"].get("finalizers", []) in ([], ["nmm.dev/finalizer"])
    api.delete_namespaced_custom_object("nmm.dev", "v1alpha1", "ns-delete", "nmmpipelines", "qs")
    wait_for(lambda: not workflows(api, "ns-delete"), what="workflows gone")
    pipelines = api.list_namespaced_custom_object("nmm.dev", "v1alpha1", "ns-delete", "nmmpipelines")["items"]
    assert pipelines == []


def test_killed_between_create_and_status_patch_restart_leaves_one_workflow_r1(api, emu, tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"operator": {"recheckSeconds": 1}}))
    emu.call(emu.emulator.hold, "nmmpipelines")  # the operator's status/progress patches will hang
    first = Operator(emu.url, tmp_path / "first.log", settings).start()
    try:
        create(api, "ns-r1", pipeline("qs"))
        wait_for(lambda: workflows(api, "ns-r1"), what="the workflow of the first operator")
        time.sleep(1.0)
        assert not get(api, "ns-r1", "qs").get("status")  # status was never patched
    finally:
        first.kill()
        emu.call(emu.emulator.release)
    second = Operator(emu.url, tmp_path / "second.log", settings).start()
    try:
        wait_for(lambda: get(api, "ns-r1", "qs").get("status", {}).get("workflow") == "qs-g1", what="status converges")
        time.sleep(1.5)
        assert [w["metadata"]["name"] for w in workflows(api, "ns-r1")] == ["qs-g1"]
    finally:
        second.stop()


def test_invalid_spec_fails_permanently_with_a_condition_and_no_retries_r7(api, operator):
    bad = pipeline("bad")
    bad["spec"]["training"]["phases"][0]["steps"] = -5
    create(api, "ns-invalid", bad)
    status = wait_for(lambda: get(api, "ns-invalid", "bad").get("status", {}).get("conditions"), what="conditions")
    failed = next(c for c in status if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "InvalidSpec"
    assert "spec.training.phases[0].steps" in failed["message"]
    time.sleep(3)  # long enough for kopf's retry backoff, were it retrying
    assert workflows(api, "ns-invalid") == []
    assert operator.text().count("invalid pipeline: spec.training.phases[0].steps") == 1


def test_api_5xx_is_retried_with_backoff_then_converges_r7(api, operator, emu):
    emu.call(emu.emulator.fail_creates, "workflows", 2)
    create(api, "ns-5xx", pipeline("qs"))
    wait_for(lambda: workflows(api, "ns-5xx"), timeout=60, what="the workflow after retries")
    wait_for(lambda: get(api, "ns-5xx", "qs").get("status", {}).get("workflow") == "qs-g1", what="status")
    log = operator.text()
    retries = [line for line in log.splitlines() if "failed temporarily: cannot create workflow qs-g1: 500" in line]
    assert len(retries) == 2  # two temporary failures (each retried after its delay), then success
    assert "PermanentError" not in log and len(workflows(api, "ns-5xx")) == 1


def test_a_workflow_deleted_behind_the_operators_back_is_reported_r9(api, operator):
    create(api, "ns-r9", pipeline("qs"))
    wait_for(lambda: get(api, "ns-r9", "qs").get("status", {}).get("workflow"), what="status.workflow")
    api.delete_namespaced_custom_object("argoproj.io", "v1alpha1", "ns-r9", "workflows", "qs-g1")
    status = wait_for(
        lambda: (s := get(api, "ns-r9", "qs").get("status", {})).get("phase") == "Error" and s, what="Error"
    )
    assert status["conditions"][-1]["reason"] == "WorkflowMissing"


def test_a_deleted_workflow_is_recreated_when_the_spec_asks_r9(api, operator):
    create(api, "ns-r9b", pipeline("qs", onWorkflowDeleted="recreate"))
    first = wait_for(lambda: workflows(api, "ns-r9b"), what="a workflow")[0]["metadata"]["uid"]
    wait_for(lambda: get(api, "ns-r9b", "qs").get("status", {}).get("workflow"), what="status.workflow")
    api.delete_namespaced_custom_object("argoproj.io", "v1alpha1", "ns-r9b", "workflows", "qs-g1")
    again = wait_for(lambda: [w for w in workflows(api, "ns-r9b") if w["metadata"]["uid"] != first], what="recreated")
    assert [w["metadata"]["name"] for w in again] == ["qs-g1"]
    assert "recreated" in get(api, "ns-r9b", "qs")["status"]["message"]


def test_a_pre_created_workflow_is_never_adopted(api, operator):
    # Someone created "qs-g1" before the pipeline existed: main took the 409 as success and
    # mirrored the stranger's status (its champion included) into the pipeline.
    stranger = builders.build_workflow(
        {
            **pipeline("qs"),
            "apiVersion": "nmm.dev/v1alpha1",
            "kind": "NMMPipeline",
            "metadata": {"name": "qs", "namespace": "ns-adopt", "uid": "not-the-pipeline", "generation": 1},
        },
        CompileSettings(),
    )
    del stranger["metadata"]["ownerReferences"]  # made by hand: labelled as the pipeline's, owned by nobody
    api.create_namespaced_custom_object("argoproj.io", "v1alpha1", "ns-adopt", "workflows", stranger)
    nodes = {
        "1": {
            "displayName": "rollout",
            "type": "Pod",
            "phase": "Succeeded",
            "outputs": {"parameters": [{"name": "decision", "value": "promoted"}, {"name": "version", "value": "666"}]},
        }
    }
    api.patch_namespaced_custom_object(
        "argoproj.io", "v1alpha1", "ns-adopt", "workflows", "qs-g1", {"status": {"phase": "Succeeded", "nodes": nodes}}
    )
    create(api, "ns-adopt", pipeline("qs"))
    st = wait_for(
        lambda: (s := get(api, "ns-adopt", "qs").get("status", {})).get("conditions") and s, what="a condition"
    )
    assert st["conditions"][-1]["reason"] == "WorkflowNotOwned" and "not owned" in st["message"]
    time.sleep(2.5)  # recheck ticks (1 s) and mirror events pass; nothing may adopt the stranger
    st = get(api, "ns-adopt", "qs")["status"]
    assert st.get("phase") != "Succeeded" and "champion" not in st and st.get("workflow") != "qs-g1"
    (wf,) = workflows(api, "ns-adopt")
    assert not wf["metadata"].get("ownerReferences")


def test_a_spec_edit_stops_the_superseded_generation(api, operator, emu):
    created = create(api, "ns-edit", pipeline("qs"))
    wait_for(lambda: get(api, "ns-edit", "qs").get("status", {}).get("workflow") == "qs-g1", what="generation 1")
    api.patch_namespaced_custom_object(
        "argoproj.io", "v1alpha1", "ns-edit", "workflows", "qs-g1", {"status": {"phase": "Running"}}
    )
    body = get(api, "ns-edit", "qs")
    body["spec"]["training"]["seed"] = 7
    api.patch_namespaced_custom_object("nmm.dev", "v1alpha1", "ns-edit", "nmmpipelines", "qs", {"spec": body["spec"]})
    wait_for(lambda: get(api, "ns-edit", "qs").get("status", {}).get("workflow") == "qs-g2", what="generation 2")
    by_name = wait_for(
        lambda: (
            (w := {x["metadata"]["name"]: x for x in workflows(api, "ns-edit")})
            and w["qs-g1"]["spec"].get("shutdown")
            and w
        ),
        what="qs-g1 stopped",
    )
    assert by_name["qs-g1"]["spec"]["shutdown"] == "Stop"  # argo stop: exit handler closes its MLflow run
    assert "shutdown" not in by_name["qs-g2"]["spec"]
    assert all(w["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"] for w in by_name.values())

    def reasons() -> set:  # kopf posts events from a queue of its own: they may lag the patch
        return {
            o.raw.get("reason")
            for (res, ns, _), o in list(emu.emulator.objects.items())
            if res.plural == "events" and ns == "ns-edit" and not o.deleted
        }

    wait_for(lambda: "WorkflowSuperseded" in reasons(), what="a WorkflowSuperseded event")


def test_every_handler_has_an_explicit_nmm_id_r8():
    tree = ast.parse((ROOT / "operators" / "nmm_operator" / "handlers.py").read_text())
    decorators = [d for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) for d in node.decorator_list]
    kopf_calls = [d for d in decorators if isinstance(d, ast.Call) and ast.unparse(d.func).startswith("kopf.")]
    assert len(kopf_calls) >= 6
    for call in kopf_calls:
        ids = [k.value.value for k in call.keywords if k.arg == "id"]
        assert ids and ids[0].startswith("nmm-"), ast.unparse(call)
