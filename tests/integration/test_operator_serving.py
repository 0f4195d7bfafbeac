"""The NMMService controller (`kopf run`, a real subprocess) against the Kubernetes emulator, a real
model registry (MLflow, sqlite) and real `nmm serve` processes on loopback standing in for the
pods Kubernetes would run. The test plays the data plane too: a traffic thread reads the split the
operator wrote (the InferenceService's `canaryTrafficPercent`, or the HTTPRoute's weights) and
sends requests to the two servers in that proportion, as KServe or a Gateway would.

- KServe backend: the first version is served; moving the `candidate` alias starts a canary that
  passes every step (the operator is killed and restarted mid-canary and carries on from its
  status) and is promoted: `champion` moves, one InferenceService throughout.
- Gateway backend: a candidate whose server dies mid-canary is rolled back (weight 0, Degraded,
  then RolledBack), the reason on the status and on the registry version, `champion` untouched.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from kubernetes import client

from nmm.ports import free_port
from nmm.rollout import probe
from tests.conftest import NMM, wait_for, wait_http
from tests.integration.kube_emulator import EmulatorThread
from tests.serving_fixture import publish_small_model

pytestmark = pytest.mark.integration
VERBS = ["get", "list", "watch", "create", "patch", "update", "delete"]
RESOURCES = {
    "nmm.dev/v1alpha1/nmmservices": dict(kind="NMMService", namespaced=True, verbs=VERBS, subresources=["status"]),
    "serving.kserve.io/v1beta1/inferenceservices": dict(kind="InferenceService", namespaced=True, verbs=VERBS),
    "gateway.networking.k8s.io/v1/httproutes": dict(kind="HTTPRoute", namespaced=True, verbs=VERBS),
}
KOPF = str(Path(sys.executable).parent / "kopf")
NAMESPACES = ("team-kserve", "team-gateway", "team-cli", "team-other", "team-crash")


def model(ns: str) -> str:
    """Each namespace's own registered model: a registered model belongs to one namespace."""
    return f"nmm-svc-{ns}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The emulator, a registry with versions 1 and 2 of one model folder, probe cases."""
    tmp = tmp_path_factory.mktemp("serving")
    folder = (tmp / "model").as_uri()
    publish_small_model(folder)
    from nmm import storage

    digest = storage.read_manifest(folder)["digest"]
    db = f"sqlite:///{tmp / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(tracking_uri=db, registry_uri=db)
    for ns in NAMESPACES:
        mlflow.create_registered_model(model(ns), tags={"nmm.namespace": ns})
        for _ in range(2):
            mlflow.create_model_version(
                model(ns), source=folder, tags={"nmm.model_store_uri": folder, "nmm.model_digest": digest}
            )
        mlflow.set_registered_model_alias(model(ns), "candidate", "1")
        mlflow.set_registered_model_alias(model(ns), "champion", "1")
    rng = np.random.default_rng(0)
    pixels = (rng.random((8, 8, 8, 1)) * 255).astype(np.uint8)
    cases = [{"image": probe._data_url(p), "question": None, "expect": {"digit": i % 10}} for i, p in enumerate(pixels)]
    (tmp / "probe.jsonl").write_bytes(probe.dumps(probe.Cases(chat=cases)))
    with EmulatorThread(RESOURCES) as emu:
        cfg = client.Configuration()
        cfg.host = emu.url
        api = client.ApiClient(cfg)
        yield {
            "tmp": tmp,
            "folder": folder,
            "db": db,
            "mlflow": mlflow,
            "emu": emu,
            "api": api,
            "custom": client.CustomObjectsApi(api),
            "cases": (tmp / "probe.jsonl").as_uri(),
        }


