"""The GPU path's pieces, on CPU: packed rows with document masks, precision choice, compile
keeping checkpoints compatible, and MFU counted the torchtitan way."""

import numpy as np
import pytest
import torch

from nmm.data.sequences import pack_documents
from nmm.model import ModelConfig
from nmm.train import parallelize
from nmm.train.parallelize import Parallelism

MIX = {"m2t": 0.5, "m2g": 0.5}  # equal shares of M2T and M2G rows


def tiny() -> ModelConfig:
    return ModelConfig(vocab_size=40, dim=32, layers=2, heads=2, max_seq_len=16)


def test_packed_rows_give_each_document_the_logits_it_gets_alone():
    torch.manual_seed(0)
    m = tiny().build().eval()
    g = np.random.default_rng(0)
    rows = [(g.integers(5, 40, n).tolist(), [1] * n) for n in (5, 7, 3, 9, 4)]
    p = pack_documents(rows, 16)
    assert p["tokens"].shape[1] == 16 and len(p["tokens"]) < len(rows)  # fewer rows than documents
    logits = m(
        torch.from_numpy(p["tokens"]).long(),
        docs=torch.from_numpy(p["docs"]).long(),
        positions=torch.from_numpy(p["positions"]),
    )
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


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_a_packed_batch_has_exactly_the_loss_of_the_padded_one(attention):
    from nmm.model.transformer import image_spans
    from nmm.tokenizers.vocab import PAD
    from nmm.train.batches import pack_batch
    from nmm.train.loss import next_token_loss

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=40,
        dim=32,
        layers=2,
        heads=2,
        max_seq_len=16,
        image_lo=30,
        image_hi=40,
        tokens_per_image=3,
        image_attention=attention,
    )
    m = cfg.build().eval()
    g = np.random.default_rng(1)
    x = torch.full((6, 12), PAD, dtype=torch.long)
    mask = torch.zeros(6, 12, dtype=torch.long)
    for i, n in enumerate((12, 5, 7, 3, 9, 4)):
        x[i, :n] = torch.from_numpy(g.integers(5, 30, n))  # text
        if n >= 5:
            x[i, 1:4] = torch.from_numpy(g.integers(30, 40, 3))  # a whole image of 3 codes
        mask[i, 1:n] = 1
    x[2, 5:6], mask[2, 5:6] = PAD, 0  # caption dropout pads inside a row: the row is still 7 long
    spans = image_spans(x, (30, 40), 3) if attention == "bidirectional" else None
    assert spans is None or int((spans > 0).sum()) == 3 * 4
    padded, _ = next_token_loss(m(x, spans=spans), x, mask, {"image": (30, 40)}, 1e-4)
    px, pm, extra = pack_batch(x, mask, 16, spans)
    assert len(px) < len(x)
    packed, parts = next_token_loss(m(px, **extra), px, pm, {"image": (30, 40)}, 1e-4)
    assert torch.allclose(packed, padded, atol=1e-5)
    assert parts["tokens_text"] + parts["tokens_image"] == mask[:, 1:].sum()


def test_packing_trains_to_the_padded_weights(tmp_path):
    from nmm.train.distributed import DistInfo
    from nmm.train.trainer import PhaseConfig, TrainConfig, train
    from tests.integration.resume_worker import data

    d = data()
    tokens, mask = d.tokens, d.loss_mask
    tokens[::2, 6:] = 0  # half the rows are 6 tokens: two of them share a packed row of 16
    mask[::2, 6:] = 0
    cpu = DistInfo(0, 0, 1, torch.device("cpu"))
    out = []
    for pack in (False, True):
        cfg = TrainConfig(
            model=tiny(),
            phases=(PhaseConfig(mixture=MIX, name="p", steps=6, batch_size=8, lr=3e-3, recipe="sft"),),
            checkpoint_interval=100,
            parallel=Parallelism(pack=pack),
        )
        model, _ = train(cfg, d, cpu, (tmp_path / str(pack)).as_uri(), lambda *_: None)
        out.append(model.state_dict())
    for k in out[0]:
        assert torch.allclose(out[0][k], out[1][k], atol=1e-5), k


def test_micro_batches_train_to_the_whole_batchs_weights(tmp_path):
    """Gradient accumulation over micro-batches of 3 (and a ragged last one of 2) of a batch of
    8 rows, each micro-batch's loss scaled by the whole batch's target weight, gives the
    weights of the whole batch at once (fp32); and the parts logged are the whole batch's."""
    from nmm.train.distributed import DistInfo
    from nmm.train.trainer import PhaseConfig, TrainConfig, train
    from tests.integration.resume_worker import data

    cpu = DistInfo(0, 0, 1, torch.device("cpu"))
    out, logged = [], []
    for micro in (None, 3):
        cfg = TrainConfig(
            model=tiny(),
            phases=(PhaseConfig(mixture=MIX, name="p", steps=4, batch_size=8, lr=3e-3),),
            checkpoint_interval=100,
            log_every=2,
            loss_weights={"image": 0.5},
            micro_batch=micro,
        )
        metrics = []
        model, summary = train(
            cfg, data(), cpu, (tmp_path / str(micro)).as_uri(), lambda m, step, metrics=metrics: metrics.append(m)
        )
        out.append(model.state_dict())
        logged.append((metrics[-1], summary["tokens_text"], summary["tokens_image"]))
    for k in out[0]:
        assert torch.allclose(out[0][k], out[1][k], atol=1e-5), k
    (whole, text, image), (micro, text3, image3) = logged
    assert (text, image) == (text3, image3) and text + image > 0
    for k in ("train/loss", "train/loss_text", "train/loss_image", "train/z_loss", "train/logit_norm_text"):
        assert whole[k] == pytest.approx(micro[k], rel=1e-5), k


def test_auto_compiles_and_packs_on_gpus_only():
    p = Parallelism()
    assert p.resolved(torch.device("cpu"), "early") == Parallelism(compile=False, pack=False)
    assert p.resolved(torch.device("cuda"), "early") == Parallelism(compile=True, pack=True)
    assert p.resolved(torch.device("cuda"), "mid") == Parallelism(compile=True, pack=False)
    assert Parallelism(compile=False, pack=True).resolved(torch.device("cuda"), "early") == Parallelism(
        compile=False, pack=True
    )
    assert parallelize.micro_batch(tiny(), 8, None, p, torch.device("cpu")) is None  # CPU: the whole batch
    assert parallelize.micro_batch(tiny(), 8, 3, p, torch.device("cpu")) == 3
    assert parallelize.micro_batch(tiny(), 2, 3, p, torch.device("cpu")) == 2
