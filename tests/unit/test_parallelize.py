"""The GPU path's pieces, on CPU: packed rows with document masks, precision choice, compile
keeping checkpoints compatible, and MFU counted the torchtitan way."""

import numpy as np
import pytest
import torch

from nmm.data.sequences import pack_documents
from nmm.model import ModelConfig
from nmm.train import parallelize
from nmm.train.parallelize import Parallelism


def tiny() -> ModelConfig:
    return ModelConfig(vocab_size=40, dim=32, layers=2, heads=2, max_seq_len=16)


def test_packed_rows_give_each_document_the_logits_it_gets_alone():
    torch.manual_seed(0)
    m = tiny().build().eval()
    g = np.random.default_rng(0)
    rows = [(g.integers(5, 40, n).tolist(), [1] * n) for n in (5, 7, 3, 9, 4)]
    p = pack_documents(rows, 16)
    assert p["tokens"].shape[1] == 16 and len(p["tokens"]) < len(rows)  # fewer rows than documents
    logits = m(torch.from_numpy(p["tokens"]).long(), docs=torch.from_numpy(p["docs"]).long(),
               positions=torch.from_numpy(p["positions"]))
    seen = 0
    for r in range(len(p["tokens"])):
        for d in sorted(set(p["docs"][r].tolist()) - {-1}):
            at = np.flatnonzero(p["docs"][r] == d)
            alone = m(torch.from_numpy(p["tokens"][r, at][None]).long())[0]
            assert torch.allclose(logits[r, at], alone, atol=1e-5)
            seen += 1
    assert seen == len(rows)
    assert p["loss_mask"].sum() == sum(len(t) for t, _ in rows)
    with pytest.raises(ValueError, match="more than a packed row"):
        pack_documents([([1] * 20, [1] * 20)], 16)


def test_precision_is_bf16_on_gpus_and_fp32_on_cpus_unless_asked():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert Parallelism().dtype(cpu) is None and Parallelism().dtype(gpu) == torch.bfloat16
    assert Parallelism(precision="fp32").dtype(gpu) is None
    assert Parallelism(precision="bf16").dtype(cpu) == torch.bfloat16
    with parallelize.autocast(Parallelism(precision="bf16"), cpu):
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16


def test_compiling_blocks_keeps_state_dict_keys_so_checkpoints_still_load():
    m = tiny().build()
    keys = list(m.state_dict())
    wrapped = parallelize.apply(m, Parallelism(compile=True), world_size=1)
    assert wrapped is m and list(m.state_dict()) == keys


def test_flops_per_token_follows_torchtitan_and_mfu_needs_a_known_peak():
    cfg = ModelConfig(vocab_size=1000, dim=64, layers=2, heads=4, max_seq_len=32)
    m = cfg.build()
    n = sum(p.numel() for p in m.parameters()) - 1000 * 64  # without the embedding table
    assert parallelize.flops_per_token(cfg, 32) == 6 * n + 12 * 2 * 4 * 16 * 32
    assert parallelize.mfu(1e6, cfg, 32, torch.device("cpu")) is None
