"""Procedural scenes covering GenEval's six tasks, with captions, prompts and VQA pairs.

Objects are flat shapes (circle, square, triangle) in GenEval's ten colours on a grey ground.
Tasks: single_object, two_object, counting (2–4), colors, position (left of / right of / above /
below) and color_attr. Every scene keeps its ground truth (objects with boxes), so the same record
drives rendering, captions, VQA pairs and the judge's expectations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.65, 0.15),
    "blue": (0.10, 0.25, 0.90),
    "purple": (0.55, 0.15, 0.70),
    "pink": (1.00, 0.60, 0.80),
    "brown": (0.50, 0.30, 0.10),
    "black": (0.00, 0.00, 0.00),
    "white": (1.00, 1.00, 1.00),
}
BACKGROUND = (0.5, 0.5, 0.5)
SHAPES = ("circle", "square", "triangle")
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
GRID = 8  # grounded answers place each object on a GRID × GRID grid over the image
NUMBERS = {2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cx: float
    cy: float
    size: int  # side of the bounding square, pixels

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    task: str
    prompt: str
    # What the prompt asks for (the judge's expectation): shapes, colours, count, relation.
    include: tuple[dict, ...]
    relation: str | None
    objects: tuple[Obj, ...] = field(default=())


def _mask(shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c = size / 2
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= c**2
    return np.abs(xx - c) <= yy / 2  # triangle, apex up


def paint(canvas: np.ndarray, objects: tuple[Obj, ...], value) -> np.ndarray:
    """Each object's pixels of `canvas` (H, W, …) set to `value(object)`, in order (later ones on
    top); returns `canvas`."""
    for o in objects:
        m = _mask(o.shape, o.size)
        y0, x0 = int(round(o.cy - o.size / 2)), int(round(o.cx - o.size / 2))
        region = canvas[y0 : y0 + o.size, x0 : x0 + o.size]
        region[m[: region.shape[0], : region.shape[1]]] = value(o)
    return canvas


def render(objects: tuple[Obj, ...], image_size: int) -> np.ndarray:
    img = np.empty((image_size, image_size, 3), np.float32)
    img[:] = BACKGROUND
    return paint(img, objects, lambda o: COLOURS[o.colour])


def _place(rng, n: int, image_size: int, size: int, tries: int = 200) -> list[tuple[float, float]] | None:
    """n non-overlapping centres (with a gap of at least one pixel) inside the image.

    Boxes sit on a lattice of half the object size, so a patch tokenizer of that patch size sees
    whole object quarters and a small codebook reconstructs every scene exactly."""
    out: list[tuple[float, float]] = []
    step = size // 2
    slots = (image_size - size) // step + 1
    for _ in range(tries):
        if len(out) == n:
            break
        x0, y0 = (int(v) * step for v in rng.integers(0, slots, 2))
        c = (x0 + size / 2, y0 + size / 2)
        if all(max(abs(c[0] - p[0]), abs(c[1] - p[1])) >= size + 1 for p in out):
            out.append(c)
    return out if len(out) == n else None


def _plural(shape: str) -> str:
    return shape + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_scene(task: str, rng: np.random.Generator, image_size: int) -> Scene:
    size = max(6, image_size // 4)
    colours, shapes = list(COLOURS), list(SHAPES)
    pick = lambda seq: seq[int(rng.integers(len(seq)))]
    if task == "single_object":
        s = pick(shapes)
        spec, prompt, rel = [{"shape": s, "count": 1}], f"a photo of {_article(s)} {s}", None
        objs = [(s, pick(colours))]
    elif task == "two_object":
        a, b = rng.choice(shapes, 2, replace=False)
        spec, prompt, rel = (
            [{"shape": a, "count": 1}, {"shape": b, "count": 1}],
            f"a photo of {_article(a)} {a} and {_article(b)} {b}",
            None,
        )
        objs = [(a, pick(colours)), (b, pick(colours))]
    elif task == "counting":
        s, n = pick(shapes), int(rng.integers(2, 5))
        colour = pick(colours)
        spec, prompt, rel = [{"shape": s, "count": n}], f"a photo of {NUMBERS[n]} {_plural(s)}", None
        objs = [(s, colour)] * n
    elif task == "colors":
        s, c = pick(shapes), pick(colours)
        spec, prompt, rel = [{"shape": s, "count": 1, "colour": c}], f"a photo of {_article(c)} {c} {s}", None
        objs = [(s, c)]
    elif task == "position":
        a, b = rng.choice(shapes, 2, replace=False)
        rel = pick(list(RELATIONS))
        spec, prompt = (
            [{"shape": a, "count": 1}, {"shape": b, "count": 1}],
            f"a photo of {_article(a)} {a} {rel} {_article(b)} {b}",
        )
        objs = [(a, pick(colours)), (b, pick(colours))]
    elif task == "color_attr":
        a, b = rng.choice(shapes, 2, replace=False)
        ca, cb = rng.choice(colours, 2, replace=False)
        spec = [{"shape": a, "count": 1, "colour": ca}, {"shape": b, "count": 1, "colour": cb}]
        prompt, rel = f"a photo of {_article(ca)} {ca} {a} and {_article(cb)} {cb} {b}", None
        objs = [(a, ca), (b, cb)]
    else:
        raise ValueError(f"unknown GenEval task {task!r}")
    while True:
        centres = _place(rng, len(objs), image_size, size)
        if centres is None:
            continue
        placed = tuple(Obj(s, c, x, y, size) for (s, c), (x, y) in zip(objs, centres))
        if rel is None or relation_holds(placed[0].box, placed[1].box, rel):
            return Scene(task, prompt, tuple(spec), rel, placed)


def relation_holds(box_a, box_b, relation: str, threshold: float = 0.1) -> bool:
    """GenEval's rule: centre offsets, shrunk by `threshold` × the boxes' summed extents,
    must point the asked way (image y grows downwards)."""
    ca = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    cb = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    dims = ((box_a[2] - box_a[0]) + (box_b[2] - box_b[0]), (box_a[3] - box_a[1]) + (box_b[3] - box_b[1]))
    off = [ca[i] - cb[i] for i in range(2)]
    rev = [np.sign(off[i]) * max(abs(off[i]) - threshold * dims[i], 0.0) for i in range(2)]
    return {"left of": rev[0] < 0, "right of": rev[0] > 0, "above": rev[1] < 0, "below": rev[1] > 0}[relation]


def captions(scene: Scene) -> list[str]:
    """Paraphrases of the scene for captioning (M2T) and generation (M2G) training."""
    base = scene.prompt.removeprefix("a photo of ")
    return [f"a photo of {base}", base, f"an image showing {base}"]


def coordinate(o: Obj, image_size: int, axis: str) -> str:
    """Where an object sits on one axis, as a grounded answer says it: "x<column>" or "y<row>" of
    its centre on the image's GRID × GRID grid (with 4-pixel patches on a 32-pixel image, the
    patch it is in)."""
    centre = o.cx if axis == "x" else o.cy
    return f"{axis}{min(int(centre // (image_size / GRID)), GRID - 1)}"


def layout(scene: Scene, image_size: int) -> str:
    """The scene's layout in words, what a drawing plan says before the image: each object's
    colour, shape and the grid cell of its centre, in the scene's order (the prompt's) —
    "red triangle x1 y5 blue square x6 y1"."""
    return " ".join(" ".join(placement(o, image_size)) for o in scene.objects)


def placement(o: Obj, image_size: int) -> tuple[str, str, str, str]:
    """One object's words in a layout: colour, shape and the grid cell of its centre."""
    return o.colour, o.shape, coordinate(o, image_size, "x"), coordinate(o, image_size, "y")


