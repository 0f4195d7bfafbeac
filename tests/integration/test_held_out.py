"""Held-out compositions (`data.sources[].heldOut`) through a tiny shapes pipeline: curate puts
every scene that shows one in the test split (no training or validation image or prompt has
it), and evaluation scores the seen and the held-out test scenes apart (`heldout_*`).

The same pipeline trains a short grpo phase on both shapes rewards (a drawn scene judged by the
GenEval rules, a written answer by exact match), drawing with guidance, with grid image
positions: the train stage builds the rewards over the train split, and the phase's MLflow run
gets its reward metrics and its sample grids. Position questions get grounded answers
(`positionAnswers: grounded`), which evaluation scores by their verdict and, apart, whole.
Images are coded as colour × mask pairs (`kind: colour-mask`), so the model has factored code
rows and can draw a held-out pair. Every drawing starts with its plan in words (`drawPlans:
layout`): the rows train it, the grpo phase samples it, evaluation draws plan first and judges
the plans too."""

import json
import os
import re
import subprocess

import pytest
import yaml

from nmm.data import shapes as shapes_data
from nmm.data.dataset import Dataset
from nmm.spec.data import HeldOut
from nmm.tokenizers import ColourMaskVQ
from tests.conftest import NMM

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HELD = {"colourShape": ["red circle", "blue square"], "positionPairs": ["circle left of square"]}


def spec() -> dict:
    return {
        "apiVersion": "nmm.dev/v1alpha1",
        "kind": "NMMPipeline",
        "metadata": {"name": "held-out"},
        "spec": {
            "data": {
                "sources": [{"kind": "shapes", "samples": 360, "imageSize": 24, "heldOut": HELD}],
                "split": {"train": 0.7, "val": 0.1, "test": 0.2},
                "captionsPerImage": 1,
                "positionAnswers": "grounded",
                "drawPlans": "layout",
            },
            "model": {
                "fusion": "early",
                "tasks": ["m2t", "m2g"],
                "size": {"dim": 32, "layers": 1, "heads": 2},
                "imagePositions": "grid",
                "tokenizers": {
                    "text": {"kind": "bpe", "vocabSize": 160},
                    "image": {"kind": "colour-mask", "patchSize": 4, "masks": 24},
                },
            },
            "training": {
                "phases": [
                    {"name": "pretrain", "steps": 10, "batchSize": 16, "mixture": {"m2t": 0.5, "m2g": 0.5}},
                    {
                        "name": "rl",
                        "recipe": "grpo",
                        "reference": "pretrain",
                        "steps": 3,
                        "batchSize": 4,
                        "group": 2,
                        "guidance": 2.0,
                        "samplesEvery": 2,
                        "reward": {"shapes_geneval": 1.0, "vqa_exact": 1.0},
                        "mixture": {"m2t": 0.5, "m2g": 0.5},
                    },
                ],
                "resources": {"processesPerNode": 1},
                "checkpoint": {"intervalSteps": 13, "keepLatest": 1},
            },
            "evaluation": {
                "suites": ["m2g.shapes_geneval", "m2t.shapes_vqa"],
                "promptsPerTask": 2,
                "vqaImages": 12,
                "seesaw": False,
                "gates": ["m2g.shapes_geneval.heldout_overall >= 0.0"],
            },
            "rollout": {"registeredModelName": "nmm-held-out"},
        },
    }


