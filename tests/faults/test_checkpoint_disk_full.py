"""Fault: the disk fills up while a checkpoint is written (an injected ENOSPC on the file
store's write of the second checkpoint's state). Must hold: training stops with a clear
StorageError naming the object and the cause; the first checkpoint is still the newest committed
one and loads; no partial or temporary file is left; a resumed run continues from it (R16: an
old checkpoint is deleted only after the new one commits)."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from nmm import storage
from nmm.train import checkpoint
from nmm.train.distributed import DistInfo
from nmm.train.trainer import PhaseConfig, TrainConfig, train
from tests.integration.resume_worker import data
from tests.unit.test_parallelize import MIX, tiny


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    cfg = TrainConfig(
        model=tiny(),
        phases=(PhaseConfig(mixture=MIX, name="p", steps=6, batch_size=8, lr=1e-3),),
        checkpoint_interval=2,
        keep_latest=1,
    )
    real = os.fdopen
    writes = {"state": 0}

    def fdopen(fd, mode="r", *a, **k):
        f = real(fd, mode, *a, **k)
        if "w" in mode and f.name and ".state.pt." in str(os.readlink(f"/proc/self/fd/{fd}")):
            writes["state"] += 1
            if writes["state"] == 2:  # the second checkpoint's weights: the disk is full
                f.close()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)
    cpu = DistInfo(0, 0, 1, torch.device("cpu"))
    with pytest.raises(storage.StorageError, match="No space left on device") as exc:
        train(cfg, data(), cpu, root.as_uri(), lambda *_: None)
    assert "step-00000004/state.pt" in str(exc.value)
    step, state = checkpoint.load_latest(root.as_uri())
    assert step == 2 and "model" in state  # the previous checkpoint survives, committed
    assert not list(root.rglob("*.tmp")) and not (root / "step-00000004" / "manifest.json").exists()
    monkeypatch.setattr(os, "fdopen", real)
    logged = []
    model, summary = train(cfg, data(), cpu, root.as_uri(), lambda m, s: logged.append(s))
    assert summary["resumed_from"] == 2 and checkpoint.load_latest(root.as_uri())[0] == 6
