"""Drawing plans (data.drawPlans: layout): the layout in words, the rows that train it, drawing
plan first, the grpo recipe sampling and scoring a plan with its image, and the plan judge."""

import numpy as np
import pytest
import torch

from nmm.data import shapes
from nmm.data.sequences import Prompts
from nmm.evaluate import shapes_judge
from nmm.evaluate.shapes import plan_scores
from nmm.model.generate import draw_images
from nmm.tokenizers.vocab import ASSISTANT, BOI, BOS, EOI, PAD, USER, SharedVocab, blank_text
from nmm.train.batches import Batches
from nmm.train.recipes import GrpoOptions
from nmm.train.recipes.common import student_samples
from nmm.train.recipes.grpo import guided_logits, unconditional
from nmm.train.rewards import Reward, drawn_images
from nmm.train.trainer import PhaseConfig, TrainConfig, TrainData, train
from tests.unit.test_recipes import CPU, IMAGE, TEXT, model_cfg


def test_a_layout_says_each_object_s_colour_shape_and_cell_and_reads_back_to_the_same_objects():
    rng = np.random.default_rng(0)
    for task in shapes.TASKS * 10:
        scene = shapes.make_scene(task, rng, 32)
        text = shapes.layout(scene, 32)
        assert len(text.split()) == 4 * len(scene.objects)
        back = shapes.from_layout(text, 32)
        assert [shapes.placement(o, 32) for o in back] == [shapes.placement(o, 32) for o in scene.objects]
        # what the layout places, the judge finds where the layout says (the plan judge's premise)
        assert shapes_judge.placements(shapes.render(back, 32)) == sorted(shapes.placement(o, 32) for o in back)
    scene = shapes.make_scene("color_attr", np.random.default_rng(1), 32)
    a, b = scene.objects
    assert shapes.layout(scene, 32) == (
        f"{a.colour} {a.shape} {shapes.coordinate(a, 32, 'x')} {shapes.coordinate(a, 32, 'y')} "
        f"{b.colour} {b.shape} {shapes.coordinate(b, 32, 'x')} {shapes.coordinate(b, 32, 'y')}"
    )
    for bad in (
        "",
        "red triangle x1",
        "red hexagon x1 y2",
        "red triangle x8 y2",
        "red triangle y1 x2",
        "red triangle xa y1",
    ):
        assert shapes.from_layout(bad, 32) is None, bad


def test_a_planned_drawing_row_has_the_model_write_its_plan_and_boi_before_the_image():
    vocab = SharedVocab(text_size=20, image_size=8)
    codes, caption, plan = np.array([1, 2, 3, 4]), [3, 4], [7, 8, 9]
    for style in ("plain", "instruct"):
        flat, planned = (Prompts.of(vocab, style, lambda t: [5], plans=p) for p in (False, True))
        assert flat.draw(caption)[-1] == BOI and planned.draw(caption) == flat.draw(caption)[:-1]
        tokens, mask = planned.row(codes, caption, "m2g", plan_local=plan)
        prompt = planned.draw(caption)
        assert tokens == prompt + vocab.text_ids(plan) + [BOI, *vocab.image_ids(codes).tolist(), EOI]
        assert mask == [0] * len(prompt) + [1] * (len(plan) + 1 + len(codes) + 1)  # the plan and <boi> are targets
        assert flat.row(codes, caption, "m2g", plan_local=plan) == flat.row(codes, caption, "m2g")  # no plans: ignored
        assert planned.row(codes, caption, "m2t", plan_local=plan) == flat.row(codes, caption, "m2t")
    assert Prompts.of(vocab, "instruct", lambda t: [5], plans=True).draw(caption)[:2] == [BOS, USER]
    assert Prompts.of(vocab, "instruct", lambda t: [5], plans=True).draw(caption)[-1] == ASSISTANT


# --- toy plans: the prompt is the same two words in every row, the plan one word p in {5, 6, 7, 8},
# the image four codes 30 + (p - 5): the plan alone decides what is drawn, and the reward wants
# code 33 (the plan 8).

PLAN_WORDS = (5, 6, 7, 8)
PROMPT = [BOS, 11, 12]


def planned_data(n: int = 32) -> TrainData:
    tokens, mask = [], []
    for i in range(n):
        p = 8 if i % 8 == 7 else PLAN_WORDS[i % 3]  # plan 8 in one row of eight: the reward rises by learning it
        tokens.append([BOS, *PROMPT[1:], p, BOI, *[30 + p - 5] * 4, EOI])
        mask.append([0] * 3 + [1] * 7)
    return TrainData(
        tokens=np.array(tokens, np.int32),
        loss_mask=np.array(mask, np.uint8),
        task=np.ones(n, np.int8),
        image_range=IMAGE,
        text_range=TEXT,
    )