def test_held_out_scenes_are_only_in_test_and_scored_apart(tmp_path):
    path = tmp_path / "held-out.yaml"
    path.write_text(yaml.safe_dump(spec()))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "NMM_HOME", "NMM_STORE", "NMM_S3_ENDPOINT")
    }
    r = subprocess.run([NMM, "run", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (status_file,) = (tmp_path / ".nmm" / "runs").glob("*/status.json")
    steps = json.loads(status_file.read_text())["steps"]

    held = shapes_data.held_out_predicate(HeldOut.model_validate(HELD))
    ds = Dataset.open(steps["curate"]["outputs"]["dataset_uri"])
    vq = ds.image_tokenizer()
    assert isinstance(vq, ColourMaskVQ) and vq.factors[1] <= 24 and ds.vocab.image_size == vq.size
    test = ds.split("test").arrays["codes"]
    assert (test[test % vq.factors[1] == 0] == 0).all()  # read in the coding with the ground on every empty patch
    shown = {name: [held(s) for s in ds.split(name).scenes] for name in ("train", "val", "test")}
    assert not any(shown["train"]) and not any(shown["val"])  # never trained or validated on
    assert 10 <= sum(shown["test"]) < len(shown["test"])  # scored apart from the seen test scenes

    position = [a for qs in ds.split("test").vqa for _, a, kind in qs if kind == "position"]
    assert position and all(
        re.fullmatch(r"[a-z]+ ([xy])[0-7] [a-z]+ \1[0-7] (left of|right of|above|below|level) (yes|no)", a)
        for a in position
    ), position[:4]

    # an M2G row's targets: the scene's layout in words, <boi>, the image's codes, <eoi>
    from nmm.data import shapes
    from nmm.data.sequences import TASKS
    from nmm.tokenizers.vocab import BOI, EOI

    train = ds.split("train")
    arrays, text = train.arrays, ds.text_tokenizer()
    row = int((arrays["task"] == TASKS.index("m2g")).nonzero()[0][0])
    target = arrays["tokens"][row][arrays["loss_mask"][row] == 1].tolist()
    scene = shapes.scene_from_dict(train.scenes[arrays["row_image"][row]])
    boi = target.index(BOI)
    assert text.decode(ds.vocab.text_local(target[:boi])).strip() == shapes.layout(scene, 24)
    assert len(target) == boi + 1 + vq.tokens_per_image + 1 and target[-1] == EOI
    assert ds.manifest["draw_plans"] == "layout"

    metrics = json.loads(steps["evaluate"]["outputs"]["metrics"])
    for name in ("plan_overall", "plan_followed", "heldout_plan_overall"):
        assert 0.0 <= metrics[f"m2g.shapes_geneval.{name}"] <= 1.0, name
    for name in (
        "m2g.shapes_geneval.overall",
        "m2g.shapes_geneval.heldout_overall",
        "m2t.shapes_vqa.accuracy",
        "m2t.shapes_vqa.heldout_accuracy",
        "m2t.shapes_vqa.position_grounding_accuracy",
    ):
        assert 0.0 <= metrics[name] <= 1.0, name
    assert (
        "m2g.shapes_geneval.heldout_judge_real" not in metrics
    )  # the judge's ceiling on real renders: seen scenes only
    assert 0.0 <= metrics["m2g.shapes_geneval.heldout_judge_tokenized"] <= 1.0  # the codebook's, on held-out ones too

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / '.nmm' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("default/held-out")
    (rl,) = client.search_runs([exp.experiment_id], filter_string="tags.`nmm.stage` = 'train/rl'")
    assert (
        rl.data.params["recipe"] == "grpo"
        and rl.data.params["reference"] == "pretrain"
        and rl.data.params["group"] == "2"
    )
    assert rl.data.params["guidance"] == "2.0"
    for name in ("reward", "reward/shapes_geneval", "reward/vqa_exact", "reward_std/vqa_exact", "kl"):
        assert {m.step for m in client.get_metric_history(rl.info.run_id, f"train/{name}")} == {11, 12, 13}, name
    samples = sorted(a.path for a in client.list_artifacts(rl.info.run_id, "samples"))
    # every 2nd step of the phase and its last: the drawn images as a grid, the written answers as text
    assert samples == [f"samples/step-{s:06d}.{ext}" for s in (12, 13) for ext in ("png", "txt")], samples
    answers = client.download_artifacts(rl.info.run_id, "samples/step-000013.txt", str(tmp_path))
    lines = open(answers).read().splitlines()  # each prompt (a question, or a caption request) → what the policy wrote
    assert lines and all(" → " in line for line in lines), lines