def from_layout(text: str, image_size: int) -> tuple[Obj, ...] | None:
    """The objects a layout (as `layout` writes it) places, each centred at the start of its
    grid cell at the size scenes use; None when the text is not a layout."""
    words, cell, size = text.split(), image_size / GRID, max(6, image_size // 4)
    if not words or len(words) % 4:
        return None
    out = []
    for colour, shape, x, y in zip(*[iter(words)] * 4):
        cells = [c[1:] for c, axis in ((x, "x"), (y, "y")) if c[:1] == axis and c[1:].isdigit() and int(c[1:]) < GRID]
        if colour not in COLOURS or shape not in SHAPES or len(cells) != 2:
            return None
        out.append(Obj(shape, colour, int(cells[0]) * cell, int(cells[1]) * cell, size))
    return tuple(out)


def vqa_pairs(scene: Scene, rng: np.random.Generator, grounded_on: int | None = None) -> list[tuple[str, str, str]]:
    """(question, answer, kind) triples with ground-truth answers. Kinds: `colour`, `count`,
    `position` (a horizontal and a vertical relation, each direction picked at random, so yes
    and no are balanced) and `exists`: one probe
    for a shape that is there and one for a shape that is not (POPE-style, to measure
    hallucination).
    `grounded_on` (the image's side): a position answer first places both objects on the asked
    axis, says the relation that holds there ("level": neither), then gives the verdict — "is
    the circle right of the square?" → "circle x1 square x6 left of no" — so each word the
    model writes is one reading or one comparison (Shikra-style grounded answers). Each axis is
    then asked both ways, and `place` pairs ask where each shape the scene has once is: "where
    is the circle?" → "circle x1 y5"."""
    objs = scene.objects
    first = objs[0]
    pairs = [
        (f"what colour is the {first.shape}?", first.colour, "colour"),
        (f"how many {_plural(first.shape)} are there?", str(sum(o.shape == first.shape for o in objs)), "count"),
    ]
    if len(objs) >= 2 and objs[0].shape != objs[1].shape:
        a, b = objs[0], objs[1]
        for axis, name in ((RELATIONS[:2], "x"), (RELATIONS[2:], "y")):  # one horizontal and one vertical question
            drawn = axis[int(rng.integers(2))]
            work = ""  # grounded: the places on this axis and the relation that holds there
            if grounded_on is not None:
                shown = next((r for r in axis if relation_holds(a.box, b.box, r)), "level")
                places = f"{a.shape} {coordinate(a, grounded_on, name)} {b.shape} {coordinate(b, grounded_on, name)}"
                work = f"{places} {shown} "
            for rel in (drawn,) if grounded_on is None else (drawn, INVERSE[drawn]):
                answer = "yes" if relation_holds(a.box, b.box, rel) else "no"
                pairs.append((f"is the {a.shape} {rel} the {b.shape}?", work + answer, "position"))
    present = {o.shape for o in objs}
    absent = [s for s in SHAPES if s not in present]
    pairs.append((f"is there {_article(first.shape)} {first.shape}?", "yes", "exists"))
    if absent:
        s = absent[int(rng.integers(len(absent)))]
        pairs.append((f"is there {_article(s)} {s}?", "no", "exists"))
    if grounded_on is not None:
        named = [o.shape for o in objs]
        pairs += [
            (
                f"where is the {o.shape}?",
                f"{o.shape} {coordinate(o, grounded_on, 'x')} {coordinate(o, grounded_on, 'y')}",
                "place",
            )
            for o in objs
            if named.count(o.shape) == 1
        ]
    return pairs


def verdict(answer: str) -> str:
    """A (possibly grounded) answer's last word: what it says to the question."""
    words = answer.split()
    return words[-1] if words else ""


def scene_to_dict(scene: Scene) -> dict:
    return asdict(scene)


def check_scene(d) -> None:
    """Raise ValueError unless `d` is a scene as scene_to_dict writes it (a user's ground truth is
    checked here, before a judge reads it)."""
    if not isinstance(d, dict) or d.get("task") not in TASKS or not isinstance(d.get("prompt"), str):
        raise ValueError("needs task (one of the six) and prompt")
    if d.get("relation") not in (None, *RELATIONS) or not isinstance(d.get("include"), (list, tuple)):
        raise ValueError("needs include (a list) and relation (null or one of the four)")
    objects = d.get("objects")
    if not isinstance(objects, (list, tuple)) or not 1 <= len(objects) <= 16:
        raise ValueError("needs 1 to 16 objects")
    for o in objects:
        if not isinstance(o, dict) or set(o) != {"shape", "colour", "cx", "cy", "size"}:
            raise ValueError("each object has exactly shape, colour, cx, cy, size")
        if o["shape"] not in SHAPES or o["colour"] not in COLOURS:
            raise ValueError(f"unknown shape or colour {o['shape']!r}, {o['colour']!r}")
        if not all(
            isinstance(o[k], (int, float)) and not isinstance(o[k], bool) and 0 <= o[k] <= 4096
            for k in ("cx", "cy", "size")
        ):
            raise ValueError("cx, cy, size are numbers in 0..4096")


def scene_from_dict(d: dict) -> Scene:
    return Scene(
        task=d["task"],
        prompt=d["prompt"],
        include=tuple(d["include"]),
        relation=d["relation"],
        objects=tuple(Obj(**o) for o in d["objects"]),
    )


INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def parse_colour_shape(text: str) -> tuple[str, str]:
    """ "red circle" → ("red", "circle"); ValueError naming what is known otherwise."""
    words = text.split()
    if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
        raise ValueError(
            f"{text!r}: expected '<colour> <shape>', a colour of {list(COLOURS)} and a shape of {list(SHAPES)}"
        )
    return words[0], words[1]


def parse_position_pair(text: str) -> tuple[str, str, str]:
    """ "circle left of square" → ("circle", "left of", "square")."""
    for rel in RELATIONS:
        a, sep, b = text.partition(f" {rel} ")
        if sep and a in SHAPES and b in SHAPES and a != b:
            return a, rel, b
    raise ValueError(
        f"{text!r}: expected '<shape> <relation> <other shape>', shapes of {list(SHAPES)}, "
        f"relations of {list(RELATIONS)}"
    )


def held_out(scene: dict, colour_shape: set[tuple[str, str]], position_pairs: set[tuple[str, str, str]]) -> bool:
    """Whether a scene shows a held-out composition: an object of a held-out colour and shape
    (whatever the prompt says), or a held-out relation between two shapes (either way round:
    "circle left of square" is "square right of circle")."""
    if any((o["colour"], o["shape"]) in colour_shape for o in scene["objects"]):
        return True
    rel = scene.get("relation")
    if rel is None or len(scene["include"]) < 2:
        return False
    a, b = scene["include"][0]["shape"], scene["include"][1]["shape"]
    return (a, rel, b) in position_pairs or (b, INVERSE[rel], a) in position_pairs


def generate(samples: int, image_size: int, seed: int) -> list[Scene]:
    """`samples` scenes, the six tasks in turn."""
    rng = np.random.default_rng(seed)
    return [make_scene(TASKS[i % len(TASKS)], rng, image_size) for i in range(samples)]


def check_source(src) -> None:
    """The shapes kind's own options (nmm.data.kinds `check`): its held-out compositions name
    colours, shapes and relations the scenes have."""
    if src.held_out is None:
        return
    for name, alias, parse in (
        ("colour_shape", "colourShape", parse_colour_shape),
        ("position_pairs", "positionPairs", parse_position_pair),
    ):
        for text in getattr(src.held_out, name):
            try:
                parse(text)
            except ValueError as exc:
                raise ValueError(f"heldOut.{alias}: {exc}") from None


def held_out_predicate(held) -> Callable[[dict], bool]:
    """scene (dict) → whether it shows one of a source's held-out compositions (spec `heldOut`),
    the texts parsed once."""
    colour_shape = {parse_colour_shape(t) for t in held.colour_shape}
    pairs = {parse_position_pair(t) for t in held.position_pairs}
    return lambda scene: held_out(scene, colour_shape, pairs)