def code_3(rows, tokens, sampled) -> torch.Tensor:
    return torch.from_numpy((drawn_images(tokens, sampled, IMAGE, 4) == 3).mean(1))


def plan_cfg(rl_steps: int = 0, **rl) -> TrainConfig:
    phases = [PhaseConfig(mixture={"m2g": 1.0}, name="pre", steps=60, batch_size=8, lr=1e-2, recipe="sft")]
    if rl_steps:
        phases.append(
            PhaseConfig(
                mixture={"m2g": 1.0},
                name="rl",
                steps=rl_steps,
                batch_size=4,
                lr=1e-2,
                recipe="grpo",
                options=GrpoOptions(reference="pre", reward=(("code_3", 1.0),), group=8, **rl),
            )
        )
    return TrainConfig(
        model=model_cfg(image_lo=IMAGE[0], image_hi=IMAGE[1], tokens_per_image=4),
        phases=tuple(phases),
        seed=0,
        checkpoint_interval=1000,
        log_every=1,
    )


@pytest.fixture(scope="module")
def planner(tmp_path_factory):
    model, _ = train(plan_cfg(), planned_data(), CPU, tmp_path_factory.mktemp("pre").as_uri(), lambda m, s: None)
    return model.eval()


def test_a_model_trained_on_plans_writes_one_then_draws_what_it_says(planner):
    prompts = [PROMPT] * 16
    heads, images = draw_images(
        planner, prompts, 4, IMAGE, plan_range=TEXT, temperature=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert all(len(h) == 2 and h[0] in PLAN_WORDS and h[1] == BOI for h in heads)  # a plan word, then <boi>
    assert [img for img in images] == [[30 + h[0] - 5] * 4 for h in heads]  # each image is its plan's
    assert len({h[0] for h in heads}) > 1  # sampled: plans vary
    # with no room left for a plan, <boi> is put in and the image still comes; a prompt beside it
    # keeps its own room (a short prompt may need the longest plan)
    full = [BOS] + [11] * (planner.cfg.max_seq_len - 4 - 2)
    heads, images = draw_images(planner, [full, PROMPT], 4, IMAGE, plan_range=TEXT)
    assert heads[0] == [] and heads[1][-1:] == [BOI] and [len(i) for i in images] == [4, 4]


def test_rollouts_sample_the_plan_and_the_image_and_guidance_applies_to_the_image_only(planner):
    data = planned_data(4)
    x, m = torch.from_numpy(data.tokens.astype(np.int64)), torch.from_numpy(data.loss_mask.astype(np.int64))
    out, sampled = student_samples(
        planner, x, m, None, IMAGE, TEXT, 1.0, guidance=2.0, drawing=torch.ones(4, dtype=torch.bool)
    )
    for row, s in zip(out.tolist(), sampled.tolist()):
        assert row[:3] == x[0, :3].tolist()[:1] + row[1:3] and row[4] == BOI and row[9] == EOI
        assert s == [0, 0, 0, 1, 1, 1, 1, 1, 1, 0]  # plan word, <boi> (written), four codes; <eoi> put in
    blank = unconditional(out, sampled, IMAGE, TEXT)
    assert (blank[:, 1:4] == PAD).all() and torch.equal(blank[:, 4:], out[:, 4:])  # prompt and plan padded out
    assert torch.equal(blank[0], torch.tensor(blank_text(out[0].tolist(), TEXT)))  # as generation blanks it
    with torch.no_grad():
        cond, uncond = planner(out), planner(blank)
        mixed = guided_logits(planner, out, blank, 2.0, None, None, IMAGE)
    guided = uncond + 2.0 * (cond - uncond)
    assert torch.allclose(mixed[:, :3], cond[:, :3], atol=1e-5)  # up to the plan word and <boi>: unguided
    assert torch.allclose(mixed[:, 4:8], guided[:, 4:8], atol=1e-5)  # <boi> and codes predict codes: guided


def test_caption_dropout_pads_a_plan_out_and_takes_it_out_of_the_targets():
    data = planned_data(8)
    phase = PhaseConfig(
        mixture={"m2g": 1.0}, name="sft", steps=1, batch_size=8, lr=1e-3, recipe="sft", caption_dropout=1.0
    )
    b = Batches(data, (phase,), reads_pixels=False).batch(phase, 0, 0, CPU)
    assert (b.x[:, 1:4] == PAD).all() and (b.m[:, 1:4] == 0).all()  # words and plan: padding, no target
    assert (b.m[:, 4:] == 1).all()  # <boi>, the codes and <eoi> stay targets: unconditional drawing


def test_an_rl_phase_with_plans_raises_its_reward_by_choosing_the_plan(tmp_path):
    seen, samples = {}, {}
    train(
        plan_cfg(24, samples_every=100),
        planned_data(),
        CPU,
        tmp_path.as_uri(),
        lambda m, s: seen.update({s: m}),
        rewards={"code_3": Reward("code_3", "m2g", code_3)},
        on_samples=lambda step, phase, x, sampled: samples.update({step: x}),
    )
    rl = [seen[s] for s in range(61, 85)]
    first, last = np.mean([m["train/reward"] for m in rl[:4]]), np.mean([m["train/reward"] for m in rl[-4:]])
    assert first < 0.3 and last > first + 0.4, (first, last)
    x = samples[84]
    # the plans that draw other codes (7 rows of 8 in the data) are gone: the plan tokens got the
    # credit (what is left writes plan 8, or goes to <boi> straight away and draws code 33)
    assert torch.isin(x[:, 3], torch.tensor(PLAN_WORDS[:3])).float().mean() < 0.2
    assert torch.isin(x[:, 3], torch.tensor([8, BOI])).float().mean() > 0.8


def test_the_plan_judge_scores_a_layout_rendered_and_whether_the_drawing_follows_it():
    rng = np.random.default_rng(3)
    scenes = [shapes.make_scene(t, rng, 32) for t in shapes.TASKS * 4]
    truth = np.stack([shapes.render(s.objects, 32) for s in scenes])
    plans = [shapes.layout(s, 32) for s in scenes]
    assert plan_scores(scenes, truth, plans) == {"plan_overall": 1.0, "plan_followed": 1.0}
    swapped = []  # colour attribution: the colours swapped in the plan, the drawing still the truth
    for s, p in zip(scenes, plans):
        w = p.split()
        if s.task == "color_attr":
            w[0], w[4] = w[4], w[0]
        swapped.append(" ".join(w))
    got = plan_scores(scenes, truth, swapped)
    assert got["plan_overall"] == pytest.approx(5 / 6) and got["plan_followed"] == pytest.approx(20 / 24)
    assert plan_scores(scenes, truth, ["a red triangle"] * len(scenes)) == {"plan_overall": 0.0, "plan_followed": 0.0}


def test_a_served_planning_model_writes_its_plan_before_each_image_it_serves(monkeypatch):
    import base64
    import io
    import json
    from types import SimpleNamespace

    from PIL import Image

    from nmm.model import ModelConfig
    from nmm.serve.batcher import Job
    from nmm.serve.model_dir import load_from_files, model_files
    from nmm.serve.pyfunc import Predictor
    from nmm.serve.server import DrawKey, Metrics, Model
    from nmm.tokenizers import ColourMaskVQ, TextTokenizer

    rng = np.random.default_rng(0)
    scenes = [shapes.make_scene(t, rng, 24) for t in shapes.TASKS * 4]
    vq = ColourMaskVQ.fit(np.stack([shapes.render(s.objects, 24) for s in scenes]), 4, 11, 12, seed=0)
    text = TextTokenizer.train("bpe", [s.prompt for s in scenes] + [shapes.layout(s, 24) for s in scenes], 96)
    vocab = SharedVocab(text_size=text.size, image_size=vq.size)
    net = ModelConfig(vocab_size=vocab.size, dim=32, layers=1, heads=2, max_seq_len=64).build()
    config = {
        "model": json.loads(net.cfg.to_json()),
        "vocab": {"text_size": vocab.text_size, "image_size": vocab.image_size},
        "tokens_per_image": vq.tokens_per_image,
        "image_shape": list(vq.image_shape),
        "source": "shapes",
        "prompts": "plain",
        "plans": True,
    }
    loaded = load_from_files(model_files(net, config, {"text": text.to_bytes(), "image": vq.to_bytes()}))
    assert loaded.prompts.plans and loaded.prompts.draw(text.encode("a photo of a circle"))[-1] != BOI
    import nmm.model.generate as gen

    calls, real = [], gen.generate
    monkeypatch.setattr(
        gen,
        "generate",
        lambda model, prompts, *a, **kw: calls.append((a[1], prompts)) or real(model, prompts, *a, **kw),
    )
    served = Model(loaded, Metrics())
    job = Job(DrawKey(1.0, 1.0, 0), served.draw_job(SimpleNamespace(prompt="a photo of a red circle", n=2)))
    (pngs,) = served.images([job])
    assert [Image.open(io.BytesIO(base64.b64decode(p))).size for p in pngs] == [(24, 24)] * 2
    (plan_range, asked), (image_range, planned) = calls  # the plan in words, then the image after it and <boi>
    assert plan_range == vocab.text_range() and image_range == vocab.image_range()
    assert all(q[: len(p)] == p and q[-1] == BOI and len(q) > len(p) for p, q in zip(asked, planned))
    (out,) = Predictor(loaded).predict([{"prompt": "a photo of a circle"}])
    assert np.asarray(out["image"]).shape == (24, 24, 3)
