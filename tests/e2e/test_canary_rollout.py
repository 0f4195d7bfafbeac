"""Progressive rollout for real on this machine: a weak champion registered by hand and one local
pipeline run with `rollout.serving` (tests/serving_fixture.py), then canaries driven directly:

- the trained model (400 steps) is rolled out through the pipeline's rollout stage against the
  weak champion (an untrained model) and promoted through every step, each step in MLflow;
- a deliberately worse candidate (the good run's step-100 checkpoint) is rolled back at the first
  step by the quality probe, with the reason;
- a candidate whose server dies mid-canary is rolled back at the next step.
"""

import threading
import time

import pytest

from nmm.rollout import analysis
from nmm.rollout.local_canary import LocalCanary, Step
from tests.serving_fixture import early_model, model_folder, register_champion, run_pipeline

pytestmark = pytest.mark.slow

STEPS = [Step(20, 2.0), Step(50, 2.0), Step(100, 1.0)]
LIMITS = analysis.Limits(
    max_error_rate=0.02,
    max_p95_latency_ms=20_000,
    max_time_to_first_token_ms=20_000,
    min_requests=5,
    max_quality_drop=0.05,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("canary")
    weak = register_champion(cwd, "nmm-canary", accuracy=0.1)
    good = run_pipeline(cwd, "good", 400, seesaw=True)
    return cwd, weak, good


def cases(cwd, n=40):
    from nmm import storage
    from nmm.rollout import probe

    (probe_file,) = sorted((cwd / ".nmm" / "store").rglob("probe.jsonl"))[-1:]
    return probe.loads(storage.read_bytes(probe_file.as_uri()), n)


def test_the_pipeline_rolls_the_better_model_out_through_every_step(runs):
    cwd, _, good = runs
    assert "nmm-canary version 2: promoted" in good.stdout, good.stdout[-2000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / '.nmm' / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("nmm-canary", "champion").version) == "2"
    exp = client.get_experiment_by_name("default/canary")
    ro = client.search_runs(
        [exp.experiment_id], filter_string="tags.`nmm.stage` = 'rollout'", order_by=["start_time DESC"]
    )[0]
    assert ro.data.tags["nmm.canary.result"] == "promoted"
    assert ro.data.tags["nmm.canary.stable"] == "1"
    weights = [m.value for m in client.get_metric_history(ro.info.run_id, "canary.weight")]
    assert weights == [20, 50, 100]
    quality = client.get_metric_history(ro.info.run_id, "canary.quality_candidate")
    stable = client.get_metric_history(ro.info.run_id, "canary.quality_stable")
    assert len(quality) == 3 and all(q.value > s.value for q, s in zip(quality, stable))
    assert all(m.value >= 5 for m in client.get_metric_history(ro.info.run_id, "canary.requests"))
    artifacts = {a.path for a in client.list_artifacts(ro.info.run_id, "canary")}
    assert {"canary/canary.png", "canary/stable.log", "canary/candidate.log"} <= artifacts


def test_a_worse_candidate_is_rolled_back_by_the_quality_probe(runs, tmp_path):
    cwd, _, _ = runs
    good = model_folder(cwd, 2)
    step = early_model(good, (tmp_path / "early").as_uri())
    assert step == 100
    canary = LocalCanary(good, (tmp_path / "early").as_uri(), STEPS, LIMITS, cases(cwd), tmp_path / "work")
    seen = []
    outcome = canary.run(seen.append, log=lambda s: None)
    assert not outcome.promoted
    assert len(seen) == 1 and not seen[0].ok  # stopped at the first step
    assert "quality probe" in outcome.reason and "step 1 (weight 20%)" in outcome.reason, outcome.reason
    assert seen[0].measured["quality_candidate"] < seen[0].measured["quality_stable"] - 0.05
    assert seen[0].measured["requests"] >= 5 and seen[0].measured["error_rate"] == 0.0


def test_a_candidate_that_crashes_mid_canary_is_rolled_back(runs, tmp_path):
    cwd = runs[0]
    _, weak, _ = runs
    canary = LocalCanary(weak, model_folder(cwd, 2), STEPS, LIMITS, cases(cwd), tmp_path / "work")
    seen = []

    def on_step(result):
        seen.append(result)
        if result.index == 0:  # healthy so far; now its process dies during step 2
            proc = canary.servers["candidate"].proc
            threading.Timer(0.5, proc.kill).start()

    t0 = time.monotonic()
    outcome = canary.run(on_step, log=lambda s: None)
    assert seen[0].ok, seen[0].reasons
    assert not outcome.promoted and len(seen) == 2
    assert "step 2 (weight 50%)" in outcome.reason and "candidate" in outcome.reason, outcome.reason
    assert canary.router.counts()[1]["candidate"] > 0 or "exited" in outcome.reason
    assert time.monotonic() - t0 < 120
