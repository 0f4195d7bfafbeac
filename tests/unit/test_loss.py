"""The loss: masked targets per modality, seen image codes left out, the fused head against a reference."""

import numpy as np
import pytest
import torch

from nmm.model import ModelConfig
from nmm.train.loss import next_token_loss
from tests.unit.tiny import tiny


def test_whole_image_targets_leave_the_loss_but_drawn_images_keep_theirs():
    from nmm.train.recipes.common import hide_seen_targets, input_image_spans, pretrain_mask

    cfg = tiny(image_lo=30, image_hi=40, tokens_per_image=4, image_attention="bidirectional")
    m2t = [1, 3, 30, 31, 32, 33, 4, 10, 2]  # <bos> <boi> image <eoi> caption <eos>
    m2g = [1, 10, 3, 30, 31, 32, 33, 4, 0]  # <bos> caption <boi> image <eoi> <pad>
    x = torch.tensor([m2t, m2g])
    spans = input_image_spans(x, cfg, torch.tensor([True, False]))
    m = hide_seen_targets(pretrain_mask(x, cfg), spans)
    # M2T: the first code (predicted from <boi>) stays a target, the other three are seen already
    assert m[0].tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 1]
    assert m[1].tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 0]  # M2G draws its image causally: all targets
    assert input_image_spans(x, tiny(image_lo=30, image_hi=40, tokens_per_image=4), torch.tensor([True, True])) is None


def test_loss_counts_only_masked_targets_and_splits_modalities():
    logits = torch.zeros(1, 4, 10)
    tokens = torch.tensor([[1, 2, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1]])
    loss, parts = next_token_loss(logits, tokens, mask, ranges={"image": (8, 10)}, z_loss=0.0)
    assert loss.item() == pytest.approx(np.log(10), rel=1e-5)
    assert parts["tokens_image"].item() == 2 and parts["tokens_text"].item() == 0
    assert parts["logit_norm_image"].item() == 0.0  # all-zero logits
    loud = torch.zeros(1, 4, 10)
    loud[0, 0] = 3.0  # position 0 predicts token 2, a text target (the image range is 8..9)
    _, parts = next_token_loss(loud, tokens, torch.tensor([[0, 1, 1, 1]]), ranges={"image": (8, 10)}, z_loss=0.0)
    assert parts["logit_norm_text"].item() == pytest.approx(3.0 * 10**0.5)
    z_loss, parts = next_token_loss(logits, tokens, mask, ranges={"image": (8, 10)}, z_loss=1.0)
    assert z_loss.item() == pytest.approx(np.log(10) + np.log(10) ** 2, rel=1e-5)


def _reference_next_token_loss(logits, tokens, loss_mask, image_range, z_loss, weights=(1.0, 1.0)):
    """The loss as it was: one fp32 copy of all the logits, cross_entropy and a separate logsumexp."""
    import torch.nn.functional as F

    logits = logits[:, :-1].float()
    targets = tokens[:, 1:].long()
    mask = loss_mask[:, 1:].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view_as(mask)
    is_image = ((targets >= image_range[0]) & (targets < image_range[1])).float() * (mask > 0).float()
    is_text = (mask > 0).float() - is_image
    w = weights[0] * is_text + weights[1] * is_image
    wsum = w.sum().clamp(min=1e-9)
    z = (torch.logsumexp(logits, dim=-1).pow(2) * w).sum() / wsum
    return (ce * w).sum() / wsum + z_loss * z, logits.detach().norm(dim=-1)