class Server:
    def __init__(self, folder: str, log: Path):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NMM_S3", "MLFLOW"))}
        self.proc = subprocess.Popen(
            [NMM, "serve", folder, "--port", str(self.port)],
            env=env,
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_http(self.url + "/healthz", 60, self.proc)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Operator:
    def __init__(self, world, settings: dict, log: Path):
        path = log.with_suffix(".json")
        path.write_text(json.dumps(settings))
        self.env = dict(
            os.environ,
            NMM_KUBE_SERVER=world["emu"].url,
            NMM_OPERATOR_SETTINGS=str(path),
            MLFLOW_TRACKING_URI=world["db"],
        )
        self.log = log
        self.start()

    def start(self, failpoint: str | None = None) -> None:
        env = self.env | ({"NMM_OPERATOR_FAILPOINT": failpoint} if failpoint else {})
        self.proc = subprocess.Popen(
            [KOPF, "run", "--standalone", "--all-namespaces", "-m", "nmm_operator.handlers"],
            env=env,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


class DataPlane(threading.Thread):
    """Sends chat requests to stable or candidate in the proportion `weight()` reads."""

    def __init__(self, urls: dict, weight, cases: list[dict]):
        super().__init__(daemon=True)
        self.urls, self.weight, self.cases, self.stop = urls, weight, cases, threading.Event()
        self.sent = {"stable": 0, "candidate": 0}

    def run(self) -> None:
        rnd, n, w, read_at = random.Random(0), 0, 0, 0.0
        while not self.stop.is_set():
            if time.monotonic() - read_at > 0.2:  # what the data plane was last told
                w, read_at = self.weight(), time.monotonic()
            track = "candidate" if rnd.random() * 100 < w else "stable"
            body = probe.chat_body(self.cases[n % len(self.cases)], "nmm", max_tokens=4)
            req = urllib.request.Request(
                self.urls[track] + "/v1/chat/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            try:
                urllib.request.urlopen(req, timeout=10).read()
            except (OSError, http.client.HTTPException):  # a server killed mid-answer cuts the response
                time.sleep(0.05)
            n += 1
            self.sent[track] += 1


def service(cases_uri: str, ns: str) -> dict:
    return {
        "apiVersion": "nmm.dev/v1alpha1",
        "kind": "NMMService",
        "metadata": {"name": "digits"},
        "spec": {
            "model": {"name": model(ns), "alias": "candidate"},
            "canary": {
                "steps": [{"weight": 50, "pauseSeconds": 1.5}, {"weight": 100, "pauseSeconds": 1.5}],
                "analysis": {
                    "minRequests": 3,
                    "maxP95LatencyMs": 30000,
                    "maxTimeToFirstTokenMs": 30000,
                    "qualityProbe": {"cases": 8, "maxQualityDrop": 0.05, "casesUri": cases_uri},
                },
            },
        },
    }


def settings(world, backend: str, ns: str, urls: dict, metrics_port: int = 0) -> dict:
    return {
        "resolved": {"storeUri": (world["tmp"] / "store").as_uri()},
        "operator": {"recheckSeconds": 60, "metricsPort": metrics_port},
        "serving": {
            "backend": backend,
            "tickSeconds": 0.5,
            "readyTimeoutSeconds": 30,
            "gateway": {"name": "web", "namespace": "gateways"},
            "endpoints": {f"{ns}/digits": urls},
        },
    }


def get(world, ns: str) -> dict:
    return world["custom"].get_namespaced_custom_object("nmm.dev", "v1alpha1", ns, "nmmservices", "digits")


def at_rest(world, ns: str, stable: int) -> dict | None:
    """The status once `stable` serves and nothing the operator decided is still to do (`pending`)."""
    st = get(world, ns).get("status", {})
    return st if st.get("stableVersion") == stable and "pending" not in st else None


def events(world, ns: str) -> list[str]:
    objs = [
        o.raw
        for (res, n, _), o in list(world["emu"].emulator.objects.items())
        if res.plural == "events" and n == ns and not o.deleted
    ]
    return [e.get("reason") for e in objs if e.get("involvedObject", {}).get("name") == "digits"]


def test_kserve_canary_passes_every_step_survives_a_restart_and_promotes(world):
    ns, tmp, custom = "team-kserve", world["tmp"], world["custom"]
    stable, candidate = Server(world["folder"], tmp / "k-stable.log"), Server(world["folder"], tmp / "k-candidate.log")
    urls = {"stable": stable.url, "candidate": candidate.url}
    metrics_port = free_port()
    op = Operator(world, settings(world, "kserve", ns, urls, metrics_port), tmp / "k-operator.log")
    isvcs = lambda: custom.list_namespaced_custom_object("serving.kserve.io", "v1beta1", ns, "inferenceservices")[
        "items"
    ]

    def weight() -> int:
        items = isvcs()
        pct = items[0]["spec"]["predictor"].get("canaryTrafficPercent") if items else None
        return 0 if pct is None else pct

    plane = DataPlane(urls, weight, probe.loads((tmp / "probe.jsonl").read_bytes(), 8).chat)
    plane.start()
    try:
        custom.create_namespaced_custom_object("nmm.dev", "v1alpha1", ns, "nmmservices", service(world["cases"], ns))
        wait_for(lambda: at_rest(world, ns, 1), timeout=60, what="Healthy on version 1")  # its children written too
        (isvc,) = isvcs()
        args = isvc["spec"]["predictor"]["containers"][0]["args"]
        assert args[1] == world["folder"] and args[args.index("--name") + 1] == model(ns) and "--digest" in args
        assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]
        assert isvc["metadata"]["ownerReferences"][0]["kind"] == "NMMService"

        world["mlflow"].set_registered_model_alias(model(ns), "candidate", "2")
        wait_for(lambda: weight() == 50, 60, "the canary at 50%")
        assert isvcs()[0]["spec"]["predictor"]["labels"]["nmm.dev/model-version"] == "2"
        op.kill()  # mid-canary: everything the rollout knows is in the status
        op.start()
        done = wait_for(lambda: at_rest(world, ns, 2), 90, "promotion")
        assert done["phase"] == "Healthy" and done.get("canaryVersion") is None
        assert [(a["weight"], a["ok"]) for a in done["analysis"]] == [(50, True), (100, True)]
        assert all(a["measured"]["requests"] >= 3 and a["measured"]["quality_drop"] <= 0.05 for a in done["analysis"])
        assert str(world["mlflow"].get_model_version_by_alias(model(ns), "champion").version) == "2"
        (isvc,) = isvcs()  # one InferenceService per service, throughout
        assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]
        assert {"Deployed", "CanaryStarted", "StepPassed", "Promoted"} <= set(events(world, ns))
        assert next(c for c in done["conditions"] if c["type"] == "Ready")["reason"] == "Promoted"
        exported = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert f'nmm_canary_quality{{namespace="{ns}",service="digits",track="candidate",version="2"}}' in exported
        assert f'nmm_canary_weight{{namespace="{ns}",service="digits"}} 0.0' in exported
    finally:
        tear_down(world, ns, op, plane, stable, candidate)


def gateway_world(world, ns: str, prefix: str):
    """Two servers, the operator on the gateway backend, and the data plane following the
    HTTPRoute's weights: (stable, candidate, operator, plane, route(), weight())."""
    tmp, custom = world["tmp"], world["custom"]
    stable, candidate = (
        Server(world["folder"], tmp / f"{prefix}-stable.log"),
        Server(world["folder"], tmp / f"{prefix}-candidate.log"),
    )
    urls = {"stable": stable.url, "candidate": candidate.url}
    op = Operator(world, settings(world, "gateway", ns, urls), tmp / f"{prefix}-operator.log")
    route = lambda: custom.get_namespaced_custom_object("gateway.networking.k8s.io", "v1", ns, "httproutes", "digits")

    def weight() -> int:
        try:
            return route()["spec"]["rules"][0]["backendRefs"][1]["weight"]
        except client.exceptions.ApiException:
            return 0

    plane = DataPlane(urls, weight, probe.loads((tmp / "probe.jsonl").read_bytes(), 8).chat)
    plane.start()
    return stable, candidate, op, plane, route, weight


def test_gateway_canary_whose_server_dies_is_rolled_back_with_the_reason(world):
    ns, custom = "team-gateway", world["custom"]
    world["mlflow"].set_registered_model_alias(model(ns), "candidate", "1")
    world["mlflow"].set_registered_model_alias(model(ns), "champion", "1")
    stable, candidate, op, plane, route, weight = gateway_world(world, ns, "g")
    apps = client.AppsV1Api(world["api"])
    try:
        body = service(world["cases"], ns)
        body["spec"]["canary"]["steps"] = [
            {"weight": 30, "pauseSeconds": 1.5},
            {"weight": 60, "pauseSeconds": 4},
            {"weight": 100, "pauseSeconds": 1},
        ]
        custom.create_namespaced_custom_object("nmm.dev", "v1alpha1", ns, "nmmservices", body)
        wait_for(lambda: at_rest(world, ns, 1), timeout=60, what="Healthy on version 1")  # its children written too
        assert apps.read_namespaced_deployment("digits-canary", ns).spec.replicas == 0
        world["mlflow"].set_registered_model_alias(model(ns), "candidate", "2")
        wait_for(
            lambda: weight() == 60, 60, lambda: f"step 2 at 60%: {get(world, ns).get('status')}, sent {plane.sent}"
        )
        assert apps.read_namespaced_deployment("digits-canary", ns).spec.replicas == 1
        candidate.kill()  # the canary's pod dies during step 2
        rolled = wait_for(
            lambda: (s := at_rest(world, ns, 1)) and s.get("phase") == "RolledBack" and s, 60, "RolledBack"
        )
        assert rolled["stableVersion"] == 1 and rolled.get("canaryVersion") is None and rolled["weight"] == 0
        assert "step 2 (60%)" in rolled["reason"] and "candidate not observable" in rolled["reason"], rolled["reason"]
        assert [a["ok"] for a in rolled["analysis"]] == [True, False]
        assert weight() == 0 and route()["spec"]["rules"][0]["backendRefs"][0]["weight"] == 100
        assert apps.read_namespaced_deployment("digits-canary", ns).spec.replicas == 0
        v2 = world["mlflow"].get_model_version(model(ns), "2")
        assert v2.tags["nmm.serving.decision"] == "rolled_back" and "not observable" in v2.tags["nmm.serving.reason"]
        assert str(world["mlflow"].get_model_version_by_alias(model(ns), "champion").version) == "1"
        assert {"CanaryStarted", "StepPassed", "AnalysisFailed", "RolledBack"} <= set(events(world, ns))
        time.sleep(2)  # the spec still names version 2: no new canary starts
        assert get(world, ns)["status"]["phase"] == "RolledBack"
    finally:
        tear_down(world, ns, op, plane, stable, candidate)


def tear_down(world, ns: str, op: Operator, *stopping) -> None:
    """Delete the service (kopf releases its finalizer), stop the operator and the rest — the
    processes whatever happened before (a failed test leaves no server running)."""
    custom = world["custom"]
    try:
        custom.delete_namespaced_custom_object("nmm.dev", "v1alpha1", ns, "nmmservices", "digits")
        wait_for(
            lambda: not custom.list_namespaced_custom_object("nmm.dev", "v1alpha1", ns, "nmmservices")["items"],
            15,
            "the service gone (kopf released its finalizer)",
        )
    finally:
        op.stop()
        planes = [t for t in stopping if isinstance(t, DataPlane)]
        for plane in planes:  # quiet before the servers go
            plane.stop.set()
            plane.join(15)
        for server in stopping:
            if not isinstance(server, DataPlane):
                server.kill()


def test_an_operator_killed_between_re_pointing_the_children_and_telling_the_registry_still_promotes(world):
    """Issue 27 item 4, with the real operator: it dies right after the promotion's children are
    written (the stable Deployment already serves version 2, `champion` still 1). On main the next
    tick analysed a canary that no longer existed and tagged the version rolled_back; now the
    status holds the intent and the restarted operator finishes the promotion."""
    ns, custom, mlflow = "team-crash", world["custom"], world["mlflow"]
    stable, candidate, op, plane, _, weight = gateway_world(world, ns, "x")
    try:
        body = service(world["cases"], ns)
        body["spec"]["canary"]["steps"] = [{"weight": 50, "pauseSeconds": 1.5}, {"weight": 100, "pauseSeconds": 8}]
        custom.create_namespaced_custom_object("nmm.dev", "v1alpha1", ns, "nmmservices", body)
        wait_for(lambda: at_rest(world, ns, 1), 60, "serving version 1")
        mlflow.set_registered_model_alias(model(ns), "candidate", "2")
        # The last step at 100 %, and at rest: the step's own intent done (else the restart finishes that one first).
        wait_for(lambda: weight() == 100 and "pending" not in get(world, ns)["status"], 60, "the last step at 100%")
        op.kill()
        op.start(failpoint="after-children")  # its next write of children is the promotion's: it dies right after
        assert op.proc.wait(timeout=60) == 137
        died = get(world, ns)["status"]
        assert died["pending"]["champion"] == 2 and died["stableVersion"] == 2  # the intent, recorded first
        apps = client.AppsV1Api(world["api"])
        assert (
            apps.read_namespaced_deployment("digits-stable", ns).spec.template.metadata.labels["nmm.dev/model-version"]
            == "2"
        )
        assert str(mlflow.get_model_version_by_alias(model(ns), "champion").version) == "1"  # not told yet
        op.start()
        done = wait_for(lambda: at_rest(world, ns, 2), 60, "the promotion finished by the restarted operator")
        assert (
            done["phase"] == "Healthy" and str(mlflow.get_model_version_by_alias(model(ns), "champion").version) == "2"
        )
        assert (
            "nmm.serving.decision" not in mlflow.get_model_version(model(ns), "2").tags
            or mlflow.get_model_version(model(ns), "2").tags["nmm.serving.decision"] == "promoted"
        )
    finally:
        tear_down(world, ns, op, plane, stable, candidate)


def test_a_service_cannot_serve_or_move_the_champion_of_another_namespace_s_model(world):
    ns, tmp, custom = "team-other", world["tmp"], world["custom"]
    op = Operator(world, settings(world, "gateway", ns, {}), tmp / "o-operator.log")
    try:
        body = service(world["cases"], ns)
        body["spec"]["model"]["name"] = model("team-kserve")  # a name another namespace registered
        custom.create_namespaced_custom_object("nmm.dev", "v1alpha1", ns, "nmmservices", body)
        st = wait_for(lambda: (s := get(world, ns).get("status", {})).get("phase") == "Failed" and s, 30, "refused")
        assert "belongs to namespace 'team-kserve', not 'team-other'" in st["message"], st
        assert not client.AppsV1Api(world["api"]).list_namespaced_deployment(ns).items  # nothing served
        assert str(world["mlflow"].get_model_version_by_alias(model("team-kserve"), "champion").version) in ("1", "2")
    finally:
        tear_down(world, ns, op)


def run_nmm(world, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, NMM_KUBE_SERVER=world["emu"].url, MLFLOW_TRACKING_URI=world["db"])
    return subprocess.run([NMM, *args], env=env, capture_output=True, text=True, timeout=60)


def test_nmm_promote_and_rollback_move_champion_and_what_is_served_without_a_canary(world):
    ns, tmp, custom, mlflow = "team-cli", world["tmp"], world["custom"], world["mlflow"]
    mlflow.set_registered_model_alias(model(ns), "candidate", "1")
    mlflow.set_registered_model_alias(model(ns), "champion", "1")
    op = Operator(world, settings(world, "kserve", ns, {}), tmp / "c-operator.log")
    served = lambda: custom.get_namespaced_custom_object(
        "serving.kserve.io", "v1beta1", ns, "inferenceservices", "digits"
    )["spec"]["predictor"]["labels"]["nmm.dev/model-version"]
    try:
        custom.create_namespaced_custom_object("nmm.dev", "v1alpha1", ns, "nmmservices", service(world["cases"], ns))
        wait_for(lambda: at_rest(world, ns, 1), what="serving version 1")
        r = run_nmm(world, "promote", "digits", "2", "-n", ns)
        assert r.returncode == 0, r.stderr
        st = wait_for(lambda: at_rest(world, ns, 2), what=lambda: f"version 2 by hand; the service: {get(world, ns)}")
        assert st["phase"] == "Healthy" and st.get("canaryVersion") is None and st["previousStableVersion"] == 1
        assert next(c for c in st["conditions"] if c["type"] == "Ready")["reason"] == "PromotedByHand"
        wait_for(
            lambda: "nmm.dev/promote" not in (get(world, ns)["metadata"].get("annotations") or {}),
            what="the promote annotation honoured once and removed",
        )
        assert str(mlflow.get_model_version_by_alias(model(ns), "champion").version) == "2"
        wait_for(lambda: served() == "2", what="the InferenceService on version 2")

        r = run_nmm(world, "rollback", "digits", "-n", ns)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: at_rest(world, ns, 1), what="back on version 1")
        assert str(mlflow.get_model_version_by_alias(model(ns), "champion").version) == "1"
        wait_for(lambda: served() == "1", what="the InferenceService on version 1")

        r = run_nmm(world, "rollback", "nosuch", "-n", ns)
        assert r.returncode == 2 and "no NMMService team-cli/nosuch" in r.stderr and "Traceback" not in r.stderr
        r = run_nmm(world, "promote", "digits", "9", "-n", ns)
        assert r.returncode == 2 and "has no version 9" in r.stderr
    finally:
        tear_down(world, ns, op)


