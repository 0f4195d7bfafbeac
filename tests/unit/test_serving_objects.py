"""What the operator emits for an NMMService validates against the upstream schemas (KServe
v0.20.0, Gateway API v1.6.1, Kubernetes 1.33), and the rollout state machine walks its states."""

import json
import os

import kubernetes_validate
import pytest
import yaml

from nmm.compile import CompileSettings, serving
from nmm.compile.backends.gateway import gateway_objects
from nmm.compile.backends.kserve import inference_service
from nmm.gpu.pools import PlacementError
from nmm.spec.serving import ServiceSpec
from nmm_operator import rollout_state
from tests.conftest import ROOT
from tests.schemas import HTTP_ROUTE, INFERENCE_SERVICE, crd_errors

SPEC = ServiceSpec.model_validate(
    {
        "model": {"name": "nmm-quickstart", "alias": "candidate"},
        "replicas": 2,
        "resources": {"cpu": "2", "memory": "4Gi", "gpus": 1, "gpuPool": "l4"},
        "canary": {
            "steps": [{"weight": 10, "pauseSeconds": 60}, {"weight": 50, "pauseSeconds": 60}, {"weight": 100}],
            "analysis": {"minRequests": 5, "qualityProbe": {"cases": 10, "casesUri": "store://probe.jsonl"}},
        },
    }
)
S = CompileSettings()


def v(n: int) -> serving.ServedVersion:
    return serving.ServedVersion(n, f"s3://nmm/runs/team-a/qs/u/run-{n}/train", f"sha256:{n:064d}")


@pytest.mark.parametrize("weight", [None, 10, 0])
def test_the_inference_service_validates_and_runs_nmm_serve_on_the_gpu_pool(weight):
    isvc = inference_service("digits", "team-a", SPEC, v(7), weight, S)
    assert crd_errors(INFERENCE_SERVICE, "v1beta1", isvc) == []
    pred = isvc["spec"]["predictor"]
    (c,) = pred["containers"]
    assert c["args"][:6] == ["serve", v(7).folder, "--name", "nmm-quickstart", "--digest", v(7).digest]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1" and pred["labels"]["nmm.dev/model-version"] == "7"
    assert pred.get("canaryTrafficPercent") == weight
    assert pred["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
        "matchExpressions"
    ][0]["values"] == ["l4"]
    assert pred["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert not any("value" in e and "SECRET" in e["name"] for e in c["env"])  # secrets by reference only


def test_the_gateway_backend_validates_and_splits_by_weight():
    objs = gateway_objects("digits", "team-a", SPEC, v(3), v(4), 10, S, {"name": "web", "namespace": "gw"})
    kinds = [o["kind"] for o in objs]
    assert kinds == ["Deployment", "Deployment", "Service", "Service", "HTTPRoute"]
    for o in objs[:4]:
        kubernetes_validate.validate(o, "1.33", strict=True)
    route = objs[-1]
    assert crd_errors(HTTP_ROUTE, "v1", route) == []
    assert [(b["name"], b["weight"]) for b in route["spec"]["rules"][0]["backendRefs"]] == [
        ("digits-stable", 90),
        ("digits-canary", 10),
    ]
    assert objs[0]["spec"]["template"]["spec"]["containers"][0]["args"][1] == v(3).folder
    assert objs[1]["spec"]["replicas"] == 2
    idle = gateway_objects("digits", "team-a", SPEC, v(3), None, 0, S, {"name": "web"})
    assert idle[1]["spec"]["replicas"] == 0 and idle[-1]["spec"]["rules"][0]["backendRefs"][1]["weight"] == 0


def test_model_servers_hold_no_mlflow_credential_and_no_s3_key_that_can_write_s12():
    """Read off the compiled InferenceService and gateway Deployments: the server's env names the
    read-only key's Secret only, nothing of MLflow, and its arguments carry the folder and the
    digest (it asks no registry)."""
    import yaml

    objs = [inference_service("digits", "team-a", SPEC, v(7), 10, S)] + gateway_objects(
        "digits", "team-a", SPEC, v(3), v(4), 10, S, {"name": "web"}
    )
    text = yaml.safe_dump_all(objs)
    assert "MLFLOW" not in text and "models:/" not in text and S.s3_secret_name not in text
    containers = [objs[0]["spec"]["predictor"]["containers"][0]] + [
        o["spec"]["template"]["spec"]["containers"][0] for o in objs if o["kind"] == "Deployment"
    ]
    for c in containers:
        secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e}
        assert secrets == {S.serving_s3_secret_name}, c["env"]
        assert "--digest" in c["args"] and c["args"][c["args"].index("--digest") + 1].startswith("sha256:")
    from nmm.compile import pods

    assert {e["name"] for e in pods.env(S) if "valueFrom" in e} >= {"NMM_S3_SECRET_KEY"}  # steps keep their own key