@pytest.mark.parametrize("batch,seq,chunk,z", [(3, 7, 2048, 1e-3), (4, 33, 16, 1e-3), (2, 50, 7, 1e-4), (2, 9, 5, 0.0)])
def test_fused_loss_equals_the_reference_loss_and_gradients(batch, seq, chunk, z, monkeypatch):
    """The fused output layer + cross-entropy + z-loss, chunk by chunk, against the plain fp32
    loss over full logits: loss, gradients of the hidden states and of the output weight, parts."""
    from nmm.train import loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_TOKENS", chunk)  # 16, 7, 5: several chunks, a ragged last one
    g = torch.Generator().manual_seed(batch * seq)
    vocab, dim = 40, 12
    hidden = torch.randn(batch, seq, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * 0.7
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = (torch.rand(batch, seq, generator=g) > 0.3).to(torch.uint8)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    got, parts = loss_mod.fused_next_token_loss(h1, w1, tokens, mask, {"image": (30, 40)}, z, {"image": 0.5})
    want, norms = _reference_next_token_loss(h2 @ w2.t(), tokens, mask, (30, 40), z, (1.0, 0.5))
    (got * 1.7).backward()  # a scaled upstream gradient reaches both inputs
    (want * 1.7).backward()
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5, rtol=0)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-5, rtol=0)
    on = mask[:, 1:].float()
    is_image = ((tokens[:, 1:] >= 30) & (tokens[:, 1:] < 40)).float() * on
    text_norm = (norms * (on - is_image)).sum() / (on - is_image).sum()
    assert torch.allclose(parts["logit_norm_text"], text_norm, atol=1e-5)
    plain, plain_parts = next_token_loss(hidden @ weight.t(), tokens, mask, {"image": (30, 40)}, z, {"image": 0.5})
    assert torch.allclose(plain, want.detach(), atol=1e-5)
    for k in ("ce", "ce_text", "ce_image", "z", "tokens_text", "tokens_image"):
        assert torch.allclose(parts[k], plain_parts[k], atol=1e-5), k
    _, quiet = loss_mod.fused_next_token_loss(hidden, weight, tokens, mask, {"image": (30, 40)}, z, norms=False)
    assert "logit_norm_text" not in quiet and torch.allclose(quiet["ce"], parts["ce"], atol=1e-6)


def test_a_model_with_the_fused_head_trains_like_one_with_logits():
    """`model(x, head=head_loss(…))` gives the loss and parameter gradients of the logits path."""
    from nmm.train.loss import head_loss

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=48, dim=32, layers=2, heads=2, max_seq_len=16)
    a, b = cfg.build(), cfg.build()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 48, (3, 16))
    mask = torch.ones_like(x)
    la, _ = a(x, head=head_loss(x, mask, {"image": (40, 48)}, 1e-4))
    lb, _ = next_token_loss(b(x), x, mask, {"image": (40, 48)}, 1e-4)
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb, atol=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5), name


def test_targets_are_split_and_weighted_by_modality_name():
    """Text, audio and image targets in one batch: each modality's count and cross-entropy apart,
    and its loss weight taken by name (a modality the weights do not name weighs 1)."""
    g = torch.Generator().manual_seed(0)
    ranges = {"audio": (30, 40), "image": (40, 50)}
    logits = torch.randn(2, 6, 50, generator=g)
    tokens = torch.tensor([[1, 7, 31, 35, 42, 2], [1, 44, 45, 8, 39, 2]])
    mask = torch.ones_like(tokens)
    loss, parts = next_token_loss(logits, tokens, mask, ranges, 0.0, {"audio": 2.0, "image": 0.0})
    targets = tokens[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), targets.reshape(-1), reduction="none")
    is_audio = ((targets >= 30) & (targets < 40)).reshape(-1)
    is_image = ((targets >= 40) & (targets < 50)).reshape(-1)
    is_text = ~(is_audio | is_image)
    assert [parts[f"tokens_{m}"].item() for m in ("text", "audio", "image")] == [4, 3, 3]
    assert torch.allclose(parts["ce_audio"], ce[is_audio].mean()) and torch.allclose(
        parts["ce_text"], ce[is_text].mean()
    )
    w = is_text.float() + 2.0 * is_audio.float()  # image weighs 0
    assert torch.allclose(loss, (ce * w).sum() / w.sum())
