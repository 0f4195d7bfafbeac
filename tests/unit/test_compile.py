"""The compiler: valid against upstream CRD schemas, deterministic, secure, R11-complete."""

import copy
import json
import os
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from nmm.compile import CompileSettings, compile_pipeline, to_yaml
from nmm.spec import parse_pipeline
from tests.conftest import WORKFLOWS
from tests.schemas import ARGO_WORKFLOW, PYTORCHJOB, RAYJOB, crd_errors

GOLDEN = Path(__file__).parent.parent / "golden"
EXAMPLES = sorted(WORKFLOWS.glob("*.yaml"))


def compiled(path: Path, settings: CompileSettings | None = None) -> dict:
    return compile_pipeline(parse_pipeline(path.read_text()), settings or CompileSettings())


def resources_of(wf: dict, kind: str) -> list[dict]:
    found = [yaml.safe_load(t["resource"]["manifest"]) for t in wf["spec"]["templates"] if "resource" in t]
    return [r for r in found if r["kind"] == kind]


def pytorchjobs_of(wf: dict) -> list[dict]:
    return resources_of(wf, "PyTorchJob")


def pytorchjob_of(wf: dict) -> dict:
    (job,) = pytorchjobs_of(wf)
    return job


def leaf_templates(wf: dict) -> list[dict]:
    return [t for t in wf["spec"]["templates"] if "container" in t or "resource" in t]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_workflow_validates_against_argo_v4_crd_schema(path):
    assert crd_errors(ARGO_WORKFLOW, "v1alpha1", compiled(path)) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_pytorchjob_validates_against_training_operator_crd_schema(path):
    for job in pytorchjobs_of(compiled(path)):
        assert crd_errors(PYTORCHJOB, "v1", job) == []


