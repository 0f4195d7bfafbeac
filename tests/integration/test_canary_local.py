"""The local canary against candidates that fail one task each (issue 27 item 1, R22): a model
whose context is too short for an image (every drawing refused — on main as it was, every
drawing a 500 nobody counted, and the canary promoted it at error rate 0.0), a server whose chat
fails, one whose streams break after their first token. Each is rolled back at its first step
with the reason; an identical, healthy candidate is promoted. The servers are small untrained
models: the probe compares the two versions, so equal noise is equal quality."""

from __future__ import annotations

import numpy as np
import pytest

from nmm.rollout import analysis, probe
from nmm.rollout.local_canary import LocalCanary, Step
from tests.serving_fixture import publish_small_model

pytestmark = pytest.mark.integration

STEPS = [Step(50, 2.0), Step(100, 1.0)]
LIMITS = analysis.Limits(
    max_error_rate=0.02,
    max_p95_latency_ms=20_000,
    max_time_to_first_token_ms=20_000,
    min_requests=5,
    max_quality_drop=0.05,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("canary-local")
    publish_small_model((tmp / "stable").as_uri())
    publish_small_model((tmp / "short").as_uri(), max_seq_len=20)  # reads an image (19 tokens), has no room to draw one
    return tmp


def cases() -> probe.Cases:
    from nmm.data.sources import load_digits

    d = load_digits(1)
    pixels = (d.images * 255).round().astype(np.uint8)
    chat = [
        {"image": probe._data_url(pixels[i]), "question": None, "expect": {"digit": int(d.labels[i])}}
        for i in range(1500, 1508)
    ]
    draw = [
        {"prompt": f"a handwritten digit {k}", "expect": {"digit": k}, "temperature": 0.7, "guidance": 1.0}
        for k in range(6)
    ]
    return probe.Cases(chat, draw, pixels[:1000], d.labels[:1000])


def roll(models, tmp_path, candidate: str, env: dict | None = None):
    c = cases()
    canary = LocalCanary(
        (models / "stable").as_uri(),
        (models / candidate).as_uri(),
        STEPS,
        LIMITS,
        c,
        tmp_path / "work",
        prompts=[d["prompt"] for d in c.draw],
        env={"candidate": env or {}},
    )
    seen = []
    return canary.run(seen.append, log=lambda s: None), seen


@pytest.mark.parametrize(
    "candidate, env, why",
    [
        ("short", None, "quality probe did not run"),
        ("stable", {"NMM_SERVE_FAILPOINT": "chat"}, "error rate"),
        ("stable", {"NMM_SERVE_FAILPOINT": "stream"}, "error rate"),
    ],
    ids=["drawing-only", "chat-only", "streams-only"],
)
def test_a_candidate_that_fails_one_task_is_rolled_back_at_its_first_step(models, tmp_path, candidate, env, why):
    outcome, seen = roll(models, tmp_path, candidate, env)
    assert not outcome.promoted and len(seen) == 1 and not seen[0].ok, outcome.reason
    assert outcome.reason.startswith("step 1 (weight 50%)") and why in outcome.reason, outcome.reason
    if candidate == "short":  # every drawing refused with a 400 naming the limit, where stable draws
        assert any("refused" in r and "(4xx)" in r for r in seen[0].reasons), seen[0].reasons
        assert (
            seen[0].measured["client_error_rate"] > seen[0].measured["stable_client_error_rate"] + LIMITS.max_error_rate
        )


def test_a_healthy_candidate_is_promoted_through_every_step(models, tmp_path):
    outcome, seen = roll(models, tmp_path, "stable")
    assert outcome.promoted, outcome.reason
    assert [s.weight for s in seen] == [50, 100] and all(s.ok for s in seen)
    for s in seen:
        assert s.measured["requests"] >= 5 and s.measured["error_rate"] == 0.0
        assert {"quality_candidate.m2t", "quality_candidate.m2g"} <= set(s.measured)  # every task probed
