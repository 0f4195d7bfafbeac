"""Mid and late fusion: image stems put continuous patch embeddings at the image positions."""

import dataclasses

import numpy as np
import pytest
import torch

from nmm.model import ModelConfig
from nmm.model.generate import generate
from nmm.train import encoder as encoder_training
from nmm.train.batches import TrainData
from nmm.train.distributed import DistInfo
from nmm.train.trainer import PhaseConfig, TrainConfig, train

CPU = DistInfo(0, 0, 1, torch.device("cpu"))
IMG = (30, 40)  # image ids: 30..39


def cfg(fusion: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=40,
        dim=32,
        layers=2,
        heads=2,
        max_seq_len=16,
        fusion=fusion,
        image_lo=IMG[0],
        image_hi=IMG[1],
        patch_dim=12,
        tokens_per_image=4,
        encoder_dim=16,
        encoder_layers=1,
    )


def rows(n: int = 8) -> torch.Tensor:
    # <bos> <boi> 4 image placeholders <eoi> then text
    return torch.tensor([[1, 3, 30, 31, 32, 33, 4, 7, 8, 2]] * n)


@pytest.mark.parametrize("fusion", ["mid", "late"])
def test_the_model_reads_pixels_at_the_image_positions_not_the_codes(fusion):
    torch.manual_seed(0)
    m = cfg(fusion).build().eval()
    x = rows(2)
    pix = torch.rand(2, 4, 12)
    same_pixels_other_codes = x.clone()
    same_pixels_other_codes[:, 2:6] = 35
    assert torch.allclose(m(x, patches=pix), m(same_pixels_other_codes, patches=pix), atol=1e-6)
    assert not torch.allclose(m(x, patches=pix), m(x, patches=torch.rand(2, 4, 12)))
    with pytest.raises(ValueError, match="pass the image patches"):
        m(x)
    with pytest.raises(ValueError, match="exactly 3 image positions"):
        m(x, patches=pix[:, :3])


def test_early_fusion_ignores_patches():
    torch.manual_seed(0)
    m = cfg("early").build().eval()
    assert m.stem is None
    assert torch.equal(m(rows(2)), m(rows(2), patches=torch.rand(2, 4, 12)))


def test_generation_with_patches_reads_them_once_at_prefill():
    torch.manual_seed(0)
    m = cfg("mid").build().eval()
    prompt = [1, 3, 30, 31, 32, 33, 4]
    pix = np.random.default_rng(0).random((2, 4, 12)).astype(np.float32)
    a, b = generate(m, [prompt, prompt], 5, allowed=(5, 30), patches=pix)
    seq = list(prompt)
    for _ in range(5):  # the slow way, with the patches every time
        seq.append(5 + int(m(torch.tensor([seq]), patches=torch.from_numpy(pix[:1]))[0, -1, 5:30].argmax()))
    assert a == seq[len(prompt) :]


def test_late_fusion_trains_its_encoder_separately_then_freezes_it(tmp_path):
    torch.manual_seed(0)
    g = np.random.default_rng(0)
    patches = g.random((16, 4, 12)).astype(np.float32)
    tokens = rows(32).numpy().astype(np.int32)
    mask = np.zeros_like(tokens, dtype=np.uint8)
    mask[:, 7:] = 1
    tc = TrainConfig(
        model=cfg("late"),
        phases=(PhaseConfig(name="p", steps=6, batch_size=4, lr=1e-2, mixture={"m2t": 1.0}),),
        checkpoint_interval=100,
        encoder_steps=30,
    )
    fresh = cfg("late").build()
    data = TrainData(
        tokens=tokens,
        loss_mask=mask,
        task=np.zeros(32, np.int8),
        image_range=IMG,
        patches=patches,
        row_image=np.arange(32) % 16,
    )
    model, _ = train(tc, data, CPU, tmp_path.as_uri(), lambda *_: None)
    enc = model.stem.encoder
    assert not any(p.requires_grad for p in enc.parameters())
    assert all(p.requires_grad for p in model.stem.projector.parameters())
    # The encoder learned (its reconstruction beats a fresh one) and then stayed frozen: running
    # the same pretraining again from the same seed gives exactly the weights the LM saw.
    torch.manual_seed(0)
    again = cfg("late").build().stem.encoder
    encoder_training.pretrain(again, patches, 30, seed=0)
    for (k, a), b in zip(enc.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    hide = torch.ones(16, 4, dtype=torch.bool)
    x = torch.from_numpy(patches)
    assert enc.reconstruction_loss(x, hide) < fresh.stem.encoder.reconstruction_loss(x, hide)
    # Its features were standardised on the train images: the projector sees content, centred.
    feats = (enc(x) - model.stem.feature_mean) / model.stem.feature_std
    assert feats.mean(0).abs().max() < 1e-4 and (feats.std(0) - 1).abs().max() < 1e-3
    with pytest.raises(ValueError, match="pass patches and row_image"):
        train(
            tc, dataclasses.replace(data, patches=None, row_image=None), CPU, (tmp_path / "b").as_uri(), lambda *_: None
        )
