"""The GenEval-style shapes judge is proven before it judges models: it passes ground-truth
renders and fails corrupted ones (wrong colour, missing object, swapped position, one too many)."""

from dataclasses import replace

import numpy as np
import pytest

from nmm.data import shapes
from nmm.data.sources import render_shapes
from nmm.evaluate import shapes_judge

SIZE = 32


@pytest.fixture(scope="module")
def scenes():
    return shapes.generate(360, SIZE, seed=1)


def image(objects):
    return shapes.render(tuple(objects), SIZE)


def test_ground_truth_renders_score_at_least_0_99_on_every_task(scenes):
    result = shapes_judge.evaluate(scenes, np.stack([image(s.objects) for s in scenes]))
    assert set(result) == set(shapes.TASKS) | {"overall"}
    for task in shapes.TASKS:
        assert result[task] >= 0.99, (task, result)
    assert result["overall"] >= 0.99


def by_task(scenes, task):
    return [s for s in scenes if s.task == task]


def test_wrong_colour_fails(scenes):
    for s in by_task(scenes, "colors") + by_task(scenes, "color_attr"):
        o = s.objects[0]
        other = next(c for c in shapes.COLOURS if c != o.colour and all(c != w.get("colour") for w in s.include))
        assert not shapes_judge.score(s, image([replace(o, colour=other), *s.objects[1:]])), s.prompt


def test_missing_object_fails(scenes):
    for s in by_task(scenes, "two_object") + by_task(scenes, "single_object") + by_task(scenes, "color_attr"):
        assert not shapes_judge.score(s, image(s.objects[1:])), s.prompt


def test_swapped_position_fails(scenes):
    for s in by_task(scenes, "position"):
        a, b = s.objects
        swapped = [replace(a, cx=b.cx, cy=b.cy), replace(b, cx=a.cx, cy=a.cy)]
        assert not shapes_judge.score(s, image(swapped)), s.prompt


def test_counting_fails_on_one_more_and_one_less(scenes):
    rng = np.random.default_rng(0)
    for s in by_task(scenes, "counting"):
        assert not shapes_judge.score(s, image(s.objects[1:])), s.prompt
        for _ in range(200):  # find room for one more object of the same kind
            extra = replace(s.objects[0], cx=float(rng.integers(4, SIZE - 4)), cy=float(rng.integers(4, SIZE - 4)))
            if all(max(abs(extra.cx - o.cx), abs(extra.cy - o.cy)) >= extra.size + 1 for o in s.objects):
                assert not shapes_judge.score(s, image([*s.objects, extra])), s.prompt
                break


def test_a_blank_image_fails_everything(scenes):
    blank = image([])
    assert not any(shapes_judge.score(s, blank) for s in scenes)


def test_scenes_come_with_captions_and_vqa_including_absent_probes(scenes):
    rng = np.random.default_rng(0)
    s = by_task(scenes, "single_object")[0]
    assert shapes.captions(s)[0] == s.prompt and len(shapes.captions(s)) >= 3
    pairs = shapes.vqa_pairs(s, rng)
    assert (f"what colour is the {s.objects[0].shape}?", s.objects[0].colour, "colour") in pairs
    probes = [a for _, a, kind in pairs if kind == "exists"]
    assert sorted(probes) == ["no", "yes"]


def test_position_questions_are_answered_by_the_scene_and_balanced(scenes):
    rng = np.random.default_rng(0)
    answers = []
    for s in by_task(scenes, "position"):
        for q, a, kind in shapes.vqa_pairs(s, rng):
            if kind == "position":
                first, second = s.objects[0], s.objects[1]
                rel = q.removeprefix(f"is the {first.shape} ").removesuffix(f" the {second.shape}?")
                assert a == ("yes" if shapes.relation_holds(first.box, second.box, rel) else "no"), q
                answers.append(a)
    assert 0.3 < answers.count("yes") / len(answers) < 0.7