def test_schema_check_is_strict_about_unknown_fields():
    wf = compiled(WORKFLOWS / "quickstart.yaml")
    bad = copy.deepcopy(wf)
    bad["spec"]["templates"][1]["container"]["imagePulPolicy"] = "Always"
    assert any("imagePulPolicy" in e for e in crd_errors(ARGO_WORKFLOW, "v1alpha1", bad))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_two_compiles_are_byte_identical(path):
    assert to_yaml(compiled(path)) == to_yaml(compiled(path))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_matches_golden_file(path):
    golden = GOLDEN / f"{path.stem}.workflow.yaml"
    text = to_yaml(compiled(path))
    if os.environ.get("NMM_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.exists(), f"no golden file; run `make golden` to create {golden}"
    assert text == golden.read_text(), "compiled output changed; if on purpose, run `make golden`"


def test_dag_is_curate_train_evaluate_rollout_with_gate_and_exit_handler():
    wf = compiled(WORKFLOWS / "quickstart.yaml")
    dag = {t["name"]: t for t in wf["spec"]["templates"][0]["dag"]["tasks"]}
    assert list(dag) == ["curate", "train", "evaluate", "rollout"]
    assert dag["train"]["dependencies"] == ["curate"]
    assert dag["evaluate"]["dependencies"] == ["train"]
    assert dag["rollout"]["when"] == "{{tasks.evaluate.outputs.parameters.gate}} == pass"
    assert wf["spec"]["onExit"] == "finalize"
    train = next(t for t in wf["spec"]["templates"] if t["name"] == "train")
    assert train["resource"]["action"] == "create"
    assert train["resource"]["setOwnerReference"] is True
    assert "succeeded" in train["resource"]["successCondition"]
    assert "failed" in train["resource"]["failureCondition"]


def test_variants_fan_out_train_and_evaluate_and_rollout_waits_for_all():
    wf = compiled(WORKFLOWS / "fusion-ablation.yaml")  # (each variant on 3 seeds: runs <variant>s<k>)
    dag = {t["name"]: t for t in wf["spec"]["templates"][0]["dag"]["tasks"]}
    variants = tuple(f"{v}s{k}" for v in ("early", "earlybidir", "mid", "late") for k in range(3))
    assert list(dag) == ["curate", *[f"{s}-{v}" for v in variants for s in ("train", "evaluate")], "rollout"]
    for v in variants:
        assert dag[f"train-{v}"]["dependencies"] == ["curate"]
        assert dag[f"evaluate-{v}"]["dependencies"] == [f"train-{v}"]
        params = {p["name"]: p["value"] for p in dag[f"evaluate-{v}"]["arguments"]["parameters"]}
        assert params["variant"] == v and params["model_uri"].endswith(f"/train-{v}")
    assert dag["rollout"]["dependencies"] == [f"evaluate-{v}" for v in variants]
    assert dag["rollout"]["when"] == "{{tasks.evaluate-earlys0.outputs.parameters.gate}} == pass"
    jobs = {j["metadata"]["name"]: j for j in pytorchjobs_of(wf)}
    assert set(jobs) == {f"{{{{workflow.name}}}}-train-{v}" for v in variants}
    args = jobs["{{workflow.name}}-train-mids1"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert args[-2:] == ["--variant", "mids1"]


def test_a_variant_is_the_spec_with_its_model_overrides():
    spec = parse_pipeline((WORKFLOWS / "fusion-ablation.yaml").read_text())
    mid = spec.for_variant("mids0")
    assert mid.spec.model.fusion == "mid" and mid.spec.variants == []
    assert mid.spec.model.size == spec.spec.model.size and mid.spec.training == spec.spec.training
    assert spec.for_variant(None) is spec
    with pytest.raises(ValueError, match="no variant 'huge'"):
        spec.for_variant("huge")


def test_stages_hand_each_other_uris_not_artifacts():
    wf = compiled(WORKFLOWS / "quickstart.yaml")
    for t in wf["spec"]["templates"]:
        assert "artifacts" not in t.get("inputs", {}) and "artifacts" not in t.get("outputs", {})


@pytest.mark.parametrize(
    "path", [WORKFLOWS / "quickstart.yaml", WORKFLOWS / "byo-webdataset.yaml"], ids=lambda p: p.name
)
def test_every_pod_template_has_retry_and_deadline_r11(path):
    """Container steps retry through Argo. A resource step's job retries itself (PyTorchJob
    `runPolicy.backoffLimit` = training.maxRestarts, RayJob `backoffLimit`) and has no Argo
    retryStrategy: Argo's retry of a `create` meets the failed job's name (argo-workflows#6150)."""
    wf = compiled(path)
    for t in leaf_templates(wf):
        assert int(t["activeDeadlineSeconds"]) > 0, t["name"]
        if "container" in t:
            assert int(t["retryStrategy"]["limit"]) >= 1, t["name"]
            continue
        assert "retryStrategy" not in t, t["name"]
        job = yaml.safe_load(t["resource"]["manifest"])
        limit = job["spec"]["runPolicy"]["backoffLimit"] if job["kind"] == "PyTorchJob" else job["spec"]["backoffLimit"]
        assert limit >= 1, t["name"]
    assert wf["spec"]["podGC"]["strategy"]
    assert wf["spec"]["ttlStrategy"]["secondsAfterSuccess"] > 0
    assert wf["spec"]["serviceAccountName"] == "nmm-workflow"


def _pods(wf: dict) -> list[dict]:
    """Every pod the Workflow would create, as core/v1 Pods."""
    pods = []
    for t in wf["spec"]["templates"]:
        if "container" in t:
            pods.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": t["name"]},
                    "spec": {
                        "securityContext": wf["spec"]["securityContext"],
                        "volumes": wf["spec"]["volumes"],
                        "containers": [t["container"]],
                        "restartPolicy": "Never",
                    },
                }
            )
    job = pytorchjob_of(wf)
    for kind, rs in job["spec"]["pytorchReplicaSpecs"].items():
        pods.append(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": kind.lower()}, "spec": rs["template"]["spec"]}
        )
    return pods


