"""A training process for the multi-process tests (run under torchrun, or alone): trains the
tiny config with DDP or FSDP2 on CPU (gloo) and saves the final weights from rank 0.

    torchrun --nproc-per-node=2 -m tests.integration.dist_worker ROOT_URI OUT_FILE [--fsdp] [--slow] [--grpo]

--grpo: the tiny model and data of tests/unit/test_recipes, pretrained then trained by a grpo
phase on the toy reward of tests/unit/test_grpo ("draw colour 3"), each rank sampling its own.
"""

import dataclasses
import os
import sys
import time

import torch

from nmm.model import ModelConfig
from nmm.train import distributed
from nmm.train.parallelize import Parallelism
from nmm.train.trainer import PhaseConfig, TrainConfig, train
from tests.integration.resume_worker import data

MIX = {"m2t": 0.5, "m2g": 0.5}  # equal shares of M2T and M2G rows


def config(fsdp: bool) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(vocab_size=40, dim=32, layers=2, heads=2, max_seq_len=16),
        phases=(
            PhaseConfig(mixture=MIX, name="a", steps=12, batch_size=8, lr=3e-3, warmup_steps=2),
            PhaseConfig(mixture=MIX, name="b", steps=12, batch_size=8, lr=1e-3, recipe="sft"),
        ),
        seed=5,
        checkpoint_interval=4,
        keep_latest=2,
        log_every=1,
        parallel=Parallelism(fsdp=fsdp),
    )


def grpo():
    """(config, data, rewards) of the --grpo run."""
    from nmm.train.rewards import Reward
    from tests.unit.test_grpo import colour, rl_cfg
    from tests.unit.test_recipes import train_data

    return (
        dataclasses.replace(rl_cfg(8), checkpoint_interval=4),
        train_data(),
        {"colour": Reward("colour", "m2g", colour)},
    )


if __name__ == "__main__":
    root, out = sys.argv[1], sys.argv[2]
    info = distributed.init()
    torch.set_num_threads(1)
    slow = "--slow" in sys.argv
    cfg, rows, rewards = grpo() if "--grpo" in sys.argv else (config("--fsdp" in sys.argv), data(), None)
    try:
        model, summary = train(
            cfg, rows, info, root, lambda m, step: time.sleep(0.3) if slow else None, rewards=rewards
        )
        distributed.barrier(info)  # as the train stage does: leave together, then write
        distributed.shutdown(info)
        if info.is_main:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out)
            print("resumed_from", summary["resumed_from"], flush=True)
        code = 0
    except Exception as exc:
        sys.stdout.write(f"{type(exc).__name__} {exc}\n")  # one write: the two ranks' lines never interleave
        code = 143 if type(exc).__name__ == "Preempted" else 1
    finally:
        distributed.shutdown(info)
    sys.stdout.flush()
    # Once in ~10 full-suite runs a rank that had finished (process group destroyed) aborted in
    # interpreter teardown ("terminate called without an active exception", gloo's threads):
    # the work is done and checked by the test, so leave without that teardown.
    os._exit(code)
