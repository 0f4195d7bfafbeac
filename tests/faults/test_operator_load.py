"""Fault under load: 100 NMMPipelines created at once against the API emulator, the operator
killed with SIGKILL once half of them have their Workflow, then started again. Must hold:
exactly 100 Workflows, one per pipeline, each owned by its own pipeline, every pipeline's status
naming its Workflow; nothing duplicated or lost across the kill (R1, R2, R4). The time is the
benchmark's (benchmarks/operator_load.py, figures in docs/benchmarks.md), not asserted here."""

from __future__ import annotations

import pytest

from tests.faults import operator_load

pytestmark = pytest.mark.integration


def test_100_pipelines_at_once_with_the_operator_killed_halfway_get_exactly_100_workflows(tmp_path):
    r = operator_load.run(100, tmp_path, kill_halfway=True)
    assert (r["workflows"], r["distinct_workflows"], r["owners"], r["with_status"]) == (100, 100, 100, 100), r
    assert r["operator_killed"] == 1