def test_a_pool_that_cannot_hold_the_gpus_is_refused():
    spec = SPEC.model_copy(update={"resources": SPEC.resources.model_copy(update={"gpus": 8})})
    with pytest.raises(PlacementError):
        inference_service("digits", "team-a", spec, v(1), None, S)
    spec = SPEC.model_copy(update={"resources": SPEC.resources.model_copy(update={"gpu_pool": "tpu"})})
    with pytest.raises(PlacementError, match="not a declared pool"):
        inference_service("digits", "team-a", spec, v(1), None, S)


T0 = 1_800_000_000.0
BASE = {"byStatus": {"200": 10.0}, "latency": [[0.1, 10.0]], "ttft": [[0.1, 10.0]]}


def walk(results):
    """Drive the state machine as the operator does; `results`: each step's verdict (ok?)."""
    t = rollout_state.plan(SPEC, None, 1, T0)
    assert t.status["phase"] == "Healthy" and t.versions == (1, None, 0)
    st, now, seen = t.status, T0, []
    t = rollout_state.plan(SPEC, st, 2, now)
    assert t.need_baseline and t.status["phase"] == "Progressing" and t.versions == (1, 2, 10)
    t = rollout_state.after_baseline(t, BASE, SPEC, now, 600)
    st = t.status
    for ok in results:
        now += 61
        t = rollout_state.plan(SPEC, st, 2, now)
        assert t.analyse
        t = rollout_state.after_analysis(
            t, SPEC, ok, [] if ok else ["error rate 0.5 > maxErrorRate 0.02"], {"requests": 9}, BASE, now
        )
        st = t.status
        seen.append((t.status["phase"], t.versions, [e[1] for e in t.events], t.promote, t.rolled_back))
        if not ok:
            break
    return st, now, seen


def test_every_step_passing_promotes():
    st, _, seen = walk([True, True, True])
    assert [s[1] for s in seen] == [(1, 2, 50), (1, 2, 100), (2, None, 0)]
    assert seen[-1][0] == "Healthy" and seen[-1][2] == ["Promoted"] and seen[-1][3] == 2
    assert [a["weight"] for a in st["analysis"]] == [10, 50, 100] and st["previousStableVersion"] == 1


def test_a_failed_step_degrades_then_rolls_back_and_is_not_retried():
    st, now, seen = walk([True, False])
    phase, versions, events, promote, rolled_back = seen[-1]
    assert phase == "Degraded" and versions == (1, 2, 0) and events == ["AnalysisFailed"] and promote is None
    assert rolled_back[0] == 2 and "step 2 (50%)" in rolled_back[1] and "maxErrorRate" in rolled_back[1]
    t = rollout_state.plan(SPEC, st, 2, now + 1)
    assert (
        t.status["phase"] == "RolledBack" and t.versions == (1, None, 0) and [e[1] for e in t.events] == ["RolledBack"]
    )
    again = rollout_state.plan(SPEC, t.status, 2, now + 2)  # the spec still names version 2: nothing restarts
    assert again.status == t.status and not again.events
    fresh = rollout_state.plan(SPEC, t.status, 3, now + 3)  # a new version is a new canary
    assert fresh.status["phase"] == "Progressing" and fresh.versions == (1, 3, 10)


