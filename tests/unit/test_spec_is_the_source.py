"""One shape per setting: snake_case in Python, camelCase in YAML; the trainer's
config and the MLflow params are derived from the spec, never re-typed."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from nmm.spec import parse_pipeline
from nmm.spec.training import Parallelism as SpecParallelism
from nmm.spec.training import Phase
from nmm.stages.train import flatten, phase_configs
from nmm.train.parallelize import Parallelism
from nmm.train.recipes import RECIPES, GrpoOptions, NoOptions
from nmm.train.trainer import PhaseConfig
from tests.conftest import WORKFLOWS

QUICKSTART = (WORKFLOWS / "quickstart.yaml").read_text()


def test_attributes_are_snake_case_and_yaml_stays_camel_case():
    spec = parse_pipeline(QUICKSTART)
    phase = spec.spec.training.phases[0]
    assert phase.batch_size == 64 and phase.warmup_steps == 50
    dumped = spec.model_dump(mode="json", by_alias=True)
    assert dumped["spec"]["training"]["phases"][0]["batchSize"] == 64
    assert "batch_size" not in str(dumped) and "apiVersion" in dumped


def _defaults(dc) -> dict:
    return {f.name: f.default for f in dataclasses.fields(dc) if f.default is not dataclasses.MISSING}


def test_the_trainer_s_phase_is_the_spec_s_phase_field_for_field_and_default_for_default():
    """The twins the import contracts force (the trainer may not import pydantic) agree on their
    fields AND their defaults: a default changed in the spec and not in the trainer fails here."""
    common = {f.name for f in dataclasses.fields(PhaseConfig)} - {"options"}
    options = {name for r in RECIPES.values() for name in r.option_names()}
    assert common | options == set(Phase.model_fields) and not common & options
    for twin in [PhaseConfig, *(r.options for r in RECIPES.values())]:
        for name, default in _defaults(twin).items():
            if name != "recipe" and not (twin is PhaseConfig and name == "options"):
                assert Phase.model_fields[name].default == default, (twin.__name__, name)
    assert PhaseConfig.__dataclass_fields__["recipe"].default == Phase.model_fields["recipe"].default
    assert {f.name for f in dataclasses.fields(Parallelism)} == set(SpecParallelism.model_fields)
    assert _defaults(Parallelism) == {k: f.default for k, f in SpecParallelism.model_fields.items()}


def test_a_phase_s_options_are_its_recipe_s_and_only_its_recipe_takes_them():
    spec = parse_pipeline((WORKFLOWS / "shapes-m2m-rl.yaml").read_text()).spec
    pretrain, sft, rl = phase_configs(spec)
    assert isinstance(pretrain.options, NoOptions) and isinstance(rl.options, GrpoOptions)
    assert rl.options.reward == (("shapes_geneval", 1.0), ("vqa_exact", 1.0)) and rl.scores_against == "sft"
    with pytest.raises(ValueError, match="takes GrpoOptions"):
        PhaseConfig(name="rl", steps=1, batch_size=1, lr=1.0, mixture={"m2t": 1.0}, recipe="grpo")


def test_an_unset_mixture_is_equal_shares_of_the_model_s_tasks_in_one_place():
    doc = yaml.safe_load(QUICKSTART)
    del doc["spec"]["training"]["phases"][0]["mixture"]
    doc["spec"]["model"]["tasks"] = ["m2t"]
    doc["spec"]["model"]["fusion"] = "early"
    doc["spec"]["evaluation"] = {"suites": ["m2t.digits"], "gates": ["m2t.digits.accuracy >= 0.5"]}
    doc["spec"]["training"]["phases"][1]["mixture"] = {"m2t": 1.0}
    spec = parse_pipeline(yaml.safe_dump(doc)).spec
    pretrain, sft = phase_configs(spec)
    assert pretrain.mixture == {"m2t": 1.0} and sft.mixture == {"m2t": 1.0}
    assert (pretrain.batch_size, pretrain.warmup_steps) == (64, 50)


def test_mlflow_params_are_a_flattening_of_the_spec():
    spec = parse_pipeline(QUICKSTART).spec
    params = flatten({"training": spec.training.model_dump(mode="json", by_alias=True)})
    assert params["training.phases.sft.batchSize"] == 64 and params["training.phases.pretrain.warmupSteps"] == 50
    assert params["training.resources.processesPerNode"] == 2 and params["training.checkpoint.intervalSteps"] == 400


def test_the_run_s_and_the_model_s_twins_default_as_the_spec_does():
    """TrainConfig and ModelConfig are the spec's too (torch-only twins the contracts force): the
    train stage passes every field, and what they default to must be what the spec defaults to."""
    from nmm.model import ModelConfig
    from nmm.spec.models import Encoder, ModelSpec, Size
    from nmm.spec.training import Checkpoint, Training
    from nmm.train.trainer import TrainConfig

    twins = [
        (TrainConfig, "z_loss", ModelSpec, "z_loss"),
        (TrainConfig, "checkpoint_interval", Checkpoint, "interval_steps"),
        (TrainConfig, "keep_latest", Checkpoint, "keep_latest"),
        (TrainConfig, "encoder_steps", Encoder, "steps"),
        (TrainConfig, "seed", Training, "seed"),
        *((ModelConfig, name, Size, name) for name in ("dim", "layers", "heads", "dropout")),
        *((ModelConfig, name, ModelSpec, name) for name in ("qk_norm", "fusion", "image_attention", "image_positions")),
        (ModelConfig, "encoder_dim", Encoder, "dim"),
        (ModelConfig, "encoder_layers", Encoder, "layers"),
    ]
    for twin, name, model, field in twins:
        assert _defaults(twin)[name] == model.model_fields[field].default, (twin.__name__, name)
