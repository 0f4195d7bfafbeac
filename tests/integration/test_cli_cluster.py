"""`nmm submit`, `nmm status`, `nmm logs` against the Kubernetes API emulator on loopback."""

import os
import subprocess

import pytest
import yaml
from kubernetes import client

from nmm.identity import RunIdentity
from nmm.stages.logs import Archive
from nmm.storage import layout
from tests.conftest import NMM, WORKFLOWS
from tests.integration.kube_emulator import EmulatorThread
from tests.integration.test_operator import RESOURCES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def emu():
    with EmulatorThread(RESOURCES) as e:
        yield e


@pytest.fixture(scope="module")
def api(emu):
    cfg = client.Configuration()
    cfg.host = emu.url
    return client.CustomObjectsApi(client.ApiClient(cfg))


def nmm(emu, *args, cwd=None):
    env = dict(os.environ, NMM_KUBE_SERVER=emu.url)
    return subprocess.run([NMM, *args], env=env, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_submit_creates_then_updates_the_pipeline(emu, api, tmp_path):
    r = nmm(emu, "submit", str(WORKFLOWS / "quickstart.yaml"), "-n", "cli")
    assert r.returncode == 0, r.stderr
    assert "nmmpipeline cli/quickstart created (generation 1)" in r.stdout
    obj = api.get_namespaced_custom_object("nmm.dev", "v1alpha1", "cli", "nmmpipelines", "quickstart")
    assert obj["spec"]["training"]["phases"][0]["steps"] == 300
    doc = yaml.safe_load((WORKFLOWS / "quickstart.yaml").read_text())
    doc["spec"]["training"]["phases"][0]["steps"] = 250
    edited = tmp_path / "q.yaml"
    edited.write_text(yaml.safe_dump(doc))
    r = nmm(emu, "submit", str(edited), "-n", "cli")
    assert r.returncode == 0 and "updated (generation 2)" in r.stdout, r.stdout + r.stderr
    obj = api.get_namespaced_custom_object("nmm.dev", "v1alpha1", "cli", "nmmpipelines", "quickstart")
    assert obj["spec"]["training"]["phases"][0]["steps"] == 250


def test_submit_refuses_an_invalid_pipeline_before_touching_the_cluster(emu, api):
    bad = sorted((WORKFLOWS.parent / "tests" / "bad_specs").glob("06-*.yaml"))[0]
    r = nmm(emu, "submit", str(bad), "-n", "cli-bad")
    assert r.returncode == 2 and "spec.training.phases[0].steps" in r.stderr
    assert api.list_namespaced_custom_object("nmm.dev", "v1alpha1", "cli-bad", "nmmpipelines")["items"] == []


def test_status_shows_the_table_and_a_missing_pipeline_is_a_clear_error(emu, api):
    doc = yaml.safe_load((WORKFLOWS / "quickstart.yaml").read_text())
    doc["metadata"] = {"name": "st"}
    api.create_namespaced_custom_object("nmm.dev", "v1alpha1", "cli-st", "nmmpipelines", doc)
    api.patch_namespaced_custom_object_status(
        "nmm.dev",
        "v1alpha1",
        "cli-st",
        "nmmpipelines",
        "st",
        {
            "status": {
                "phase": "Running",
                "stage": "train",
                "workflow": "st-g1",
                "stages": {"curate": "Succeeded", "train": "Running"},
                "conditions": [{"type": "Ready", "status": "False", "reason": "Running", "message": ""}],
            }
        },
    )
    r = nmm(emu, "status", "st", "-n", "cli-st")
    assert r.returncode == 0, r.stderr
    for text in ("Running", "train", "st-g1", "stage curate", "Succeeded", "condition Ready"):
        assert text in r.stdout
    r = nmm(emu, "status", "nope", "-n", "cli-st")
    assert r.returncode == 1 and "no NMMPipeline cli-st/nope" in r.stderr and "Traceback" not in r.stderr


def test_logs_fall_back_to_the_copy_archived_in_the_store(emu, api, tmp_path):
    store = (tmp_path / "store").as_uri()
    doc = yaml.safe_load((WORKFLOWS / "quickstart.yaml").read_text())
    doc["metadata"] = {"name": "lg"}
    created = api.create_namespaced_custom_object("nmm.dev", "v1alpha1", "cli-lg", "nmmpipelines", doc)
    # The run's own folder: namespace, pipeline, the pipeline's UID, the run (nmm.storage.layout).
    with Archive(layout.stage_uri(store, RunIdentity("cli-lg", "lg", created["metadata"]["uid"], "lg-g1"), "evaluate")):
        print("m2t.digits.accuracy = 0.9424")
    api.patch_namespaced_custom_object_status(
        "nmm.dev", "v1alpha1", "cli-lg", "nmmpipelines", "lg", {"status": {"workflow": "lg-g1"}}
    )
    api.create_namespaced_custom_object(
        "argoproj.io",
        "v1alpha1",
        "cli-lg",
        "workflows",
        {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Workflow",
            "metadata": {"name": "lg-g1"},
            "spec": {"templates": [{"name": "curate", "container": {"args": ["stage", "curate", "--store", store]}}]},
        },
    )
    r = nmm(emu, "logs", "lg", "--stage", "evaluate", "-n", "cli-lg")
    assert r.returncode == 0, r.stderr
    assert "m2t.digits.accuracy = 0.9424" in r.stdout and "==> " in r.stdout
    r = nmm(emu, "logs", "lg", "--stage", "train", "-n", "cli-lg")
    assert r.returncode == 1 and "no pods and no archived logs" in r.stderr
