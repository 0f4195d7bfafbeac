"""The see-saw: understanding and generation scores of the same model across its checkpoints
(native multimodal training trades one against the other), drawn as one PNG."""

from __future__ import annotations

import io

# The headline metric of each suite: what the see-saw follows.
HEADLINE = {
    "m2t.digits": "m2t.digits.accuracy",
    "m2g.digits": "m2g.digits.accuracy",
    "m2t.shapes_vqa": "m2t.shapes_vqa.accuracy",
    "m2g.shapes_geneval": "m2g.shapes_geneval.overall",
}


def headlines(suites: list[str]) -> list[str]:
    return [HEADLINE[s] for s in suites if s in HEADLINE]


def plot(points: dict[int, dict[str, float]], metrics: list[str], title: str) -> bytes:
    """points: step → {metric: value}. Understanding (m2t) solid, generation (m2g) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(points)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for m in metrics:
        ys = [points[s].get(m) for s in steps]
        style = "-o" if m.startswith("m2t") else "--s"
        ax.plot(steps, ys, style, label=f"{m} ({'understanding' if m.startswith('m2t') else 'generation'})")
    ax.set_xlabel("training step")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
