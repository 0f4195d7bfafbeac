"""Checkpoints under real crashes: kill -9 mid-run then resume is bitwise equal to an
uninterrupted run (R15); a crash while saving never leaves a loadable partial checkpoint (R14)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from nmm import storage
from nmm.train import checkpoint

pytestmark = pytest.mark.integration


def worker(root: str, out, slow: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.resume_worker", root, str(out)] + (["--slow"] if slow else [])
    )


def test_kill_9_then_resume_matches_the_uninterrupted_run_bitwise_r15(tmp_path):
    straight = worker((tmp_path / "straight").as_uri(), tmp_path / "straight.pt")
    assert straight.wait(timeout=120) == 0
    root = tmp_path / "killed"
    victim = worker(root.as_uri(), tmp_path / "never.pt", slow=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once a checkpoint past phase a is committed
        index = root / "latest.json"
        if index.exists() and json.loads(index.read_text())["latest"] >= 16:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    assert not (tmp_path / "never.pt").exists()
    killed_at = json.loads((root / "latest.json").read_text())["latest"]
    assert 16 <= killed_at < 24
    resumed = worker(root.as_uri(), tmp_path / "resumed.pt")
    assert resumed.wait(timeout=120) == 0
    a = torch.load(tmp_path / "straight.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_crash_while_writing_the_commit_marker_leaves_the_previous_checkpoint_r14(tmp_path, monkeypatch):
    root = (tmp_path / "ck").as_uri()
    checkpoint.save(root, 4, {"w": torch.ones(2)}, keep_latest=2)
    real = storage.publish.__globals__["write_bytes"]

    def crash_on_manifest(uri, data, **kw):
        if uri.endswith("manifest.json"):
            raise OSError("disk full")  # the process dies here in real life
        real(uri, data, **kw)

    monkeypatch.setitem(storage.publish.__globals__, "write_bytes", crash_on_manifest)
    with pytest.raises(OSError):
        checkpoint.save(root, 8, {"w": torch.full((2,), 8.0)}, keep_latest=2)
    monkeypatch.undo()
    assert (tmp_path / "ck" / "step-00000008" / "state.pt").exists()  # the data was written…
    step, state = checkpoint.load_latest(root)  # …but without its manifest it does not exist
    assert step == 4 and torch.equal(state["w"], torch.ones(2))
