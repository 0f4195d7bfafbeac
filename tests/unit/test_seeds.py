"""Ablations on several seeds: the spec's runs per seed, and mean ± std with the differences
larger than the seed spread (nmm.evaluate.seeds) against hand computations."""

import math

import pytest
import yaml

from nmm.compile import CompileSettings, compile_pipeline
from nmm.evaluate import seeds
from nmm.spec import parse_pipeline
from nmm.spec.parse import SpecError
from tests.conftest import WORKFLOWS


def ablation(**variant_seeds) -> str:
    doc = yaml.safe_load((WORKFLOWS / "fusion-ablation.yaml").read_text())
    for v in doc["spec"]["variants"]:
        v["seeds"] = variant_seeds.get(v["name"], 1)
    return yaml.safe_dump(doc)


def test_a_variant_on_three_seeds_is_three_runs_each_on_its_own_seed():
    spec = parse_pipeline(ablation(early=3))
    assert spec.variant_names == ["earlys0", "earlys1", "earlys2", "earlybidir", "mid", "late"]
    assert spec.seed_groups == {
        "early": ["earlys0", "earlys1", "earlys2"],
        "earlybidir": ["earlybidir"],
        "mid": ["mid"],
        "late": ["late"],
    }
    base = spec.spec.training.seed
    assert [spec.for_variant(f"earlys{k}").spec.training.seed for k in range(3)] == [base, base + 1, base + 2]
    assert spec.for_variant("earlys2").spec.model.fusion == "early"
    wf = compile_pipeline(spec, CompileSettings())
    steps = [t["name"] for t in next(t for t in wf["spec"]["templates"] if "dag" in t)["dag"]["tasks"]]
    assert {"train-earlys0", "train-earlys1", "train-earlys2", "evaluate-earlys2", "train-late"} <= set(steps)
    assert parse_pipeline(ablation()).seed_groups == {}  # one seed each: no aggregate


def test_a_seeded_name_over_the_budget_is_refused_with_the_field():
    doc = yaml.safe_load(ablation())
    doc["spec"]["variants"][1]["name"] = "earlybidirectio"  # 15 characters; with seeds: 17
    doc["spec"]["variants"][1]["seeds"] = 3
    with pytest.raises(
        SpecError,
        match=r"variants\[1\]\.name: 'earlybidirectio' with 3 seeds makes step names like 'earlybidirectios2'",
    ):
        parse_pipeline(yaml.safe_dump(doc))


def test_mean_std_and_the_differences_larger_than_the_seed_spread():
    per_run = {
        "as0": {"acc": 0.90, "f1": 0.5},
        "as1": {"acc": 0.92, "f1": 0.7},
        "as2": {"acc": 0.94},
        "bs0": {"acc": 0.80, "f1": 0.6},
        "bs1": {"acc": 0.84, "f1": 0.6},
    }
    agg = seeds.aggregate(per_run, {"a": ["as0", "as1", "as2"], "b": ["bs0", "bs1"], "c": ["cs0"]})
    mean, std, n = agg["a"]["acc"]
    assert (mean, n) == (pytest.approx(0.92), 3) and std == pytest.approx(0.02)  # sample std of .90 .92 .94
    assert agg["b"]["acc"][:2] == (pytest.approx(0.82), pytest.approx(math.sqrt(0.0008)))
    assert agg["a"]["f1"][2] == 2 and agg["c"] == {}  # measured where reported; a run that never reported
    # acc: |0.92 - 0.82| = 0.10 > 0.02 + 0.028; f1: |0.6 - 0.6| = 0
    assert seeds.apart(agg) == [("acc", "a", "b")]
    assert seeds.as_metrics(agg)["a/acc.mean"] == pytest.approx(0.92)
    assert seeds.as_metrics(agg)["b/acc.std"] == pytest.approx(math.sqrt(0.0008))
