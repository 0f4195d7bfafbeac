"""The shapes suites: generation and understanding of the same held-out scenes.

- `m2g.shapes_geneval.*`: draw an image for each held-out scene's prompt; the GenEval-style judge
  (nmm.evaluate.shapes_judge) scores it from pixels; overall = mean of the six task columns.
  A model that writes a plan before it draws (data.drawPlans) is also scored on its plans:
  `plan_overall` judges each plan's layout rendered (what a drawing that follows the plan
  exactly would score), `plan_followed` the share of drawings whose objects are their plan's.
- `m2t.shapes_vqa.*`: answer each held-out image's questions (greedy); exact match (a grounded
  position answer: its verdict, and `position_grounding_accuracy` the whole answer; "where is
  the circle?" pairs: `place_accuracy`, outside `accuracy`). POPE: the
  yes/no existence probes, with "yes" as the positive class (F1, accuracy, share of "yes").
"""

from __future__ import annotations

import numpy as np

from nmm.data import shapes
from nmm.data.sequences import Prompts
from nmm.evaluate import shapes_judge
from nmm.evaluate.draw import draw_planned
from nmm.model.generate import generate
from nmm.tokenizers import ImageTokenizer, TextTokenizer
from nmm.tokenizers.vocab import EOS


def pick_scenes(scenes: list[dict], per_task: int) -> list[int]:
    """The first `per_task` scenes of each GenEval task, in split order (deterministic)."""
    taken: dict[str, int] = {}
    out = []
    for i, s in enumerate(scenes):
        if taken.get(s["task"], 0) < per_task:
            taken[s["task"]] = taken.get(s["task"], 0) + 1
            out.append(i)
    return out


def geneval(
    model,
    prompts: Prompts,
    text: TextTokenizer,
    vq: ImageTokenizer,
    scenes: list[shapes.Scene],
    temperature: float,
    guidance: float,
    seed: int,
) -> tuple[dict[str, float], np.ndarray, list[str]]:
    """The metrics, the images drawn and the plans written before them ("" without plans)."""
    images, plans = draw_planned(model, prompts, text, vq, [s.prompt for s in scenes], temperature, seed, guidance)
    scores = shapes_judge.evaluate(scenes, images)
    if prompts.plans:
        scores |= plan_scores(scenes, images, plans)
    return {f"m2g.shapes_geneval.{k}": v for k, v in scores.items()}, images, plans


def plan_scores(scenes: list[shapes.Scene], images: np.ndarray, plans: list[str]) -> dict[str, float]:
    """`plan_overall`: the judge's overall on each plan's layout rendered (a plan that is not a
    layout fails); `plan_followed`: the share of images whose detected (colour, shape, grid cell)
    objects are exactly their plan's."""
    side = images.shape[1]
    laid = [shapes.from_layout(p, side) for p in plans]
    rendered = np.stack([shapes.render(objs or (), side) for objs in laid])
    ok = np.array([objs is not None for objs in laid])
    by_task = {t: [] for t in shapes.TASKS}
    for sc, good, judged in zip(scenes, ok, (shapes_judge.score(sc, r) for sc, r in zip(scenes, rendered))):
        by_task[sc.task].append(bool(good and judged))
    followed = [
        objs is not None and shapes_judge.placements(image) == sorted(shapes.placement(o, side) for o in objs)
        for objs, image in zip(laid, images)
    ]
    return {
        "plan_overall": float(np.mean([np.mean(v) for v in by_task.values() if v])),
        "plan_followed": float(np.mean(followed)),
    }


def vqa(
    model,
    prompts: Prompts,
    text: TextTokenizer,
    codes: np.ndarray,
    questions: list[list[list[str]]],
    patches: np.ndarray | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """`questions[i]`: image i's (question, answer, kind) triples; `patches`: raw pixels for
    mid/late fusion."""
    asked = [(i, q, a, kind) for i, qs in enumerate(questions) for q, a, kind in qs]
    vocab = prompts.vocab
    pix = None if patches is None else patches[[i for i, *_ in asked]]
    asks = [prompts.question(codes[i], text.encode(q)) for i, q, _, _ in asked]
    longest = max((len(text.encode(a)) for *_, a, _ in asked), default=0)
    outs = generate(
        model, asks, max_new=longest + 4, allowed=vocab.text_range(), stop=EOS, extra_allowed=(EOS,), patches=pix
    )
    said = [text.decode(vocab.text_local(o)).strip() for o in outs]
    m = score_answers(said, [(a, kind) for _, _, a, kind in asked])
    examples = [{"question": q, "answer": a, "said": s} for (_, q, a, _), s in zip(asked[:40], said)]
    return {f"m2t.shapes_vqa.{k}": v for k, v in m.items()}, examples


def score_answers(said: list[str], truth: list[tuple[str, str]]) -> dict[str, float]:
    """The VQA metrics of answers `said` against (answer, kind) pairs: exact match, except that a
    grounded position answer ("circle x1 square x6 left of yes") is right when its verdict is
    (`position_grounding_accuracy`: the whole answer exact, when there are grounded ones);
    `place` pairs ("where is the circle?") only in `place_accuracy`, not in `accuracy`; POPE
    over the `exists` probes, "yes" the positive class."""
    exact = np.array([s == a for s, (a, _) in zip(said, truth)], bool)
    kinds = np.array([k for _, k in truth])
    verdict_right = np.array([shapes.verdict(s) == shapes.verdict(a) for s, (a, _) in zip(said, truth)], bool)
    right = np.where(kinds == "position", verdict_right, exact)
    asked = kinds != "place"  # the questions; "where is the circle?" is grounding practice, scored apart
    m = {"accuracy": float(right[asked].mean()) if asked.any() else 0.0}
    for kind in ("colour", "count", "position"):
        sel = kinds == kind
        m[f"{kind}_accuracy"] = float(right[sel].mean()) if sel.any() else 0.0
    grounded = (kinds == "position") & np.array([len(a.split()) > 1 for a, _ in truth], bool)
    if grounded.any():
        m["position_grounding_accuracy"] = float(exact[grounded].mean())
    if (kinds == "place").any():
        m["place_accuracy"] = float(exact[kinds == "place"].mean())
    probe = kinds == "exists"
    yes = np.array([a == "yes" for a, _ in truth], bool)[probe]
    pred = np.array([s == "yes" for s in said], bool)[probe]
    tp = float((yes & pred).sum())
    precision = tp / max(pred.sum(), 1)
    recall = tp / max(yes.sum(), 1)
    m["pope_f1"] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    m["pope_accuracy"] = float((yes == pred).mean()) if len(yes) else 0.0
    m["pope_yes_ratio"] = float(pred.mean()) if len(pred) else 0.0
    return m