def test_a_canary_that_never_answers_fails_after_the_ready_timeout():
    t = rollout_state.plan(SPEC, rollout_state.plan(SPEC, None, 1, T0).status, 2, T0)
    waiting = rollout_state.after_baseline(t, "connection refused", SPEC, T0 + 10, 600)
    assert waiting.status["phase"] == "Progressing" and waiting.rolled_back is None
    t = rollout_state.plan(SPEC, waiting.status, 2, T0 + 700)
    failed = rollout_state.after_baseline(t, "connection refused", SPEC, T0 + 700, 600)
    assert failed.status["phase"] == "Degraded" and "not ready after 700 s" in failed.rolled_back[1]


def test_the_pause_is_respected_and_going_back_to_stable_aborts_the_canary():
    t = rollout_state.plan(SPEC, rollout_state.plan(SPEC, None, 1, T0).status, 2, T0)
    st = rollout_state.after_baseline(t, BASE, SPEC, T0, 600).status
    assert not rollout_state.plan(SPEC, st, 2, T0 + 30).analyse
    aborted = rollout_state.plan(SPEC, st, 1, T0 + 31)
    assert aborted.status["phase"] == "Healthy" and aborted.versions == (1, None, 0)
    by_hand = rollout_state.plan(SPEC, st, 2, T0 + 32, promote_now=2)
    assert by_hand.versions == (2, None, 0) and by_hand.events[0][1] == "PromotedByHand"


BACKENDS_FILE = ROOT / "charts" / "nmm-platform" / "files" / "serving-backends.yaml"


def test_every_backend_is_registered_in_the_chart_and_its_objects_validate():
    """A backend is one module and one registry entry: the chart's RBAC file is generated from the
    registry (`make golden`), the values schema offers exactly the registered names, and each
    backend's children for a canary validate against the upstream schemas."""
    from nmm.compile.backends import BACKENDS, rbac_by_backend

    generated = yaml.safe_load(BACKENDS_FILE.read_text())
    if os.environ.get("NMM_UPDATE_GOLDEN"):
        head = "".join(line + "\n" for line in BACKENDS_FILE.read_text().splitlines() if line.startswith("#"))
        BACKENDS_FILE.write_text(head + yaml.safe_dump({"rbac": rbac_by_backend()}, sort_keys=False, width=100))
        generated = yaml.safe_load(BACKENDS_FILE.read_text())
    assert generated == {"rbac": rbac_by_backend()}, "the chart's serving-backends.yaml drifted; run `make golden`"
    schema = json.loads((ROOT / "charts" / "nmm-platform" / "values.schema.json").read_text())
    assert set(schema["properties"]["serving"]["properties"]["backend"]["enum"]) == set(BACKENDS)
    for name, backend in BACKENDS.items():
        objs = backend.children("digits", "team-a", SPEC, v(3), v(4), 10, S, {"gateway": {"name": "web"}})
        kinds = {o["kind"] for o in objs}
        assert set(backend.custom_kinds) <= kinds, name
        for obj in objs:
            if obj["kind"] in backend.custom_kinds:
                schema_of = {"InferenceService": INFERENCE_SERVICE, "HTTPRoute": HTTP_ROUTE}[obj["kind"]]
                version = backend.custom_kinds[obj["kind"]][1]
                assert crd_errors(schema_of, version, obj) == [], (name, obj["kind"])
            else:
                kubernetes_validate.validate(obj, "1.33", strict=True)
        assert set(backend.endpoints("digits", "team-a")) == {"stable", "candidate"}


@pytest.mark.parametrize("weight", [0, 10, 50, 100])
def test_every_backend_and_the_local_router_split_traffic_alike(weight):
    """One traffic-split contract: for a canary at `weight`, each backend's objects ask for the
    same percentages per track as the local router's, which sends exactly that share."""
    from nmm.compile.backends import BACKENDS
    from nmm.rollout.router import TRACKS, Router

    router = Router("http://stable", "http://candidate", port=0)
    router.set_weight(weight)
    want = {"stable": 100 - weight, "candidate": weight}
    assert router.split() == want and set(TRACKS) == set(want)
    picks = [router.pick() for _ in range(100)]
    assert {t: picks.count(t) for t in TRACKS} == want
    for name, backend in BACKENDS.items():
        objs = backend.children("digits", "team-a", SPEC, v(3), v(4) if weight else None, weight, S, {})
        assert backend.split(objs) == want, name
        assert set(backend.endpoints("digits", "team-a")) == set(TRACKS), name