def test_the_rollout_stage_creates_then_updates_the_pipeline_s_nmmservice(world, monkeypatch):
    import yaml

    from nmm.spec.crd import service_crd
    from nmm.stages import rollout_serving as stage_canary
    from nmm.stages.context import StageContext
    from tests.conftest import WORKFLOWS

    monkeypatch.setenv("NMM_KUBE_SERVER", world["emu"].url)
    from nmm import kubeclient

    kubeclient.api_client.cache_clear()
    doc = yaml.safe_load((WORKFLOWS / "quickstart.yaml").read_text())
    doc["spec"]["rollout"]["serving"] = {
        "replicas": 2,
        "canary": {"steps": [{"weight": 25, "pauseSeconds": 30}, {"weight": 100}]},
    }
    ctx = StageContext.create(
        json.dumps(doc), "team-stage", "uid-1", "quickstart-abcde", "file:///tmp/store", str(world["tmp"])
    )
    schema = service_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    import jsonschema

    first = stage_canary.service_body(ctx, ctx.spec.spec.rollout.serving, "nmm-quickstart", "3", "store://probe.jsonl")
    jsonschema.Draft4Validator(schema).validate(first)
    assert stage_canary.apply_service(first) == "created"
    second = stage_canary.service_body(ctx, ctx.spec.spec.rollout.serving, "nmm-quickstart", "4", "store://probe.jsonl")
    assert stage_canary.apply_service(second) == "updated"
    svc = world["custom"].get_namespaced_custom_object("nmm.dev", "v1alpha1", "team-stage", "nmmservices", "quickstart")
    assert svc["spec"]["model"] == {"name": "nmm-quickstart", "version": 4}
    assert svc["spec"]["canary"]["analysis"]["qualityProbe"]["casesUri"] == "store://probe.jsonl"
    assert svc["spec"]["replicas"] == 2 and svc["metadata"]["labels"]["nmm.dev/pipeline"] == "quickstart"
    # Probe off in the pipeline: the updated service has none (the field goes; absent is off for an NMMService).
    from nmm.spec.serving import Serving

    off = Serving.model_validate({"canary": {"analysis": {"qualityProbe": None}}})
    assert stage_canary.apply_service(stage_canary.service_body(ctx, off, "nmm-quickstart", "5", None)) == "updated"
    svc = world["custom"].get_namespaced_custom_object("nmm.dev", "v1alpha1", "team-stage", "nmmservices", "quickstart")
    assert "qualityProbe" not in svc["spec"]["canary"]["analysis"] and svc["spec"]["model"]["version"] == 5
    from nmm.spec.serving import ServiceSpec

    assert ServiceSpec.model_validate(svc["spec"]).canary.analysis.quality_probe is None  # what the operator reads
    kubeclient.api_client.cache_clear()
    monkeypatch.setenv("NMM_KUBE_SERVER", f"http://127.0.0.1:{free_port()}")  # nobody listens: retryable
    with pytest.raises(stage_canary.ClusterRefused) as refused:
        stage_canary.apply_service(second)
    assert refused.value.retryable
    kubeclient.api_client.cache_clear()
