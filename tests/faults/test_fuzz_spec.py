"""Hostile input beyond the bad specs: property-based fuzzing of the pipeline parser (hypothesis).

Fault: thousands of generated and mutated documents: random text, random YAML values, and the
quickstart with a random leaf replaced, a key deleted or added, deep structures, huge numbers and
injected `{{…}}` / `$(…)`. Must hold: the parser either accepts the document or raises SpecError
whose every problem is one bounded line naming a field path (or the document's line); nothing
else escapes (no traceback); an accepted document compiles. `nmm validate` exits 2 on a sample."""

from __future__ import annotations

import copy
import re
import subprocess

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nmm.compile import CompileSettings, compile_pipeline
from nmm.gpu.pools import PlacementError
from nmm.spec import SpecError, parse_pipeline, parse_pipeline_document
from tests.conftest import NMM, WORKFLOWS

QUICKSTART = yaml.safe_load((WORKFLOWS / "quickstart.yaml").read_text())
FIELD = re.compile(
    r"^(<document>|[A-Za-z0-9_\[])[^\n]*: \S[^\n]*$"
)  # "<path or location>: <what was expected>", one line
MAX_PROBLEM = 2_000  # a problem never echoes a huge value back
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

HOSTILE = st.sampled_from(
    [
        "{{workflow.name}}",
        "$(POD_IP)",
        "{{=sprig.env('X')}}",
        "$$",
        "../../etc",
        "a;b",
        "#x",
        "\x00",
        "é" * 300,
        "9" * 60,
        "-1",
        "1e309",
        "nan",
        "true",
        "null",
        "~",
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=80),
    HOSTILE,
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=20,
)


def paths(doc, prefix=()):
    """Every (path, value) in the document, containers included."""
    yield prefix, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths(v, prefix + (i,))


PATHS = [p for p, _ in paths(QUICKSTART) if p]


def mutate(doc, path, op, value):
    doc = copy.deepcopy(doc)
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if op == "replace":
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif op == "add" and isinstance(parent, dict):
        parent[f"x{abs(hash(str(value))) % 1000}"] = value
    elif op == "wrap":
        parent[last] = [parent[last], value]
    return doc


def check(problems: list[str]) -> None:
    assert problems, "a SpecError with no problem"
    for p in problems:
        assert isinstance(p, str) and 0 < len(p) <= MAX_PROBLEM, p[:200]
        assert FIELD.match(p), f"no field path or location: {p[:200]!r}"


def accepted_or_refused(parse) -> None:
    """The parse either refuses with well-formed problems or accepts a spec that compiles;
    any other exception fails the test (a traceback a user would see)."""
    try:
        spec = parse()
    except SpecError as exc:
        check(exc.problems)
        return
    accepted_compiles(spec)


def accepted_compiles(spec) -> None:
    try:
        compile_pipeline(spec, CompileSettings())
    except PlacementError as exc:  # a GPU request no pool holds: a clear refusal, exit 2 in the CLI
        assert "spec." in str(exc) or "no GPU pool" in str(exc)


@FUZZ
@given(st.sampled_from(PATHS), st.sampled_from(["replace", "delete", "add", "wrap"]), VALUES)
def test_a_mutated_quickstart_is_accepted_or_refused_with_field_paths(path, op, value):
    accepted_or_refused(lambda: parse_pipeline_document(mutate(QUICKSTART, path, op, value), "fuzz"))


@FUZZ
@given(
    st.one_of(
        st.text(max_size=400),
        VALUES.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
        st.builds(
            lambda path, op, v: yaml.safe_dump(mutate(QUICKSTART, path, op, v), allow_unicode=True),
            st.sampled_from(PATHS),
            st.sampled_from(["replace", "delete", "add", "wrap"]),
            VALUES,
        ),
    )
)
def test_random_text_and_yaml_never_escape_the_parser(text):
    accepted_or_refused(lambda: parse_pipeline(text, "fuzz.yaml"))


@pytest.mark.parametrize(
    "path,op,value,named",
    [
        (
            ("spec", "training", "phases", 0, "steps"),
            "replace",
            10**40,
            "at most 40 allowed",
        ),  # refused while reading, by its line
        (("spec", "data", "sources", 0, "kind"), "replace", "{{workflow.name}}", "spec.data.sources[0]"),
        (
            ("spec", "rollout", "registeredModelName"),
            "replace",
            "$(cat /etc/passwd)",
            "spec.rollout.registeredModelName",
        ),
        (("metadata", "name"), "replace", ["a", {"b": None}], "metadata.name"),
    ],
)
def test_nmm_validate_exits_2_on_mutations_without_a_traceback(tmp_path, path, op, value, named):
    f = tmp_path / "fuzz.yaml"
    f.write_text(yaml.safe_dump(mutate(QUICKSTART, path, op, value)))
    r = subprocess.run([NMM, "validate", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    assert named in r.stderr, r.stderr
