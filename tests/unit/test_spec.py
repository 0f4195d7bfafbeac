"""The spec: examples parse, errors name the field path, bad specs are rejected."""

from pathlib import Path

import pytest

from nmm.spec import SpecError, parse_gate, parse_pipeline
from tests.conftest import WORKFLOWS

BAD = sorted((Path(__file__).parent.parent / "bad_specs").glob("*.yaml"))


def expected(path: Path) -> str:
    first = path.read_text().splitlines()[0] if path.read_text() else ""
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <text>'"
    return first[len("# expect: ") :]


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_pipeline_is_valid(path):
    spec = parse_pipeline(path.read_text(), str(path))
    assert spec.metadata.name


def test_quickstart_is_an_m2m_early_fusion_pipeline_with_two_gates():
    spec = parse_pipeline((WORKFLOWS / "quickstart.yaml").read_text())
    assert spec.spec.model.category == "M2M"
    assert spec.spec.model.fusion == "early"
    assert [str(g) for g in spec.spec.evaluation.parsed_gates] == [
        "m2t.digits.accuracy >= 0.9",
        "m2g.digits.accuracy >= 0.8",
    ]


def test_bad_spec_corpus_has_at_least_fifteen_cases():
    assert len(BAD) >= 15


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_spec_is_rejected_naming_the_field(path):
    with pytest.raises(SpecError) as exc:
        parse_pipeline(path.read_text(), path.name)
    text = "\n".join(exc.value.problems)
    assert expected(path) in text, text


def test_every_problem_is_reported_not_just_the_first():
    text = (Path(__file__).parent.parent / "bad_specs" / "06-negative-steps.yaml").read_text()
    text = text.replace("registeredModelName: m", "registeredModelName: 'bad name'")
    with pytest.raises(SpecError) as exc:
        parse_pipeline(text)
    paths = [p.split(":")[0] for p in exc.value.problems]
    assert "spec.training.phases[0].steps" in paths
    assert "spec.rollout.registeredModelName" in paths


def test_gate_parses_and_compares():
    g = parse_gate("m2t.digits.accuracy >= 0.9")
    assert (g.metric, g.op, g.threshold) == ("m2t.digits.accuracy", ">=", 0.9)
    assert g.passes(0.9) and not g.passes(0.89)
    with pytest.raises(ValueError):
        parse_gate("m2t.digits.accuracy ~ 0.9")
