"""Why position answers sat at chance (issue 15), and what fixed them: the nmm Transformer
trained on one kind of shapes question at a time (or a few, joined by +), nothing else in the
batch, against existence questions ("is there a circle?") as the baseline of what the same
model, data and budget can learn, in the same run.

    python benchmarks/position_vqa.py                                  # oracle tokens, grid positions
    python benchmarks/position_vqa.py --kinds column,column-shape-last --lr 1e-3
    python benchmarks/position_vqa.py --kinds grounded,compared --lr 1e-3
    python benchmarks/position_vqa.py --tokens vq --steps 1500
    python benchmarks/position_vqa.py --layout question-first --kinds position

`--tokens oracle` gives each 4×4 patch of a 32×32 scene one token naming the colour and shape of
the object covering most of it (a perfect composing tokenizer); `vq` the patch-VQ codes the
shapes workflows use (128 codes fitted on the training images). Kinds: `exists`, `position`
(nmm.data.shapes.vqa_pairs); `where`: "is the <shape> on the left ?" / "at the top ?" about one
object; `column`: "which column is the <shape> in ?" → "x<column>", and `column-shape-last`, the
same asked as "in which column is the <shape>" (both also report how often the answer names the
other object's column); `grounded`: the position questions answered with both places, then the
verdict ("circle x1 y5 square x6 y1 yes"); `compared`: the places on the asked axis, the relation
they show, then the verdict ("circle x1 square x6 left of no": data.positionAnswers: grounded,
which also asks both ways and adds place questions). Loss on the answer
tokens; accuracy: the whole answer exact on held-out scenes (every token the argmax given the
ones before, which is what greedy decoding says), and per answer token. Writes
benchmarks/results/position_vqa-<tokens>-<layout>-<kinds>-<steps>-lr<lr>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nmm.data import shapes
from nmm.model import ModelConfig
from nmm.model.transformer import Transformer
from nmm.tokenizers.image import PatchVQ

SIDE, PATCH = 32, 4
GRID = SIDE // PATCH
PAD, BOS, BOI, EOI = 0, 1, 2, 3


def scenes_with_two_shapes(n: int, seed: int) -> list[shapes.Scene]:
    rng = np.random.default_rng(seed)
    return [shapes.make_scene(t, rng, SIDE) for t in ("two_object", "position", "color_attr") * (n // 3)]


def oracle_codes(scenes: list[shapes.Scene]) -> tuple[np.ndarray, int]:
    """Per patch: 1 + colour × shape of the object covering most of its pixels, 0 for background."""
    colours, kinds = list(shapes.COLOURS), list(shapes.SHAPES)
    codes = np.zeros((len(scenes), GRID * GRID), np.int64)
    for i, s in enumerate(scenes):
        label = shapes.paint(
            np.zeros((SIDE, SIDE), np.int64),
            s.objects,
            lambda o: 1 + colours.index(o.colour) * len(kinds) + kinds.index(o.shape),
        )
        for p in range(GRID * GRID):
            block = label[
                (p // GRID) * PATCH : (p // GRID + 1) * PATCH, (p % GRID) * PATCH : (p % GRID + 1) * PATCH
            ].ravel()
            covered = block[block > 0]
            codes[i, p] = np.bincount(covered).argmax() if len(covered) else 0
    return codes, 1 + len(colours) * len(kinds)


def where_pairs(scene: shapes.Scene) -> list[tuple[str, str, str]]:
    return [
        q
        for o in scene.objects[:2]
        for q in (
            (f"is the {o.shape} on the left ?", "yes" if o.cx < SIDE / 2 else "no", "where"),
            (f"is the {o.shape} at the top ?", "yes" if o.cy < SIDE / 2 else "no", "where"),
        )
    ]


def column_pairs(scene: shapes.Scene, shape_last: bool) -> list[tuple[str, str, str]]:
    """Which patch column an object's centre is in, asked with the shape as the question's last
    word ("in which column is the circle") or not ("which column is the circle in ?")."""
    ask = "in which column is the {}" if shape_last else "which column is the {} in ?"
    return [
        (ask.format(o.shape), f"x{int(o.cx) // PATCH}", "column-shape-last" if shape_last else "column")
        for o in scene.objects[:2]
    ]


def other_column(scene: shapes.Scene, question: str) -> str:
    """The column of the object the question does not ask about (the wrong answer to watch for)."""
    (other,) = [o for o in scene.objects[:2] if o.shape not in question.split()]
    return f"x{int(other.cx) // PATCH}"


def grounded_pairs(scene: shapes.Scene, rng) -> list[tuple[str, str, str]]:
    """Position questions answered through the two objects' patch coordinates, each named first:
    "is the circle left of the square?" → "circle x2 y5 square x6 y1 yes"."""
    by = {o.shape: o for o in scene.objects}
    out = []
    for q, a, kind in shapes.vqa_pairs(scene, rng):
        if kind == "position":
            words = q.rstrip("?").split()
            where = " ".join(
                f"{o.shape} x{int(o.cx) // PATCH} y{int(o.cy) // PATCH}" for o in (by[words[2]], by[words[-1]])
            )
            out.append((q, f"{where} {a}", "grounded"))
    return out


def compared_pairs(scene: shapes.Scene, rng) -> list[tuple[str, str, str]]:
    """The position questions of `position`, answered as data.positionAnswers: grounded answers
    them (the places on the asked axis, the relation they show, then the verdict: "is the circle
    right of the square?" → "circle x1 square x6 left of no"); without that mode's extra
    questions (the other way round, "where is …?"), so the rows are `position`'s."""
    grounded = dict((q, a) for q, a, _ in shapes.vqa_pairs(scene, copy.deepcopy(rng), grounded_on=SIDE))
    return [(q, grounded[q], "compared") for q, _, kind in shapes.vqa_pairs(scene, rng) if kind == "position"]


PAIRS = {
    "where": lambda s, rng: where_pairs(s),
    "column": lambda s, rng: column_pairs(s, shape_last=False),
    "column-shape-last": lambda s, rng: column_pairs(s, shape_last=True),
    "grounded": grounded_pairs,
    "compared": compared_pairs,
}


def run(kinds: str, scenes, codes, n_codes: int, args) -> dict:
    """Train a fresh model on the `kinds` ("a+b": one model on both) of questions about the
    training scenes; per kind, exact-match accuracy of the whole answer on held-out scenes (every
    answer token the argmax, given the ones before: what greedy decoding would say)."""
    rng = np.random.default_rng(1)
    rows = []
    for i, s in enumerate(scenes):
        for kind in kinds.split("+"):
            pairs = PAIRS[kind](s, rng) if kind in PAIRS else [p for p in shapes.vqa_pairs(s, rng) if p[2] == kind]
            rows += [(i, q.replace("?", " ?").split(), a.split(), kind) for q, a, _ in pairs]
    # column questions: the other object's column, to tell a misread place from a wrong object
    alt = [other_column(scenes[i], " ".join(q)) if k.startswith("column") else None for i, q, _, k in rows]
    words = sorted({w for _, q, a, _ in rows for w in q + a})
    ids = {w: 4 + j for j, w in enumerate(words)}
    image_lo = 4 + len(words)
    answer_len = max(len(a) for _, _, a, _ in rows)
    length = max(len(q) for _, q, _, _ in rows) + GRID * GRID + 3 + answer_len
    x = np.full((len(rows), length), PAD, np.int64)
    y = np.full((len(rows), length), -100, np.int64)
    image, kind_of = np.zeros(len(rows), np.int64), np.array([k for *_, k in rows])
    for r, (i, q, a, _) in enumerate(rows):
        img = [BOI] + [image_lo + int(c) for c in codes[i]] + [EOI]
        seq = [BOS] + ([ids[w] for w in q] + img if args.layout == "question-first" else img + [ids[w] for w in q])
        ans = [ids[w] for w in a]
        x[r, : len(seq) + len(ans)] = seq + ans
        y[r, len(seq) - 1 : len(seq) - 1 + len(ans)] = ans
        image[r] = i
    train, test = np.where(image < args.train_scenes)[0], np.where(image >= args.train_scenes)[0]
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=image_lo + n_codes,
        dim=args.dim,
        layers=args.layers,
        heads=4,
        max_seq_len=length,
        image_positions=args.positions,
        image_lo=image_lo,
        image_hi=image_lo + n_codes,
        tokens_per_image=GRID * GRID,
    )
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def correct(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(len(idx), answer_len): each answer token the argmax given the ones before (True past
        a shorter answer's end); and (len(idx),) the argmax for the first answer token."""
        model.eval()
        out, said = [], []
        with torch.no_grad():
            for s in range(0, len(idx), 512):
                b = torch.from_numpy(idx[s : s + 512])
                target = yt[b]
                guess = model(xt[b]).argmax(-1)
                hit = (guess == target) | (target < 0)
                first = (target >= 0).int().argmax(1)
                cols = (first[:, None] + torch.arange(answer_len)).clamp(max=length - 1)
                out.append(hit.gather(1, cols).numpy())
                said.append(guess.gather(1, first[:, None])[:, 0].numpy())
        model.train()
        return np.concatenate(out), np.concatenate(said)

    def by_kind(idx: np.ndarray, per_token: bool = False) -> dict:
        hit, _ = correct(idx)
        sel = {k: kind_of[idx] == k for k in kinds.split("+")}
        if per_token:
            return {k: [round(float(v), 4) for v in hit[m].mean(0)] for k, m in sel.items()}
        return {k: round(float(hit[m].all(1).mean()), 4) for k, m in sel.items()}

    g = torch.Generator().manual_seed(0)
    curve, t0 = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 100) * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        b = torch.from_numpy(train)[torch.randint(len(train), (args.batch,), generator=g)]
        loss = F.cross_entropy(model(xt[b]).flatten(0, 1), yt[b].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % max(1, args.steps // 5) == 0:
            curve.append({"step": step, "loss": round(loss.item(), 4), "test_accuracy": by_kind(test)})
            print(
                f"  {kinds:9s} step {step:5d} loss {loss.item():.3f} held-out accuracy {curve[-1]['test_accuracy']}",
                flush=True,
            )
    first = {
        k: Counter(tuple(rows[r][2]) for r in test if kind_of[r] == k).most_common(1)[0][1]
        / int((kind_of[test] == k).sum())
        for k in kinds.split("+")
    }
    _, said = correct(test)
    watched = np.array([alt[r] is not None for r in test], bool)
    other = (
        float(np.mean([said[j] == ids[alt[r]] for j, r in enumerate(test) if watched[j]])) if watched.any() else None
    )
    return {
        "kinds": kinds,
        "train_rows": len(train),
        "test_rows": len(test),
        "names_the_other_object": None if other is None else round(other, 4),
        "majority_answer_share": {k: round(v, 4) for k, v in first.items()},
        "test_accuracy": curve[-1]["test_accuracy"],
        "token_accuracy": by_kind(test, per_token=True),
        "curve": curve,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", choices=("oracle", "vq"), default="oracle")
    p.add_argument("--positions", choices=("grid", "sequence"), default="grid")
    p.add_argument("--layout", choices=("image-first", "question-first"), default="image-first")
    p.add_argument(
        "--kinds",
        default="exists,where,position",
        help="comma-separated runs, each one kind or several joined by +: exists, where, position, column, "
        "column-shape-last, grounded, compared",
    )
    p.add_argument("--scenes", type=int, default=7200)
    p.add_argument("--train-scenes", type=int, default=6000)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    scenes = scenes_with_two_shapes(args.scenes, seed=0)
    if args.tokens == "vq":
        images = np.stack([shapes.render(s.objects, SIDE) for s in scenes])
        vq = PatchVQ.fit(images[: args.train_scenes], PATCH, 128, seed=0)
        codes, n_codes = vq.encode(images), 128
    else:
        codes, n_codes = oracle_codes(scenes)
    print(f"{args.tokens} tokens, {args.positions} positions, {args.layout}, {args.steps} steps of {args.batch}")
    results = [run(kind, scenes, codes, n_codes, args) for kind in args.kinds.split(",")]
    out = {"machine": platform.processor() or platform.machine(), "config": vars(args), "results": results}
    name = f"{args.tokens}-{args.layout}-{args.kinds.replace(',', '_')}-{args.steps}-lr{args.lr:g}"
    path = Path(__file__).parent / "results" / f"position_vqa-{name}.json"
    path.write_text(json.dumps(out, indent=2))
    for r in results:
        for k, acc in r["test_accuracy"].items():
            print(
                f"{r['kinds']}: {k:9s} held-out accuracy {acc:.3f} "
                f"(majority answer {r['majority_answer_share'][k]:.3f}; "
                f"{r['train_rows']} training rows, {r['seconds']} s)"
            )
            if r["names_the_other_object"] is not None:
                print(f"  answers naming the other object's column: {r['names_the_other_object']:.3f}")
            if len(r["token_accuracy"][k]) > 1:
                print(f"  per answer token: {r['token_accuracy'][k]}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
