"""The Helm chart, rendered and linted with real Helm (helm-python-sdk), every object validated."""

import json
import os
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

CHART = ROOT / "charts" / "nmm-platform"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
RBAC_GOLDEN = ROOT / "tests" / "golden" / "operator-rbac.json"
# `helm lint` before `helm dependency build`: the optional dependencies are declared, not vendored.
KNOWN_LINT = "chart directory is missing these dependencies: minio,argo-workflows,training-operator"


def values(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def render(vals: dict) -> list[dict]:
    with helm_python.Chart.load(str(CHART)) as chart:
        out = chart.render(vals, name="nmm", namespace="nmm", is_install=True)
    docs = []
    for name, text in sorted(out.items()):
        if name.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
            out.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
    return out


@pytest.fixture(scope="module", params=SCENARIOS, ids=lambda p: p.name)
def rendered(request):
    return render(values(request.param))


def test_there_are_ci_scenarios():
    assert {p.name for p in SCENARIOS} >= {
        "minimal-values.yaml",
        "minio-values.yaml",
        "external-mlflow-values.yaml",
        "serving-values.yaml",
        "kueue-values.yaml",
    }


def test_every_rendered_object_validates_against_kubernetes_1_33(rendered):
    from tests.schemas import (
        CLUSTER_SERVING_RUNTIME,
        KUEUE_CLUSTER_QUEUE,
        KUEUE_LOCAL_QUEUE,
        KUEUE_PRIORITY_CLASS,
        KUEUE_RESOURCE_FLAVOR,
        SERVICE_MONITOR,
        crd_errors,
    )

    custom = {
        "ServiceMonitor": (SERVICE_MONITOR, "v1"),
        "ClusterServingRuntime": (CLUSTER_SERVING_RUNTIME, "v1alpha1"),
        "ClusterQueue": (KUEUE_CLUSTER_QUEUE, "v1beta2"),
        "LocalQueue": (KUEUE_LOCAL_QUEUE, "v1beta2"),
        "ResourceFlavor": (KUEUE_RESOURCE_FLAVOR, "v1beta2"),
        "WorkloadPriorityClass": (KUEUE_PRIORITY_CLASS, "v1beta2"),
    }
    kinds = set()
    for doc in rendered:
        if doc["kind"] in custom:  # custom resources: their upstream CRD schemas
            assert crd_errors(*custom[doc["kind"]], doc) == [], doc["metadata"]["name"]
        else:
            kubernetes_validate.validate(doc, "1.33", strict=True)
        kinds.add(doc["kind"])
    assert {"Deployment", "ServiceAccount", "ClusterRole", "Role", "ConfigMap", "Job"} <= kinds


def test_crds_ship_with_the_chart_and_validate():
    with helm_python.Chart.load(str(CHART)) as chart:
        crds = chart.crds
    assert sorted(c["name"] for c in crds) == ["crds/nmmpipelines.nmm.dev.yaml", "crds/nmmservices.nmm.dev.yaml"]
    for c in crds:
        doc = yaml.safe_load(c["data"] if isinstance(c["data"], str) else c["data"].decode())
        kubernetes_validate.validate(doc, "1.33", strict=True)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.name)
def test_lint_is_clean_but_for_the_undownloaded_optional_dependencies(scenario):
    result = helm_python.lint(str(CHART), values(scenario), strict=True, kube_version="v1.33.0")
    problems = [m["error"] for m in result["messages"] if m["error"] != KNOWN_LINT]
    assert problems == []


def test_every_pod_meets_restricted_and_read_only_root_s1(rendered):
    specs = pod_specs(rendered)
    assert specs
    for name, pod in specs:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        assert all("hostPath" not in v for v in pod.get("volumes", [])), name
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert not sc.get("privileged"), name
            assert ":" in c["image"] and not c["image"].endswith(":latest"), name


def test_service_account_tokens_only_where_the_api_is_needed_s2(rendered):
    for name, pod in pod_specs(rendered):
        wants_api = name.endswith(("-operator", "-inventory"))
        assert pod["automountServiceAccountToken"] is wants_api, name