def test_grounded_position_answers_place_both_objects_say_the_relation_then_the_verdict(scenes):
    """Grounded answers ask the plain questions (the same draws of the generator), each position
    question also the other way round, and end each in the verdict the scene gives; the places
    named are the objects' centres on the asked axis of the 8×8 grid, the relation named the one
    that holds on that axis; `place` pairs say where each shape the scene has once is."""
    seen = set()
    for s in by_task(scenes, "position")[:30] + by_task(scenes, "color_attr")[:30] + by_task(scenes, "counting")[:5]:
        plain = shapes.vqa_pairs(s, np.random.default_rng(7))
        grounded = shapes.vqa_pairs(s, np.random.default_rng(7), grounded_on=SIZE)

        def both_ways(q: str) -> list[str]:
            return [q] + [q.replace(f" {r} ", f" {shapes.INVERSE[r]} ") for r in shapes.RELATIONS if f" {r} " in q]

        expected = [(asked, k) for q, _, k in plain for asked in (both_ways(q) if k == "position" else [q])]
        assert [(q, k) for q, _, k in grounded if k != "place"] == expected
        cell = lambda v: int(v) * shapes.GRID // SIZE
        for q, g, kind in grounded:
            if kind == "place":
                (o,) = [o for o in s.objects if f" {o.shape}?" in q]
                assert g == f"{o.shape} x{cell(o.cx)} y{cell(o.cy)}"
                continue
            if kind != "position":
                continue
            first, second = s.objects[0], s.objects[1]
            rel = q.removeprefix(f"is the {first.shape} ").removesuffix(f" the {second.shape}?")
            horizontal = rel in ("left of", "right of")
            axis, centre = ("x", lambda o: o.cx) if horizontal else ("y", lambda o: o.cy)
            cells = [cell(centre(o)) for o in (first, second)]
            shown = {(True, -1): "left of", (True, 1): "right of", (False, -1): "above", (False, 1): "below"}.get(
                (horizontal, int(np.sign(cells[0] - cells[1]))), "level"
            )
            verdict = "yes" if shapes.relation_holds(first.box, second.box, rel) else "no"
            assert g == f"{first.shape} {axis}{cells[0]} {second.shape} {axis}{cells[1]} {shown} {verdict}", (q, g)
            assert shapes.verdict(g) == verdict and (verdict == "yes") == (rel == shown)
            seen.add(shown)
        if s.task == "counting":
            assert not [k for *_, k in grounded if k == "place"]  # no one shape to point at
    assert seen == {"left of", "right of", "above", "below", "level"}


def test_vqa_scores_a_grounded_answer_by_its_verdict_and_its_places_apart():
    from nmm.evaluate.shapes import score_answers

    truth = [
        ("red", "colour"),
        ("circle x1 square x6 left of yes", "position"),
        ("circle x1 square x6 left of yes", "position"),
        ("square y2 circle y6 above no", "position"),
        ("yes", "exists"),
        ("no", "exists"),
        ("circle x1 y5", "place"),
        ("square x6 y1", "place"),
    ]
    said = [
        "red is it",
        "circle x1 square x6 left of yes",
        "circle x2 square x6 left of yes",
        "square y2 circle y6 above yes",
        "yes",
        "yes",
        "circle x1 y5",
        "square x6 y2",
    ]
    m = score_answers(said, truth)
    assert m["place_accuracy"] == 0.5  # scored apart: not in `accuracy`
    assert m["colour_accuracy"] == 0.0  # not a position answer: exact match only
    assert m["position_accuracy"] == 2 / 3  # wrong places, right verdict: right; right places, wrong verdict: wrong
    assert m["position_grounding_accuracy"] == 1 / 3
    assert m["accuracy"] == 3 / 6
    assert (m["pope_accuracy"], m["pope_yes_ratio"]) == (0.5, 1.0)
    assert "position_grounding_accuracy" not in score_answers(["yes"], [("yes", "position")])


def test_scenes_round_trip_through_json(scenes):
    import json

    for s in scenes[:12]:
        assert shapes.scene_from_dict(json.loads(json.dumps(shapes.scene_to_dict(s)))) == s


def test_the_shapes_source_renders_the_six_tasks_with_ten_colours():
    data = render_shapes(120, SIZE, 0, 2)
    assert data.images.shape == (120, SIZE, SIZE, 3) and all(len(c) == 2 for c in data.captions)
    colours = {c for caps in data.captions for c in shapes.COLOURS if f" {c} " in f" {caps[0]} "}
    assert len(colours) >= 8