def test_every_pod_is_valid_core_v1_and_meets_restricted_plus_read_only_root_s1():
    wf = compiled(WORKFLOWS / "quickstart.yaml")
    for pod in _pods(wf):
        kubernetes_validate.validate(pod, "1.33", strict=True)
        psc = pod["spec"]["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault"
        for c in pod["spec"]["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert not sc.get("privileged")
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts  # writable scratch despite the read-only root


def test_no_podspecpatch_hostpath_hostnetwork_or_privileged_s6():
    text = to_yaml(compiled(WORKFLOWS / "quickstart.yaml"))
    for banned in ("podSpecPatch", "hostPath", "hostNetwork", "privileged: true", "hostPID", "hostIPC"):
        assert banned not in text


def test_credentials_only_by_secret_reference_s4():
    wf = compiled(WORKFLOWS / "quickstart.yaml")
    for pod in _pods(wf):
        for c in pod["spec"]["containers"]:
            env = {e["name"]: e for e in c["env"]}
            for name in ("NMM_S3_ACCESS_KEY", "NMM_S3_SECRET_KEY"):
                assert "value" not in env[name]
                assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "nmm-s3-credentials"


def test_images_are_pinned_never_latest_s11():
    wf = compiled(WORKFLOWS / "quickstart.yaml")
    for pod in _pods(wf):
        for c in pod["spec"]["containers"]:
            assert ":" in c["image"] and not c["image"].endswith(":latest")


def test_pytorchjob_maps_resources_to_replicas_and_torchrun():
    spec = parse_pipeline((WORKFLOWS / "quickstart.yaml").read_text())
    data = spec.model_dump(mode="json", by_alias=True)
    data["spec"]["training"]["resources"] = {"nodes": 3, "gpusPerNode": 8}
    from nmm.spec import parse_pipeline_document

    job = pytorchjob_of(compile_pipeline(parse_pipeline_document(data), CompileSettings()))
    rs = job["spec"]["pytorchReplicaSpecs"]
    assert rs["Master"]["replicas"] == 1 and rs["Worker"]["replicas"] == 2
    assert job["spec"]["nprocPerNode"] == "8"
    c = rs["Master"]["template"]["spec"]["containers"][0]
    assert c["name"] == "pytorch" and c["command"] == ["torchrun"]
    assert "--nnodes=3" in c["args"] and "--nproc-per-node=8" in c["args"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert crd_errors(PYTORCHJOB, "v1", job) == []


def test_typed_round_trip_rejects_a_wrong_type():
    from nmm.compile import typed_workflow
    from nmm.compile.workflow import build

    wf = build(parse_pipeline((WORKFLOWS / "quickstart.yaml").read_text()), CompileSettings())
    wf["spec"]["templates"][1]["container"]["image"] = 5
    with pytest.raises(Exception, match="image"):
        typed_workflow(wf)


def test_stage_args_carry_the_canonical_spec():
    path = WORKFLOWS / "quickstart.yaml"
    wf = compiled(path)
    curate = next(t for t in wf["spec"]["templates"] if t["name"] == "curate")
    args = curate["container"]["args"]
    spec_json = args[args.index("--spec") + 1]
    assert parse_pipeline(path.read_text()).model_dump(mode="json", by_alias=True) == json.loads(spec_json)


def test_data_ray_compiles_curate_into_a_kuberay_rayjob_whose_outputs_a_second_step_reads():
    import shlex

    path = WORKFLOWS / "byo-webdataset.yaml"
    spec = parse_pipeline(path.read_text())
    assert spec.spec.data.ray is not None, "the byo example is the one that curates on a RayJob"
    wf = compiled(path)
    (job,) = resources_of(wf, "RayJob")
    assert crd_errors(RAYJOB, "v1", job) == []
    templates = {t["name"]: t for t in wf["spec"]["templates"]}
    assert templates["curate"]["resource"]["setOwnerReference"] is True  # owned by the Workflow, like the PyTorchJob
    assert "SUCCEEDED" in templates["curate"]["resource"]["successCondition"]
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == spec.spec.data.ray.workers
    assert workers["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == spec.spec.data.ray.cpu
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["nmm", "stage", "curate"]
    out_uri = argv[argv.index("--outputs-uri") + 1]
    reader = templates["curate-outputs"]["container"]["args"]
    assert reader[:2] == ["stage", "curate-outputs"] and reader[reader.index("--from") + 1] == out_uri
    tasks = {t["name"]: t for t in wf["spec"]["templates"][0]["dag"]["tasks"]}
    assert tasks["curate-outputs"]["dependencies"] == ["curate"] and tasks["train"]["dependencies"] == [
        "curate-outputs"
    ]
    assert "tasks.curate-outputs.outputs.parameters.dataset_uri" in json.dumps(tasks["train"])
    name = job["metadata"]["name"].replace("{{workflow.name}}", "x" * (len(spec.metadata.name) + 8))
    assert len(name) <= 47  # KubeRay's limit on RayJob names
    for group in (job["spec"]["rayClusterSpec"]["headGroupSpec"], workers):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ray"}, "spec": group["template"]["spec"]}
        kubernetes_validate.validate(pod, "1.33", strict=True)
        assert group["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
