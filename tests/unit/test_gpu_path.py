"""The GPU path's habits, held on the CPU: the training step and the decode loop never read
the device except at logging intervals (every read is counted), and the compiled model gives
the eager model's logits and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nmm.model import ModelConfig
from nmm.model.generate import SYNC_EVERY, generate
from nmm.train import parallelize, trainer
from nmm.train.distributed import DistInfo
from nmm.train.loss import head_loss
from nmm.train.parallelize import Parallelism
from nmm.train.recipes import next_token
from nmm.train.trainer import PhaseConfig, TrainConfig

# Every way a tensor's value reaches the host (on a GPU each waits for the device).
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


class Reads:
    """Counts the host reads of tensors made while `on`."""

    def __init__(self, monkeypatch):
        self.on, self.calls = False, []
        for name in READS:
            original = getattr(torch.Tensor, name)

            def read(t, *a, _original=original, _name=name, **k):
                if self.on:
                    self.calls.append(_name)
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, read)

    def _counting(self, fn, on: bool):
        def wrapped(*a, **k):
            before, self.on = self.on, on
            try:
                return fn(*a, **k)
            finally:
                self.on = before

        return wrapped

    def during(self, fn):
        """`fn` with its host reads counted."""
        return self._counting(fn, True)

    def paused(self, fn):
        """`fn` with its host reads not counted (host-side work inside a counted call)."""
        return self._counting(fn, False)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(
        **{
            "vocab_size": 48,
            "dim": 32,
            "layers": 2,
            "heads": 2,
            "max_seq_len": 16,
            "image_lo": 30,
            "image_hi": 40,
            "tokens_per_image": 3,
            **kw,
        }
    )


def data():
    from nmm.train.batches import TrainData

    g = np.random.default_rng(0)
    tokens = g.integers(5, 40, (32, 12)).astype(np.int32)
    tokens[::3, 8:] = 0  # some padding: trimming and packing have work to do
    mask = np.ones_like(tokens, dtype=np.uint8)
    mask[:, :3] = 0
    return TrainData(tokens=tokens, loss_mask=mask, task=(np.arange(32) % 2).astype(np.int8), image_range=(30, 40))


@pytest.mark.parametrize("pack,micro", [(False, None), (True, None), (False, 3)])
def test_the_training_step_reads_nothing_from_the_device(monkeypatch, tmp_path, pack, micro):
    """Across a whole run, `train_step` (host-side batch layout excepted: it works on the
    host's copy before the move) makes no host read; the reads happen at logging steps."""
    reads = Reads(monkeypatch)
    monkeypatch.setattr(trainer, "train_step", reads.during(trainer.train_step))
    monkeypatch.setattr(next_token, "lay_out", reads.paused(next_token.lay_out))
    logged = []
    cfg = TrainConfig(
        model=tiny(),
        phases=(PhaseConfig(mixture={"m2t": 0.5, "m2g": 0.5}, name="p", steps=6, batch_size=8, lr=1e-3, recipe="sft"),),
        checkpoint_interval=100,
        log_every=3,
        micro_batch=micro,
        parallel=Parallelism(pack=pack),
    )
    trainer.train(cfg, data(), DistInfo(0, 0, 1, torch.device("cpu")), tmp_path.as_uri(), lambda m, s: logged.append(s))
    assert reads.calls == []
    assert logged == [3, 6]  # the metrics still came, at the logging steps


def test_the_decode_loop_reads_the_device_every_sync_interval_only(monkeypatch):
    torch.manual_seed(0)
    model = tiny(max_seq_len=80).build()
    reads = Reads(monkeypatch)
    new = 64
    with_stop = reads.during(generate)
    # the stop token is never allowed, so every interval's check finds rows still running
    (out, _) = with_stop(model, [[1, 2, 3], [4, 5, 6]], new, (5, 30), stop=2)
    assert len(out) == new
    assert reads.calls.count("__bool__") == new // SYNC_EVERY  # the "all stopped?" checks
    assert reads.calls.count("tolist") == 1  # the tokens, once, at the end
    assert len(reads.calls) == new // SYNC_EVERY + 1


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")  # dynamo's own probe
def test_the_compiled_model_gives_the_eager_logits_and_gradients():
    """`parallelize.apply` with compile (each block compiled in place, as on a GPU) on this
    CPU: logits, fused loss and every gradient match the eager model."""
    torch.manual_seed(0)
    cfg = tiny(max_seq_len=32)
    eager, compiled = cfg.build(), cfg.build()
    compiled.load_state_dict(eager.state_dict())
    parallelize.apply(compiled, Parallelism(compile=True), world_size=1)
    x = torch.randint(0, 48, (4, 32))
    assert torch.allclose(compiled(x), eager(x), atol=1e-5)
    mask = torch.ones_like(x)
    losses = []
    for m in (eager, compiled):
        loss, _ = m(x, head=head_loss(x, mask, {"image": (30, 40)}, 1e-4))
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def _uncached(model, prompts, new, allowed):
    """The full forward over everything so far for each new token: the reference decode."""
    seq = torch.tensor(prompts)
    for _ in range(new):
        logits = model(seq)[:, -1, allowed[0] : allowed[1]]
        seq = torch.cat([seq, allowed[0] + logits.argmax(-1, keepdim=True)], dim=1)
    return seq[:, len(prompts[0]) :].tolist()


def test_the_static_decode_step_gives_the_full_forwards_tokens():
    torch.manual_seed(0)
    model = tiny(max_seq_len=40, qk_norm=True).build().eval()
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]
    got = generate(model, prompts, 30, (5, 30), compiled=False)
    assert got == _uncached(model, prompts, 30, (5, 30))


@pytest.mark.slow
def test_the_compiled_decode_step_gives_the_eager_tokens():
    """`generate(compiled=True)`: the decode step through torch.compile (on a GPU with CUDA
    graphs), here on the CPU: the same tokens as eager, guidance batched in."""
    torch.manual_seed(0)
    model = tiny(max_seq_len=40).build().eval()
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    uncond = [[1, 0, 0, 0, 5], [6, 0, 0, 0, 10]]
    eager = generate(model, prompts, 20, (5, 30), guidance=2.0, uncond=uncond, compiled=False)
    compiled = generate(model, prompts, 20, (5, 30), guidance=2.0, uncond=uncond, compiled=True)
    assert compiled == eager and all(len(row) == 20 for row in eager)
    # three prompts are padded to a batch of four (a copy of the first), and only three come back
    three = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]
    streamed = []
    got = generate(model, three, 6, (5, 30), compiled=True, on_step=lambda idx, toks: streamed.append((idx, toks)))
    assert got == generate(model, three, 6, (5, 30), compiled=False)
    assert all(idx == [0, 1, 2] and len(toks) == 3 for idx, toks in streamed)
    # grid positions: the compiled step counts the image codes it draws in the cache, as eager does
    grid = tiny(max_seq_len=40, tokens_per_image=4, image_positions="grid").build().eval()
    draw = [[1, 2, 3], [6, 7, 3]]
    eager = generate(grid, draw, 4, (30, 40), compiled=False)
    assert generate(grid, draw, 4, (30, 40), compiled=True) == eager == _uncached(grid, draw, 4, (30, 40))
