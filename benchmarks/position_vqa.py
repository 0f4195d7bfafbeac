"""Why position answers sit at chance (issue 15): the nmm Transformer trained on ONE kind of shapes
question at a time, with nothing else in the batch, against existence questions ("is there a
circle?") as the baseline of what the same model, data and budget can learn, in the same run.

    python benchmarks/position_vqa.py                                  # oracle tokens, grid positions
    python benchmarks/position_vqa.py --tokens vq --steps 1500
    python benchmarks/position_vqa.py --layout question-first --kinds position

`--tokens oracle` gives each 4×4 patch of a 32×32 scene one token naming the colour and shape of
the object covering most of it (a perfect composing tokenizer); `vq` the patch-VQ codes the
shapes workflows use (128 codes fitted on the training images). Questions come from
`nmm.data.shapes.vqa_pairs`; `where` adds "is the <shape> on the left ?" / "at the top ?" about one
object (an absolute position, no comparison). Loss and accuracy on the yes/no answer only,
held-out scenes. Prints accuracy per kind and writes
benchmarks/results/position_vqa-<tokens>-<layout>-<steps>-lr<lr>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
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
        label = shapes.paint(np.zeros((SIDE, SIDE), np.int64), s.objects,
                             lambda o: 1 + colours.index(o.colour) * len(kinds) + kinds.index(o.shape))
        for p in range(GRID * GRID):
            block = label[(p // GRID) * PATCH : (p // GRID + 1) * PATCH, (p % GRID) * PATCH : (p % GRID + 1) * PATCH].ravel()
            covered = block[block > 0]
            codes[i, p] = np.bincount(covered).argmax() if len(covered) else 0
    return codes, 1 + len(colours) * len(kinds)


def where_pairs(scene: shapes.Scene) -> list[tuple[str, str, str]]:
    return [q for o in scene.objects[:2] for q in (
        (f"is the {o.shape} on the left ?", "yes" if o.cx < SIDE / 2 else "no", "where"),
        (f"is the {o.shape} at the top ?", "yes" if o.cy < SIDE / 2 else "no", "where"))]


def run(kind: str, scenes, codes, n_codes: int, args) -> dict:
    """Train a fresh model on `kind` questions of the training scenes; accuracy on held-out ones."""
    rng = np.random.default_rng(1)
    rows = []
    for i, s in enumerate(scenes):
        pairs = where_pairs(s) if kind == "where" else [p for p in shapes.vqa_pairs(s, rng) if p[2] == kind]
        rows += [(i, q.replace("?", " ?").split(), a) for q, a, _ in pairs]
    words = sorted({w for _, q, a in rows for w in q + [a]})
    ids = {w: 4 + j for j, w in enumerate(words)}
    image_lo = 4 + len(words)
    length = max(len(q) for _, q, _ in rows) + GRID * GRID + 3
    x = np.full((len(rows), length), PAD, np.int64)
    last, answer, image = np.zeros(len(rows), np.int64), np.zeros(len(rows), np.int64), np.zeros(len(rows), np.int64)
    for r, (i, q, a) in enumerate(rows):
        img = [BOI] + [image_lo + int(c) for c in codes[i]] + [EOI]
        seq = [BOS] + ([ids[w] for w in q] + img if args.layout == "question-first" else img + [ids[w] for w in q])
        x[r, : len(seq)], last[r], answer[r], image[r] = seq, len(seq) - 1, ids[a], i
    train, test = np.where(image < args.train_scenes)[0], np.where(image >= args.train_scenes)[0]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=image_lo + n_codes, dim=args.dim, layers=args.layers, heads=4, max_seq_len=length,
                      image_positions=args.positions, image_lo=image_lo, image_hi=image_lo + n_codes,
                      tokens_per_image=GRID * GRID)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    xt, at, lt = torch.from_numpy(x), torch.from_numpy(answer), torch.from_numpy(last)
    yes, no = ids["yes"], ids["no"]

    def accuracy(idx: np.ndarray) -> float:
        model.eval()
        right = 0
        with torch.no_grad():
            for s in range(0, len(idx), 512):
                b = torch.from_numpy(idx[s : s + 512])
                logits = model(xt[b])[torch.arange(len(b)), lt[b]][:, [no, yes]]
                right += int((logits.argmax(1) == (at[b] == yes).long()).sum())
        model.train()
        return right / len(idx)

    g = torch.Generator().manual_seed(0)
    curve, t0 = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 100) * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        b = torch.from_numpy(train)[torch.randint(len(train), (args.batch,), generator=g)]
        loss = F.cross_entropy(model(xt[b])[torch.arange(args.batch), lt[b]], at[b])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % max(1, args.steps // 5) == 0:
            curve.append({"step": step, "loss": round(loss.item(), 4), "test_accuracy": round(accuracy(test), 4)})
            acc = curve[-1]["test_accuracy"]
            print(f"  {kind:9s} step {step:5d} loss {loss.item():.3f} held-out accuracy {acc:.3f}", flush=True)
    majority = max(np.mean(answer[test] == yes), np.mean(answer[test] == no))
    return {"kind": kind, "train_rows": len(train), "test_rows": len(test), "majority_answer_share": round(float(majority), 4),
            "test_accuracy": curve[-1]["test_accuracy"], "curve": curve, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", choices=("oracle", "vq"), default="oracle")
    p.add_argument("--positions", choices=("grid", "sequence"), default="grid")
    p.add_argument("--layout", choices=("image-first", "question-first"), default="image-first")
    p.add_argument("--kinds", default="exists,where,position", help="comma-separated yes/no kinds: exists, where, position")
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
    path = Path(__file__).parent / "results" / f"position_vqa-{args.tokens}-{args.layout}-{args.steps}-lr{args.lr:g}.json"
    path.write_text(json.dumps(out, indent=2))
    for r in results:
        print(f"{r['kind']:9s} held-out accuracy {r['test_accuracy']:.3f} (majority answer {r['majority_answer_share']:.3f}; "
              f"{r['train_rows']} training rows, {r['seconds']} s)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
