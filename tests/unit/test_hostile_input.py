"""Hostile pipelines (issue 10, defects 4 and 5): refused fast, with bounded memory, exit 2 and a
field path; names the cluster would reject refused at parse time; user text never expanded."""

from __future__ import annotations

import json
import re
import subprocess
import tracemalloc
from pathlib import Path

import pytest
import yaml

from nmm.compile import CompileSettings, compile_pipeline
from nmm.engine.params import expand_env_refs, substitute_all
from nmm.spec import NamespaceConflict, SpecError, names, parse_pipeline, parse_pipeline_document
from nmm.spec.parse import MAX_SPEC_BYTES, parse_json
from tests.conftest import NMM, WORKFLOWS

BAD = Path(__file__).parent.parent / "bad_specs"
QUICKSTART = (WORKFLOWS / "quickstart.yaml").read_text()


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize(
    "case, problem",
    [
        ("34-alias-bomb.yaml", "aliases (*name) are not allowed"),
        ("35-deep-nesting.yaml", "nested deeper than 32 levels"),
        ("36-huge-number.yaml", "at most 40 allowed"),
    ],
)
def test_hostile_yaml_is_refused_with_bounded_memory(case, problem):
    # main expanded the 789-byte bomb to 1.5 GB, hit RecursionError at depth 5,000 and ValueError on 5,000 digits.
    text = (BAD / case).read_text()

    def parse():
        with pytest.raises(SpecError) as exc:
            parse_pipeline(text, case)
        assert problem in "\n".join(exc.value.problems)

    assert _peak_bytes(parse) < 8 * 2**20


def test_hostile_json_and_api_objects_are_refused_too():
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(SpecError, match="invalid JSON|nested deeper"):
        parse_json(deep, "--spec")
    with pytest.raises(SpecError, match="invalid JSON|more than 40 digits"):
        parse_json('{"spec": ' + "9" * 5000 + "}", "--spec")
    doc: dict = {}
    node = doc
    for _ in range(5000):  # an API object: built by the client, not parsed from text
        node["x"] = {}
        node = node["x"]
    with pytest.raises(SpecError, match="nested deeper than 32 levels"):
        parse_pipeline_document(doc)


def test_the_cli_reads_at_most_the_size_limit(tmp_path):
    # An endless file: main read it whole before checking the size (a hang, then out of memory).
    r = subprocess.run([NMM, "validate", "/dev/zero"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"at most {MAX_SPEC_BYTES} bytes" in r.stderr and "Traceback" not in r.stderr


def _doc(**meta) -> dict:
    doc = yaml.safe_load(QUICKSTART)
    doc["metadata"].update(meta)
    return doc


def test_names_that_start_with_a_digit_or_outgrow_63_characters_are_refused_at_parse_time():
    with pytest.raises(SpecError, match=r"metadata\.name"):
        parse_pipeline_document(_doc(name="9lives"))
    longest = "a" * names.MAX_PIPELINE_NAME
    parse_pipeline_document(_doc(name=longest))  # fits exactly
    with pytest.raises(SpecError, match=r"metadata\.name"):
        parse_pipeline_document(_doc(name=longest + "b"))
    doc = _doc(name="a" * (names.MAX_PIPELINE_NAME - 6))
    doc["spec"]["variants"] = [{"name": "early"}]  # 5 characters + "-" fits; 6 does not
    parse_pipeline_document(doc)
    doc["spec"]["variants"] = [{"name": "earlyb"}]
    with pytest.raises(SpecError, match="the limit is 63"):
        parse_pipeline_document(doc)


def _dns1035(name: str) -> bool:
    return len(name) <= 63 and re.fullmatch(names.DNS1035, name) is not None


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_name_a_valid_spec_derives_is_a_dns1035_label(path):
    spec = parse_pipeline(path.read_text())
    run = names.run_name(spec.metadata.name, names.MAX_GENERATION)
    for variant in spec.variant_names or [None]:
        job = names.train_job_name(run, variant)
        for pod in (f"{job}-master-0", f"{job}-worker-1023"):  # the Training Operator's pod Services
            assert _dns1035(pod), pod
    assert len(names.longest_derived_name(spec.metadata.name, spec.variant_names)) <= 63


def test_reserved_labels_are_refused_and_nmm_s_own_always_win():
    for key in ("nmm.dev/pipeline", "app.kubernetes.io/managed-by", "kubernetes.io/hostname"):
        with pytest.raises(SpecError, match="is reserved"):
            parse_pipeline_document(_doc(labels={key: "x"}))
    spec = parse_pipeline_document(_doc(labels={"team": "vision", "app.kubernetes.io/part-of": "research"}))
    # Even a spec that slipped past validation cannot take over nmm's labels.
    forged = spec.model_copy(
        update={
            "metadata": spec.metadata.model_copy(
                update={
                    "labels": {"nmm.dev/pipeline": "victim", "app.kubernetes.io/managed-by": "me", "team": "vision"}
                }
            )
        }
    )
    labels = compile_pipeline(forged, CompileSettings())["metadata"]["labels"]
    assert labels["nmm.dev/pipeline"] == "quickstart" and labels["app.kubernetes.io/managed-by"] == "nmm"
    assert labels["team"] == "vision"


def test_user_text_in_a_workflow_is_never_expanded_by_argo_or_the_kubelet():
    spec = parse_pipeline(QUICKSTART)
    hostile = "$(NMM_S3_SECRET_KEY) {{workflow.name}} $$(HOME) {{=sprig.env('HOME')}}"
    forged = spec.model_copy(update={"metadata": spec.metadata.model_copy(update={"labels": {"note": hostile}})})
    wf = compile_pipeline(forged, CompileSettings())
    scope = {
        "workflow.name": "qs-abcde",
        "workflow.namespace": "ns",
        "workflow.uid": "u",
        "inputs.parameters.dataset_uri": "d",
        "inputs.parameters.model_uri": "m",
        "inputs.parameters.metrics": "{}",
        "inputs.parameters.gate": "pass",
        "inputs.parameters.variant": "",
        "workflow.status": "Succeeded",
    }
    env = {"NMM_S3_SECRET_KEY": "topsecret", "HOME": "/tmp"}
    for template in wf["spec"]["templates"]:
        args = (template.get("container") or {}).get("args")
        if not args:
            continue
        # What Argo, then the kubelet, do to a container's args (as the local engine does).
        final = [expand_env_refs(a, env) for a in substitute_all(args, scope)]
        decoded = json.loads(final[final.index("--spec") + 1])
        assert decoded["metadata"]["labels"]["note"] == hostile
        assert "topsecret" not in " ".join(final)


def test_one_namespace_precedence_for_every_command():
    spec = parse_pipeline(QUICKSTART)
    assert spec.resolve_namespace(None, "ctx") == "ctx"
    assert spec.resolve_namespace("flag", "ctx") == "flag"
    placed = parse_pipeline_document(_doc(namespace="team-a"))
    assert placed.resolve_namespace(None, "ctx") == "team-a"
    assert placed.resolve_namespace("team-a", "ctx") == "team-a"
    with pytest.raises(NamespaceConflict, match="contradicts metadata.namespace"):
        placed.resolve_namespace("team-b", "ctx")


def test_compile_refuses_a_namespace_flag_that_contradicts_the_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_doc(namespace="team-a")))
    r = subprocess.run([NMM, "compile", str(path), "--namespace", "team-b"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "contradicts metadata.namespace 'team-a'" in r.stderr
    r = subprocess.run([NMM, "compile", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and yaml.safe_load(r.stdout)["metadata"]["namespace"] == "team-a"
