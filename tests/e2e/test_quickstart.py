"""`make run`'s job: the quickstart end to end with embedded defaults (local store, sqlite MLflow),
at half its training steps (`tests.conftest.half_budget`; its gates unchanged; the run is
`tests/e2e/conftest.quickstart_half`), then the metrics read back from `.nmm/mlflow.db` on the
evaluate run. The full budget's figures are in the README, measured by `make run`."""

import pytest

pytestmark = pytest.mark.slow


def test_quickstart_end_to_end_meets_its_gates_and_records_lineage(quickstart_half):
    r, folder = quickstart_half.result, quickstart_half.folder
    assert "m2t.digits.accuracy" in r.stdout and "m2g.digits.accuracy" in r.stdout
    assert "Succeeded" in r.stdout
    db = folder / ".nmm" / "mlflow.db"
    assert db.exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("default/quickstart")
    (ev,) = client.search_runs([exp.experiment_id], filter_string="tags.`nmm.stage` = 'evaluate'")
    m = ev.data.metrics
    # The quickstart's own gates (m2t >= 0.9, m2g >= 0.8) decide rollout; both must hold.
    assert m["m2t.digits.accuracy"] >= 0.90, m
    assert m["m2g.digits.accuracy"] >= 0.80, m
    print("quickstart metrics at half budget:", m)
    assert ev.data.tags["nmm.gate"] == "pass"
    champion = client.get_model_version_by_alias("nmm-quickstart", "champion")
    assert champion.tags["nmm.rollout.decision"] == "promoted"
    assert (folder / ".nmm" / "store" / "runs" / "default" / "quickstart").is_dir()  # <namespace>/<pipeline>
