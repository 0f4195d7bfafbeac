"""Fault: one DDP rank of a training job SIGKILLed mid-run (R19), run by the local engine as it
runs the train step's PyTorchJob: torchrun with two ranks of the tiny trainer
(tests.integration.dist_worker --grpo: 20 pretrain steps, then 8 grpo steps in which each rank
samples its own completions; a checkpoint every 4 steps). The rank dies inside the grpo phase.

Must hold: torchrun stops the surviving rank and fails; the PyTorchJob's processes start again
(one restart, within `runPolicy.backoffLimit` = the spec's `training.maxRestarts`); training
resumes from the latest checkpoint (the grpo reference restored from it, the sampling a pure
function of seed, rank and step) and ends with weights bitwise equal to an uninterrupted run;
the step succeeds on its first attempt, its restart recorded and logged."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from nmm.engine import run_workflow
from tests.conftest import wait_for

pytestmark = pytest.mark.integration
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def job_workflow(root: Path, out: Path, *flags: str) -> dict:
    """One resource step creating a PyTorchJob of one pod: torchrun, two ranks of dist_worker."""
    container = {
        "name": "pytorch",
        "image": "nmm:test",
        "command": [TORCHRUN],
        "args": [
            "--nnodes=1",
            "--nproc-per-node=2",
            "--node-rank=$(RANK)",
            "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)",
            "-m",
            "tests.integration.dist_worker",
            root.as_uri(),
            str(out),
            *flags,
        ],
    }
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "{{workflow.name}}-train"},
        "spec": {
            "nprocPerNode": "2",
            "runPolicy": {"backoffLimit": 2},
            "pytorchReplicaSpecs": {
                "Master": {
                    "replicas": 1,
                    "restartPolicy": "OnFailure",
                    "template": {"spec": {"containers": [container]}},
                }
            },
        },
    }
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"generateName": "r19-"},
        "spec": {
            "entrypoint": "main",
            "templates": [
                {"name": "main", "dag": {"tasks": [{"name": "train", "template": "train"}]}},
                {
                    "name": "train",
                    "activeDeadlineSeconds": "300",
                    "resource": {"action": "create", "manifest": yaml.safe_dump(job)},
                },
            ],
        },
    }


def rank_one() -> list[int]:
    """The dist_worker processes torchrun started as LOCAL_RANK 1."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"tests.integration.dist_worker" not in (proc / "cmdline").read_bytes():
                continue
            if b"LOCAL_RANK=1" in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_a_killed_ddp_rank_restarts_the_job_which_resumes_to_the_uninterrupted_weights_r19(tmp_path):
    straight = run_workflow(
        job_workflow(tmp_path / "straight", tmp_path / "straight.pt", "--grpo"), tmp_path / "runs-a"
    )
    assert straight.phase == "Succeeded", straight.steps["train"].message

    root, result = tmp_path / "killed", {}
    engine = threading.Thread(
        target=lambda: result.update(
            r=run_workflow(job_workflow(root, tmp_path / "resumed.pt", "--grpo", "--slow"), tmp_path / "runs-b")
        )
    )
    engine.start()
    wait_for(
        lambda: (root / "latest.json").exists() and json.loads((root / "latest.json").read_text())["latest"] >= 24,
        120,
        "a checkpoint at step 24, inside the grpo phase",
    )
    (victim,) = wait_for(rank_one, 30, "rank 1")
    os.kill(victim, signal.SIGKILL)
    engine.join(timeout=300)
    r = result["r"]
    train = r.steps["train"]
    assert r.phase == "Succeeded" and train.attempts == 1 and train.restarts == 1, (train.message, train.restarts)
    log = "".join(p.read_text() for p in train.logs)
    assert "restart 1 of backoffLimit 2" in log
    killed_at = int(log.split("resumed_from ")[-1].split()[0])
    assert 24 <= killed_at < 28  # the restart resumed inside the grpo phase, not from the start
    a = torch.load(tmp_path / "straight.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k