def test_operator_rbac_is_a_wildcard_free_allow_list_matching_golden_s3(rendered):
    for doc in rendered:
        if doc["kind"] in ("Role", "ClusterRole"):
            for rule in doc["rules"]:
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule.get(field, []), (doc["metadata"]["name"], rule)
    (role,) = [d for d in rendered if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-operator")]
    rules = [json.loads(r) for r in sorted(json.dumps(r, sort_keys=True) for r in role["rules"])]
    (cm,) = [d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-operator")]
    backend = json.loads(cm["data"]["settings.json"])["serving"]["backend"]  # the rules follow serving.backend
    golden = json.loads(RBAC_GOLDEN.read_text()) if RBAC_GOLDEN.exists() else {}
    if os.environ.get("NMM_UPDATE_GOLDEN"):
        golden[backend] = rules
        RBAC_GOLDEN.write_text(json.dumps(golden, indent=2, sort_keys=True) + "\n")
    assert rules == golden[backend]


def test_operator_is_one_replica_with_recreate_r6(rendered):
    (dep,) = [d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"


def test_credentials_come_only_from_existing_secrets(rendered):
    text = yaml.safe_dump_all(rendered)
    assert "kind: Secret\n" not in text
    for _, pod in pod_specs(rendered):
        for c in pod["containers"]:
            for e in c.get("env", []):
                if any(w in e["name"] for w in ("SECRET", "ACCESS_KEY", "BACKEND_STORE_URI")):
                    assert "valueFrom" in e and "value" not in e, e


def test_image_digest_pins_the_image():
    docs = render(values(CHART / "ci" / "minio-values.yaml"))
    images = {c["image"] for _, p in pod_specs(docs) for c in p["containers"] if "nmm" in c["image"]}
    assert images == {"ghcr.io/nmm-dev/nmm@sha256:" + "0" * 64}


def test_operator_settings_carry_the_gpu_pools():
    docs = render(values(CHART / "ci" / "minimal-values.yaml"))
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-operator")]
    settings = json.loads(cm["data"]["settings.json"])
    assert settings["gpuPools"]["h100"] == {"product": "NVIDIA-H100-80GB-HBM3", "memoryGiB": 80, "gpusPerNode": 8}
    assert settings["resolved"]["s3SecretName"] == "nmm-s3" and "secretKey" not in json.dumps(settings)
    assert (
        _operator_settings(docs).compile.serving_s3_secret_name == "nmm-s3-serving-readonly"
    )  # the servers' read-only key


def test_the_servers_read_only_key_has_its_policy_and_no_write_action():
    docs = render(values(CHART / "ci" / "minimal-values.yaml"))
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-serving-s3-policy")]
    policy = json.loads(cm["data"]["policy.json"])
    actions = {a for st in policy["Statement"] for a in st["Action"]}
    assert actions == {"s3:GetObject", "s3:ListBucket"}
    assert all(r.startswith("arn:aws:s3:::nmm") for st in policy["Statement"] for r in st["Resource"])


RO = {"serving": {"s3": {"existingSecret": "ro"}}}


@pytest.mark.parametrize(
    "missing,message",
    [
        (
            {
                "s3": {"endpoint": "http://minio:9000"},
                "mlflow": {"existingSecret": "db", "auth": {"existingSecret": "a"}},
            }
            | RO,
            "s3.existingSecret is required",
        ),
        (
            {
                "s3": {"endpoint": "http://minio:9000", "existingSecret": "s3"},
                "mlflow": {"auth": {"existingSecret": "a"}},
            }
            | RO,
            "mlflow.existingSecret is required",
        ),
        (
            {"s3": {"existingSecret": "s3"}, "mlflow": {"existingSecret": "db", "auth": {"existingSecret": "a"}}} | RO,
            "s3.endpoint is required",
        ),
        (
            {"s3": {"endpoint": "http://minio:9000", "existingSecret": "s3"}, "mlflow": {"existingSecret": "db"}} | RO,
            "mlflow.auth.existingSecret is required",
        ),
        (
            {"s3": {"endpoint": "http://m:9000", "existingSecret": "s3"}, "mlflow": {"enabled": False}} | RO,
            "mlflow.externalUri is required",
        ),
        (
            {
                "s3": {"endpoint": "http://m:9000", "existingSecret": "s3"},
                "mlflow": {"existingSecret": "db", "auth": {"existingSecret": "a"}},
            },
            "serving.s3.existingSecret is required",
        ),
    ],
)
def test_rendering_without_a_secret_fails_with_a_clear_message_s9(missing, message):
    with pytest.raises(helm_python.HelmRenderError, match=message.replace(".", r"\.")):
        render(missing)


@pytest.mark.parametrize(
    "bad,where",
    [
        ({"operator": {"bogus": True}}, "/operator"),
        ({"mlflow": {"port": "5000"}}, "/mlflow/port"),
        ({"image": {"tag": "latest"}}, "/image/tag"),
        ({"gpuPools": {"h100": {"product": "x", "memoryGiB": "80", "gpusPerNode": 8}}}, "memoryGiB"),
        ({"unknownTopLevel": 1}, "unknownTopLevel"),
        ({"argo-workflows": {"enabled": True, "server": {"authModes": ["server"]}}}, "authModes"),  # S5
    ],
)
def test_values_schema_rejects_unknown_keys_and_wrong_types_s10(bad, where):
    vals = values(CHART / "ci" / "minimal-values.yaml") | bad
    with pytest.raises(helm_python.HelmValuesError, match=where):
        render(vals)


def _operator_settings(docs: list[dict]):
    from nmm_operator import settings

    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("operator")]
    return settings.from_dict(json.loads(cm["data"]["settings.json"]))


def test_the_operator_s_settings_keep_the_values_keys():
    """No renaming between values.yaml, its schema and the ConfigMap: every setting outside
    `resolved` (what the helpers compute) sits under the key it has in the values, with its value,
    and the schema declares that key."""
    base = values(CHART / "ci" / "minimal-values.yaml")
    docs = render(base)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-operator")]
    settings = json.loads(cm["data"]["settings.json"])
    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    _deep_update(merged, base)
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node, path):
        for key, value in node.items():
            if isinstance(value, dict) and path[:1] != ("gpuPools",) and not (path and path[-1] == "gateway"):
                walk(value, (*path, key))
                continue
            there, declared = merged, schema
            for part in (*path, key):
                assert part in there, f"{'.'.join((*path, key))} is not a values key"
                there = there[part]
                declared = declared.get("properties", {}).get(part) or declared.get("additionalProperties") or {}
            expected = {k: v for k, v in there.items() if v} if isinstance(there, dict) else there
            assert value == expected, (path, key)
            assert declared, f"{'.'.join((*path, key))} is not in values.schema.json"

    walk({k: v for k, v in settings.items() if k != "resolved"}, ())
    from nmm_operator.settings import Resolved

    assert set(settings["resolved"]) == {f.alias for f in Resolved.model_fields.values()}


def _deep_update(base: dict, over: dict) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def test_operator_values_take_effect_in_the_operator_s_settings():
    # On main operator.recheckSeconds reached a field nothing read and logLevel an env var nothing read.
    base = values(CHART / "ci" / "minimal-values.yaml")
    default = _operator_settings(render(base))
    changed = json.loads(json.dumps(base))
    changed.setdefault("operator", {}).update(recheckSeconds=17, logLevel="DEBUG", onChildDeleted="recreate")
    s = _operator_settings(render(changed))
    assert (s.operator.recheck_seconds, s.operator.log_level, s.operator.on_child_deleted) == (
        17.0,
        "DEBUG",
        "recreate",
    )
    assert (default.operator.recheck_seconds, default.operator.log_level) == (60.0, "INFO")
    # ... and the handlers use them: the timer's interval is the settings' (read once at import).
    import ast

    handlers = (ROOT / "operators" / "nmm_operator" / "handlers.py").read_text()
    timer = next(
        d for d in ast.walk(ast.parse(handlers)) if isinstance(d, ast.Call) and ast.unparse(d.func) == "kopf.timer"
    )
    assert {k.arg: ast.unparse(k.value) for k in timer.keywords}["interval"] == "SETTINGS.operator.recheck_seconds"
    assert "NMM_RECHECK_SECONDS" not in handlers and "NMM_LOG_LEVEL" not in "".join(
        p.read_text() for p in (CHART / "templates").rglob("*.yaml")
    )


def test_the_version_is_written_once():
    from nmm import __version__
    from nmm.compile import CompileSettings

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__  # the chart's default image tag
    assert CompileSettings().image.endswith(f":{__version__}")
    assert f'version = "{__version__}"' in (ROOT / "pyproject.toml").read_text()


def test_the_chart_s_security_contexts_are_generated_from_the_compiler_s():
    # Written once (nmm.compile.pods); the chart's helpers are generated from it and kept in sync.
    from nmm.compile import CompileSettings, pods

    helpers = CHART / "templates" / "_security.tpl"
    text = pods.chart_helpers(CompileSettings())
    if os.environ.get("NMM_UPDATE_GOLDEN"):
        helpers.write_text(text)
    assert helpers.read_text() == text, "the chart's security contexts drifted from nmm.compile.pods; run `make golden`"
    operator = next(
        d
        for d in render(values(CHART / "ci" / "minimal-values.yaml"))
        if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("operator")
    )
    pod = operator["spec"]["template"]["spec"]
    assert pod["securityContext"] == pods.pod_security_context(CompileSettings())
    assert pod["containers"][0]["securityContext"] == pods.container_security_context()


def test_serving_values_render_the_runtime_monitor_dashboard_and_exactly_the_backend_s_rbac():
    docs = render(values(CHART / "ci" / "serving-values.yaml"))
    kinds = [d["kind"] for d in docs]
    assert kinds.count("ServiceMonitor") == 2 and "ClusterServingRuntime" in kinds
    (dash,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    board = json.loads(dash["data"]["nmm-serving.json"])
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p["targets"])
    from nmm.serve.server import Metrics

    served = {m.name for m in Metrics().registry.collect()}  # every series the dashboard reads exists
    for name in (
        "nmm_requests",
        "nmm_request_seconds",
        "nmm_time_to_first_token_seconds",
        "nmm_queue_depth",
        "nmm_batch_size",
    ):
        assert name in served and name in exprs
    assert "nmm_canary_quality" in exprs and "nmm_canary_weight" in exprs
    (role,) = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-operator")]
    groups = {g for r in role["rules"] for g in r["apiGroups"]}
    assert "gateway.networking.k8s.io" in groups and "apps" in groups and "serving.kserve.io" not in groups
    settings = _operator_settings(docs)
    assert settings.serving.backend == "gateway" and settings.serving.gateway == {
        "name": "shared-gateway",
        "namespace": "gateways",
    }
    assert settings.serving.tick_seconds == 5.0
    (op,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")]
    env = {e["name"] for e in op["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"MLFLOW_TRACKING_URI", "NMM_S3_ENDPOINT", "NMM_S3_ACCESS_KEY", "NMM_OPERATOR_SETTINGS"} <= env
    (wf_role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "nmm-workflow"]
    assert {"apiGroups": ["nmm.dev"], "resources": ["nmmservices"], "verbs": ["create", "patch"]} in wf_role["rules"]


def test_kueue_values_render_flavors_per_pool_quota_queues_and_the_default_queue():
    docs = render(values(CHART / "ci" / "kueue-values.yaml"))
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    flavors = {f["metadata"]["name"]: f["spec"] for f in by_kind["ResourceFlavor"]}
    assert flavors == {
        "nmm-gpu-cpu": {},
        "nmm-gpu-h100": {
            "nodeLabels": {"nmm.dev/gpu.pool": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}],
        },
        "nmm-gpu-l4": {
            "nodeLabels": {"nmm.dev/gpu.pool": "l4"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}],
        },
    }
    (cq,) = by_kind["ClusterQueue"]
    assert cq["spec"]["cohortName"] == "ml"
    quota = {
        f["name"]: {r["name"]: r["nominalQuota"] for r in f["resources"]}
        for f in cq["spec"]["resourceGroups"][0]["flavors"]
    }
    assert quota["nmm-gpu-h100"]["nvidia.com/gpu"] == 16 and quota["nmm-gpu-l4"]["nvidia.com/gpu"] == 8
    assert quota["nmm-gpu-cpu"] == {"cpu": "128", "memory": "512Gi", "nvidia.com/gpu": 0}
    assert sorted((q["metadata"]["namespace"], q["spec"]["clusterQueue"]) for q in by_kind["LocalQueue"]) == [
        ("nmm", "nmm-gpu"),
        ("research", "nmm-gpu"),
    ]
    assert [(p["metadata"]["name"], p["value"]) for p in by_kind["WorkloadPriorityClass"]] == [("nmm-high", 1000)]
    assert _operator_settings(docs).compile.default_queue == "nmm"
    assert _operator_settings(render(values(CHART / "ci" / "minimal-values.yaml"))).compile.default_queue is None


def test_kueue_quota_for_an_undeclared_pool_fails_with_its_name():
    vals = values(CHART / "ci" / "kueue-values.yaml")
    vals["kueue"]["gpuQuota"] = {"b200": 8}
    with pytest.raises(Exception, match="kueue.gpuQuota.b200: no such GPU pool"):
        render(vals)


def test_mlflow_asks_every_client_to_sign_in_and_no_secret_is_on_a_command_line():
    """MLflow's basic-auth app is on by default; the admin comes from an existing Secret, the
    platform's clients (operator, Workflow steps) sign in with it by secretKeyRef, and the
    database URIs reach the server by env and by a file its init container writes into /tmp:
    nothing secret in args (visible in /proc/<pid>/cmdline) or in a ConfigMap."""
    docs = render(values(CHART / "ci" / "minimal-values.yaml"))
    (ml,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-mlflow")]
    pod = ml["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert "--app-name=basic-auth" in server["args"]
    assert not any("$(" in a or "URI" in a for a in server["args"])
    env = {e["name"]: e for e in server["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {
        "name": "nmm-mlflow-db",
        "key": "backendStoreUri",
    }
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "nmm-mlflow-admin",
        "key": "password",
    }
    (init,) = pod["initContainers"]
    assert 'os.environ["AUTH_DATABASE_URI"]' in init["args"][0]
    (op,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")]
    op_env = {e["name"]: e for e in op["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert op_env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "nmm-mlflow-admin"
    settings = _operator_settings(docs)
    assert settings.compile.mlflow_secret_name == "nmm-mlflow-admin"
    for d in docs:  # no value of a secret anywhere: only references
        assert "password" not in json.dumps(d.get("data", {})).lower()

    from nmm.compile import compile_pipeline
    from nmm.spec import parse_pipeline

    wf = compile_pipeline(parse_pipeline((ROOT / "workflows" / "quickstart.yaml").read_text()), settings.compile)
    steps = [c for t in wf["spec"]["templates"] if (c := t.get("container"))]
    assert steps and all(
        {
            "name": "MLFLOW_TRACKING_USERNAME",
            "valueFrom": {"secretKeyRef": {"key": "username", "name": "nmm-mlflow-admin"}},
        }
        in c["env"]
        for c in steps
    )
    train = next(t for t in wf["spec"]["templates"] if "resource" in t)["resource"]["manifest"]
    assert "MLFLOW_TRACKING_PASSWORD" in train  # the PyTorchJob's pods sign in too


def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        if (e["operator"] == "Exists") != (e["key"] in labels):
            return False
    return True


def _peer_matches(peer: dict, pod: dict, policy_ns: str) -> bool:
    if "ipBlock" in peer:
        return pod.get("ip", False)  # an address outside the cluster's pods
    if "namespaceSelector" in peer:
        if not _selects(
            peer["namespaceSelector"], {"kubernetes.io/metadata.name": pod["ns"]} | pod.get("ns_labels", {})
        ):
            return False
    elif pod["ns"] != policy_ns:
        return False
    return _selects(peer.get("podSelector", {}), pod["labels"])


def _allowed(policies: list[dict], src: dict, dst: dict, port: int, protocol: str = "TCP") -> bool:
    """NetworkPolicy semantics: a pod selected by a policy of a direction only gets the traffic
    some rule of such a policy allows; unselected pods are open in that direction."""

    def side(pod: dict, direction: str, peer_key: str, other: dict) -> bool:
        chosen = [
            p
            for p in policies
            if p["metadata"]["namespace"] == pod["ns"]
            and direction in p["spec"]["policyTypes"]
            and _selects(p["spec"]["podSelector"], pod["labels"])
        ]
        if not chosen or pod.get("ip"):
            return True
        for p in chosen:
            for rule in p["spec"].get(direction.lower(), []):
                peers = rule.get(peer_key)
                ports = rule.get("ports")
                if (peers is None or any(_peer_matches(x, other, p["metadata"]["namespace"]) for x in peers)) and (
                    ports is None or any(x["port"] == port and x.get("protocol", "TCP") == protocol for x in ports)
                ):
                    return True
        return False

    return side(src, "Egress", "to", dst) and side(dst, "Ingress", "from", src)


def test_network_policies_deny_by_default_and_allow_exactly_nmm_s_flows():
    docs = render(values(CHART / "ci" / "minimal-values.yaml"))
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    release = {"app.kubernetes.io/instance": "nmm", "app.kubernetes.io/name": "nmm-platform"}
    pod = lambda component, ns="nmm": {"ns": ns, "labels": release | {"app.kubernetes.io/component": component}}
    mlflow, operator, inventory, test = pod("mlflow"), pod("operator"), pod("inventory"), pod("test")
    tenant = {"nmm.dev/tenant": "enabled"}  # a namespace that opted in to nmm
    step = {"ns": "team-a", "ns_labels": tenant, "labels": {"nmm.dev/pipeline": "qs"}}
    local_step = {"ns": "nmm", "labels": {"nmm.dev/pipeline": "qs"}}
    server = {"ns": "team-a", "ns_labels": tenant, "labels": {"app.kubernetes.io/name": "nmm-serve"}}
    stranger = {"ns": "team-a", "ns_labels": tenant, "labels": {"app": "notebook"}}
    elsewhere = {"ns": "team-b", "labels": {"nmm.dev/pipeline": "qs"}}  # a namespace that did not opt in
    outside = {"ns": "", "labels": {}, "ip": True}
    dns = {"ns": "kube-system", "labels": {"k8s-app": "kube-dns"}}
    for who in (operator, step, local_step, test):
        assert _allowed(policies, who, mlflow, 5000), who
    assert not _allowed(policies, stranger, mlflow, 5000)  # any other pod: refused
    assert not _allowed(policies, server, mlflow, 5000)  # model servers need no MLflow: none reaches it
    assert not _allowed(policies, elsewhere, mlflow, 5000)  # the pipeline label outside an opted-in namespace
    assert not _allowed(policies, inventory, mlflow, 5000)
    assert not _allowed(policies, operator, mlflow, 22)
    for who in (operator, inventory, local_step):
        assert _allowed(policies, who, outside, 6443) and _allowed(policies, who, dns, 53, "UDP")
    assert _allowed(policies, mlflow, outside, 9000) and _allowed(policies, mlflow, outside, 5432)  # bucket, database
    assert not _allowed(policies, mlflow, outside, 6443)  # MLflow never talks to the API server
    assert not _allowed(policies, inventory, outside, 9000)
    assert _allowed(policies, operator, server, 8080)  # canary scrapes and probes
    assert _allowed(policies, local_step, local_step, 29500)  # DDP between a job's pods
    assert not _allowed(policies, stranger, local_step, 29500)
    assert not _allowed(policies, stranger, operator, 8080) and _allowed(policies, stranger, operator, 9090)
    selected = {tuple(sorted(p["spec"]["podSelector"].get("matchLabels", {}).items())) for p in policies}
    assert (("app.kubernetes.io/instance", "nmm"),) in selected  # the default deny covers every pod of the release


def _cel(expression: str, variables=None, **activation):
    """An expression's value; `variables` are CEL values already (json_to_cel would read their
    booleans as ints: a BoolType is an int)."""
    import celpy

    env = celpy.Environment()
    values = {k: celpy.json_to_cel(v) for k, v in activation.items()}
    if variables is not None:
        values["variables"] = celpy.celtypes.MapType({celpy.celtypes.StringType(k): v for k, v in variables.items()})
    return bool(env.program(env.compile(expression)).evaluate(values))


def _admits(policy: dict, **activation) -> tuple[bool, list[str]]:
    """(matches, messages of the failed validations) of a ValidatingAdmissionPolicy, its CEL
    evaluated by cel-python the way the API server evaluates it."""
    spec = policy["spec"]
    if not all(_cel(c["expression"], **activation) for c in spec.get("matchConditions", [])):
        return False, []
    variables = {}
    for v in spec.get("variables", []):
        import celpy

        env = celpy.Environment()
        variables[v["name"]] = env.program(env.compile(v["expression"])).evaluate(
            {k: celpy.json_to_cel(x) for k, x in activation.items()}
            | {"variables": celpy.celtypes.MapType({celpy.celtypes.StringType(k): x for k, x in variables.items()})}
        )
    failed = [x["message"] for x in spec["validations"] if not _cel(x["expression"], variables=variables, **activation)]
    return True, failed


def test_admission_policies_hold_every_workload_nmm_creates_and_the_inventory_to_its_node():
    docs = render(values(CHART / "ci" / "minimal-values.yaml"))
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"}
    bindings = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert {b["spec"]["policyName"] for b in bindings} == set(policies) and all(
        b["spec"]["validationActions"] == ["Deny"] for b in bindings
    )
    workloads = policies["nmm-nmm-platform-workloads"]

    from nmm.compile import compile_pipeline, serving
    from nmm.compile.backends import gateway, kserve
    from nmm.spec import parse_pipeline
    from nmm.spec.serving import ServiceSpec

    settings = _operator_settings(docs).compile
    step = {"userInfo": {"username": "system:serviceaccount:team-a:nmm-workflow", "extra": {}}}
    operator = {"userInfo": {"username": "system:serviceaccount:nmm:nmm-nmm-platform-operator", "extra": {}}}
    wf = compile_pipeline(parse_pipeline((ROOT / "workflows" / "quickstart.yaml").read_text()), settings)
    job = yaml.safe_load(next(t for t in wf["spec"]["templates"] if "resource" in t)["resource"]["manifest"])
    ray_doc = yaml.safe_load((ROOT / "workflows" / "quickstart.yaml").read_text())
    ray_doc["spec"]["data"]["ray"] = {"workers": 2}
    ray_wf = compile_pipeline(parse_pipeline(yaml.safe_dump(ray_doc)), settings)
    rayjob = next(
        yaml.safe_load(t["resource"]["manifest"])
        for t in ray_wf["spec"]["templates"]
        if "resource" in t and "RayJob" in t["resource"]["manifest"]
    )
    svc = ServiceSpec.model_validate({"model": {"name": "m", "version": 1}})
    served = serving.ServedVersion(1, "s3://nmm/runs/a/b/c/d/train", "sha256:" + "0" * 64)
    deployment = gateway.deployment("digits", "team-a", "stable", svc, served, settings, served)
    isvc = kserve.inference_service("digits", "team-a", svc, served, None, settings)
    made = [
        (step, "pytorchjobs", job),
        (step, "rayjobs", rayjob),
        (operator, "deployments", deployment),
        (operator, "inferenceservices", isvc),
    ]
    for who, resource, obj in made:  # what nmm compiles passes
        assert _admits(workloads, request=who | {"resource": {"resource": resource}}, object=obj) == (True, []), (
            resource
        )

    def tampered(obj: dict, pods) -> dict:
        evil = yaml.safe_load(yaml.safe_dump(obj))
        for pod in pods(evil):
            c = pod["containers"][0]
            c["image"] = "docker.io/evil/miner:1"
            c["securityContext"] = {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}}
            pod["serviceAccountName"] = "cluster-admin-sa"
            pod.setdefault("volumes", []).append({"name": "root", "hostPath": {"path": "/"}})
        return evil

    evils = [
        tampered(job, lambda o: [r["template"]["spec"] for r in o["spec"]["pytorchReplicaSpecs"].values()]),
        tampered(rayjob, lambda o: [o["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]]),
        tampered(deployment, lambda o: [o["spec"]["template"]["spec"]]),
        tampered(isvc, lambda o: [o["spec"]["predictor"]]),
    ]
    for (who, resource, _), evil in zip(made, evils):
        matched, failed = _admits(workloads, request=who | {"resource": {"resource": resource}}, object=evil)
        assert matched and len(failed) == 4, (resource, failed)  # image, account, host access, privilege
    someone = {"userInfo": {"username": "alice@example.com", "extra": {}}, "resource": {"resource": "pytorchjobs"}}
    assert _admits(workloads, request=someone, object=evils[0])[0] is False  # people are RBAC's business

    pipeline_pods = policies["nmm-nmm-platform-pipeline-pods"]
    labelled = {"metadata": {"labels": {"nmm.dev/pipeline": "qs"}}, "spec": {"serviceAccountName": "default"}}
    assert _admits(pipeline_pods, object=labelled)[1] == [
        "a pod labelled nmm.dev/pipeline runs as the nmm-workflow service account"
    ]
    for t in wf["spec"]["templates"]:  # every pod nmm compiles with the label runs as the workflow account
        if "container" in t:
            assert (
                _admits(
                    pipeline_pods,
                    object={
                        "metadata": t.get("metadata", {}),
                        "spec": {"serviceAccountName": wf["spec"]["serviceAccountName"]},
                    },
                )[1]
                == []
            )
    for spec in [r["template"]["spec"] for r in job["spec"]["pytorchReplicaSpecs"].values()]:
        assert (
            _admits(pipeline_pods, object={"metadata": {"labels": {"nmm.dev/pipeline": "qs"}}, "spec": spec})[1] == []
        )

    no_promote = policies["nmm-nmm-platform-no-promote-from-steps"]
    nmms = lambda ann: {"metadata": {"name": "qs", "annotations": ann}, "spec": {}}
    assert _admits(no_promote, request=step, object=nmms({"nmm.dev/promote": "7"}), oldObject=None)[1] != []
    assert _admits(no_promote, request=step, object=nmms({"nmm.dev/promote": "7"}), oldObject=nmms({}))[1] != []
    assert _admits(no_promote, request=step, object=nmms({}), oldObject=nmms({}))[1] == []  # the rollout stage's update
    assert (
        _admits(
            no_promote, request=step, object=nmms({"nmm.dev/promote": "7"}), oldObject=nmms({"nmm.dev/promote": "7"})
        )[1]
        == []
    )  # someone's pending promote, left as it was
    assert _admits(no_promote, request=someone, object=nmms({"nmm.dev/promote": "7"}), oldObject=nmms({}))[0] is False

    where = policies["nmm-nmm-platform-operator-namespaces"]
    ns = lambda name, labels=None: {"metadata": {"name": name} | ({"labels": labels} if labels else {})}
    assert _admits(where, request=operator, namespaceObject=ns("team-a", {"nmm.dev/tenant": "enabled"}))[1] == []
    assert _admits(where, request=operator, namespaceObject=ns("nmm"))[1] == []  # the release's own
    assert _admits(where, request=operator, namespaceObject=ns("kube-system"))[1] == [
        "the operator writes only in namespaces labelled nmm.dev/tenant=enabled (and its own)"
    ]
    assert _admits(where, request=someone, namespaceObject=ns("kube-system"))[0] is False

    inventory = policies["nmm-nmm-platform-inventory-own-node"]
    me = {
        "userInfo": {
            "username": "system:serviceaccount:nmm:nmm-nmm-platform-inventory",
            "extra": {"authentication.kubernetes.io/node-name": ["gpu-1"]},
        }
    }
    node = {"metadata": {"name": "gpu-1", "labels": {"kubernetes.io/hostname": "gpu-1"}}, "spec": {"taints": []}}
    labelled = yaml.safe_load(yaml.safe_dump(node))
    labelled["metadata"]["labels"]["nmm.dev/gpu.pool"] = "h100"
    assert _admits(inventory, request=me, object=labelled, oldObject=node) == (True, [])
    other = yaml.safe_load(yaml.safe_dump(labelled))
    other["metadata"]["name"] = "gpu-2"
    assert _admits(
        inventory, request=me, object=other, oldObject=node | {"metadata": node["metadata"] | {"name": "gpu-2"}}
    )[1] == ["the inventory labels only the node it runs on"]
    hijack = yaml.safe_load(yaml.safe_dump(labelled))
    hijack["metadata"]["labels"]["node-role.kubernetes.io/control-plane"] = ""
    hijack["spec"]["taints"] = [{"key": "x", "effect": "NoSchedule"}]
    assert len(_admits(inventory, request=me, object=hijack, oldObject=node)[1]) == 2
