"""Two ranks on CPU (gloo), as torchrun starts them in a PyTorchJob pod: DDP and FSDP2 train to
the weights a single process reaches, and SIGTERM reaching the ranks at different moments stops
them at one agreed step with one checkpoint, from which the restart resumes bitwise."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def run(root: Path, out: Path, nproc: int, *flags: str) -> subprocess.Popen:
    if nproc == 1:
        argv = [sys.executable, "-m", "tests.integration.dist_worker"]
    else:
        argv = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", "-m", "tests.integration.dist_worker"]
    return subprocess.Popen(
        argv + [root.as_uri(), str(out), *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_reach_the_single_process_weights(tmp_path, mode):
    one = run(tmp_path / "one", tmp_path / "one.pt", 1)
    assert one.wait(timeout=120) == 0, one.stdout.read()
    two = run(tmp_path / "two", tmp_path / "two.pt", 2, *(["--fsdp"] if mode == "fsdp" else []))
    assert two.wait(timeout=180) == 0, two.stdout.read()
    a, b = weights(tmp_path / "one.pt"), weights(tmp_path / "two.pt")
    assert a.keys() == b.keys()
    for k in a:  # same global batches; only the order of float sums differs (Adam amplifies it
        # where a gradient is near zero, so a rare element moves by ~1e-4; wrong batches or a
        # wrong gradient average move weights by ~1e-2)
        diff = (a[k] - b[k]).abs()
        assert diff.max() < 5e-4 and diff.mean() < 5e-6, (k, diff.max().item(), diff.mean().item())


def sigterm_and_resume_bitwise(tmp_path, flags: tuple[str, ...], at: int, end: int) -> None:
    """Two ranks with `flags`, straight through; again with SIGTERM once a checkpoint at step `at`
    or later is committed, then a restart: it must resume from the checkpoint every rank stopped
    at (before `end`) and end with the straight run's weights, bitwise."""
    straight = run(tmp_path / "straight", tmp_path / "straight.pt", 2, *flags)
    assert straight.wait(timeout=180) == 0, straight.stdout.read()[-4000:]
    root = tmp_path / "stopped"
    victim = run(root, tmp_path / "never.pt", 2, *flags, "--slow")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        index = root / "latest.json"
        if index.exists() and json.loads(index.read_text())["latest"] >= at:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    victim.wait(timeout=60)
    log = victim.stdout.read()
    assert "Preempted SIGTERM at step" in log, log
    stopped_at = json.loads((root / "latest.json").read_text())["latest"]
    assert at <= stopped_at < end and not (tmp_path / "never.pt").exists()
    resumed = run(root, tmp_path / "resumed.pt", 2, *flags)
    assert resumed.wait(timeout=180) == 0, resumed.stdout.read()[-4000:]
    assert f"resumed_from {stopped_at}" in resumed.stdout.read()
    a, b = weights(tmp_path / "straight.pt"), weights(tmp_path / "resumed.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigterm_under_fsdp_stops_every_rank_at_one_step_and_resumes_bitwise(tmp_path):
    sigterm_and_resume_bitwise(tmp_path, ("--fsdp",), at=8, end=24)
