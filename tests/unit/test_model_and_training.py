"""Model architecture, loss, generation constraints, and exact resume (R15) on CPU."""

import json
import os
import signal

import numpy as np
import pytest
import torch

from nmm.model import ModelConfig
from nmm.model.generate import generate
from nmm.train import checkpoint
from nmm.train.batches import TrainData, batch_indices
from nmm.train.distributed import DistInfo
from nmm.train.loss import next_token_loss
from nmm.train.schedule import lr_at
from nmm.train.trainer import PhaseConfig, Preempted, TrainConfig, train

MIX = {"m2t": 0.5, "m2g": 0.5}  # equal shares of M2T and M2G rows

CPU = DistInfo(0, 0, 1, torch.device("cpu"))


def tiny(vocab=40, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, dim=32, layers=2, heads=2, max_seq_len=16, **kw)


def test_forward_is_causal():
    torch.manual_seed(0)
    m = tiny().build().eval()
    x = torch.randint(0, 40, (2, 10))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % 40
    assert torch.allclose(m(x)[:, :6], m(y)[:, :6], atol=1e-6)
    assert not torch.allclose(m(x)[:, 6:], m(y)[:, 6:])


def test_bidirectional_attention_shows_an_input_image_whole_and_leaves_the_rest_causal():
    from nmm.model.transformer import image_spans

    # <bos> <boi> 4 codes <eoi> text … ; images are ids 30..39, 4 codes per image
    row = torch.tensor([[1, 3, 30, 31, 32, 33, 4, 10, 11, 12]])
    spans = image_spans(row, (30, 40), 4)
    assert spans.tolist() == [[0, 0, 1, 1, 1, 1, 0, 0, 0, 0]]
    assert not image_spans(row, (30, 40), 4, given=torch.tensor([False])).any()  # an M2G target image
    assert not image_spans(row[:, :5], (30, 40), 4).any()  # an image still being drawn: causal
    assert image_spans(torch.cat([row, row[:, 1:6]], 1), (30, 40), 4).max() == 2  # two images, two ids
    torch.manual_seed(0)
    kw = dict(image_lo=30, image_hi=40, tokens_per_image=4)
    bi = tiny(**kw, image_attention="bidirectional").build().eval()
    changed = row.clone()
    changed[0, 5] = 39  # the image's last code
    a, b = bi(row, spans=spans), bi(changed, spans=spans)
    assert not torch.allclose(a[:, 2], b[:, 2])  # the image's first code now sees its last
    assert torch.allclose(a[:, :2], b[:, :2], atol=1e-6)  # what comes before the image does not
    assert torch.allclose(bi(row), bi(row, spans=torch.zeros_like(spans)), atol=1e-6)  # no spans: causal
    causal = tiny(**kw).build().eval()
    causal.load_state_dict(bi.state_dict())
    assert torch.allclose(causal(row, spans=spans), bi(row), atol=1e-6)  # a causal model ignores spans
    assert torch.allclose(causal(row)[:, 2], causal(changed)[:, 2], atol=1e-6)


def test_bidirectional_generation_equals_recomputing_with_the_prompt_image_whole():
    from nmm.model.transformer import image_spans

    torch.manual_seed(0)
    m = tiny(image_lo=30, image_hi=40, tokens_per_image=4, image_attention="bidirectional").build().eval()
    prompt = [1, 3, 30, 35, 32, 38, 4]
    seq = list(prompt)
    for _ in range(6):
        x = torch.tensor([seq])
        seq.append(20 + int(m(x, spans=image_spans(x, (30, 40), 4))[0, -1, 20:30].argmax()))
    (out,) = generate(m, [prompt], 6, allowed=(20, 30))
    assert out == seq[len(prompt) :]


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
    loss, parts = next_token_loss(logits, tokens, mask, image_range=(8, 10), z_loss=0.0)
    assert loss.item() == pytest.approx(np.log(10), rel=1e-5)
    assert parts["tokens_image"].item() == 2 and parts["tokens_text"].item() == 0
    assert parts["logit_norm_image"].item() == 0.0  # all-zero logits
    loud = torch.zeros(1, 4, 10)
    loud[0, 0] = 3.0  # position 0 predicts token 2, a text target (the image range is 8..9)
    _, parts = next_token_loss(loud, tokens, torch.tensor([[0, 1, 1, 1]]), image_range=(8, 10), z_loss=0.0)
    assert parts["logit_norm_text"].item() == pytest.approx(3.0 * 10**0.5)
    z_loss, parts = next_token_loss(logits, tokens, mask, image_range=(8, 10), z_loss=1.0)
    assert z_loss.item() == pytest.approx(np.log(10) + np.log(10) ** 2, rel=1e-5)


def test_generation_stays_inside_the_allowed_range():
    torch.manual_seed(0)
    m = tiny().build()
    outs = generate(
        m,
        [[1, 2, 3], [1, 2], [1, 2, 3]],
        5,
        allowed=(20, 30),
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert all(len(o) == 5 and all(20 <= t < 30 for t in o) for o in outs)


def test_kv_cache_gives_the_logits_of_a_full_forward():
    from nmm.model.transformer import KVCache

    torch.manual_seed(0)
    m = tiny().build().eval()
    x = torch.randint(0, 40, (3, 12))
    full = m(x)
    cache = KVCache(m.cfg, 3, "cpu")
    steps = [m(x[:, :5], cache), m(x[:, 5:9], cache)] + [m(x[:, i : i + 1], cache) for i in range(9, 12)]
    assert cache.length == 12
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_cached_greedy_generation_equals_recomputing_the_whole_sequence():
    torch.manual_seed(0)
    m = tiny().build().eval()
    prompt = [1, 5, 7, 3]
    seq = list(prompt)
    for _ in range(8):  # the slow way: the whole sequence through the model for every token
        logits = m(torch.tensor([seq]))[0, -1]
        seq.append(20 + int(logits[20:30].argmax()))
    (out,) = generate(m, [prompt], 8, allowed=(20, 30))
    assert out == seq[len(prompt) :]


def test_grid_positions_index_each_image_in_raster_order_and_survive_the_kv_cache():
    from nmm.model.transformer import KVCache, image_index

    # <bos> <boi> 4 codes <eoi> text <boi> 2 codes (an image being drawn); 2×2 grid, ids 30..39
    row = torch.tensor([[1, 3, 30, 31, 32, 33, 4, 10, 3, 35, 36]])
    assert image_index(row, (30, 40), 4).tolist() == [[-1, -1, 0, 1, 2, 3, -1, -1, -1, 0, 1]]
    assert image_index(row[:, 3:6], (30, 40), 4, before=torch.tensor([1])).tolist() == [[1, 2, 3]]
    assert image_index(torch.tensor([[30] * 6]), (30, 40), 4).tolist() == [[0, 1, 2, 3, -1, -1]]  # never past the grid

    torch.manual_seed(0)
    kw = dict(image_lo=30, image_hi=40, tokens_per_image=4)
    grid = tiny(**kw, image_positions="grid").build().eval()
    assert grid.image_row.weight.shape == grid.image_col.weight.shape == (2, 32)
    plain = tiny(**kw).build().eval()
    plain.load_state_dict({k: v for k, v in grid.state_dict().items() if not k.startswith("image_")})
    text = torch.tensor([[1, 5, 7, 10, 11]])
    assert torch.allclose(grid(text), plain(text), atol=1e-6)  # no image: the grid adds nothing
    assert not torch.allclose(grid(row), plain(row))
    swapped = row.clone()
    swapped[0, 2:6] = torch.tensor([31, 30, 33, 32])  # the same codes, columns swapped
    assert not torch.allclose(grid(swapped)[:, -1], grid(row)[:, -1])

    full = grid(row)
    cache = KVCache(grid.cfg, 1, "cpu")
    steps = [grid(row[:, :4], cache)] + [grid(row[:, i : i + 1], cache) for i in range(4, 11)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    prompt = [1, 10, 3]  # M2G: draw an image after <boi>; the decode path counts the codes
    seq = list(prompt)
    for _ in range(4):
        seq.append(30 + int(grid(torch.tensor([seq]))[0, -1, 30:40].argmax()))
    (out,) = generate(grid, [prompt], 4, allowed=(30, 40))
    assert out == seq[len(prompt) :]


def test_guidance_one_is_plain_sampling_and_guidance_moves_towards_the_condition():
    torch.manual_seed(0)
    m = tiny().build().eval()
    prompts, blank = [[1, 5, 7, 3]] * 4, [[1, 0, 0, 3]] * 4
    plain = generate(m, prompts, 6, allowed=(20, 30))
    assert generate(m, prompts, 6, allowed=(20, 30), guidance=1.0, uncond=blank) == plain
    # guidance 0 samples from the unconditional prompt alone
    assert generate(m, prompts, 6, allowed=(20, 30), guidance=0.0, uncond=blank) == generate(
        m, blank, 6, allowed=(20, 30)
    )
    with pytest.raises(ValueError, match="length"):
        generate(m, prompts, 6, allowed=(20, 30), guidance=2.0, uncond=[[1, 3]] * 4)


def test_lr_warms_up_then_decays_to_ten_percent():
    p = PhaseConfig(mixture=MIX, name="p", steps=100, batch_size=4, lr=1.0, warmup_steps=10)
    assert lr_at(p, 0) == pytest.approx(0.1)
    assert lr_at(p, 9) == pytest.approx(1.0)
    assert lr_at(p, 99) == pytest.approx(0.1, abs=0.01)


def test_batches_are_a_pure_function_of_seed_and_step_and_follow_the_mixture():
    rows = {"m2t": np.arange(0, 50), "m2g": np.arange(50, 100)}
    p = PhaseConfig(name="p", steps=10, batch_size=20, lr=1e-3, mixture={"m2t": 0.75, "m2g": 0.25})
    a, b = batch_indices(rows, p, 0, 3), batch_indices(rows, p, 0, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, batch_indices(rows, p, 0, 4))
    assert (a < 50).sum() == 15


def _data(n=64, length=12, vocab=40):
    g = np.random.default_rng(0)
    tokens = g.integers(5, vocab, (n, length)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=np.uint8)
    mask[:, :3] = 0
    task = (np.arange(n) % 2).astype(np.int8)
    return tokens, mask, task


def _cfg(steps, interval=1000):
    return TrainConfig(
        model=tiny(dropout=0.1),
        phases=(
            PhaseConfig(mixture=MIX, name="a", steps=steps // 2, batch_size=8, lr=3e-3, warmup_steps=2),
            PhaseConfig(mixture=MIX, name="b", steps=steps - steps // 2, batch_size=8, lr=1e-3),
        ),
        seed=3,
        checkpoint_interval=interval,
        keep_latest=2,
        log_every=1,
    )


def test_sigterm_checkpoints_and_resume_matches_uninterrupted_training_bitwise_r15_r18(tmp_path):
    tokens, mask, task = _data()
    data = TrainData(tokens=tokens, loss_mask=mask, task=task, image_range=(30, 40))
    straight, _ = train(_cfg(12), data, CPU, (tmp_path / "a").as_uri(), lambda m, s: None)
    # Same config, interrupted: SIGTERM arrives at step 10 (inside phase b), the trainer
    # checkpoints and stops; a fresh call resumes from that checkpoint.
    root = (tmp_path / "b").as_uri()

    def kill_at_ten(metrics, step):
        if step == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
        train(_cfg(12), data, CPU, root, kill_at_ten)
    resumed, summary = train(_cfg(12), data, CPU, root, lambda m, s: None)
    assert summary["resumed_from"] == 10
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_checkpoint_without_manifest_is_never_loaded_and_old_ones_go_after_commit_r14_r16(tmp_path):
    root = (tmp_path / "ck").as_uri()
    for step in (1, 2, 3):
        checkpoint.save(root, step, {"w": torch.full((2,), float(step))}, keep_latest=2)
    assert not (tmp_path / "ck" / "step-00000001" / "manifest.json").exists()
    step, state = checkpoint.load_latest(root)
    assert step == 3 and state["w"][0].item() == 3.0
    # A crash after the data but before the manifest of step 3: step 3 must not load.
    (tmp_path / "ck" / "step-00000003" / "manifest.json").unlink()
    step, state = checkpoint.load_latest(root)
    assert step == 2


@pytest.mark.parametrize("kind", ["patch-vq", "colour-mask"])
def test_published_model_folder_serves_through_the_pyfunc_loader(tmp_path, kind):
    from nmm.serve.model_dir import model_files
    from nmm.serve.pyfunc import _load_pyfunc
    from nmm.tokenizers import ColourMaskVQ, PatchVQ, SharedVocab, TextTokenizer

    text = TextTokenizer.train("bpe", ["a handwritten digit 3", "the number seven"], 64)
    images = np.random.default_rng(0).random((20, 8, 8, 1), dtype=np.float32).round(1)
    vq = PatchVQ.fit(images, 2, 8) if kind == "patch-vq" else ColourMaskVQ.fit(images, 2, 4, 6)
    vocab = SharedVocab(text_size=text.size, image_size=vq.size)
    cfg = ModelConfig(vocab_size=vocab.size, dim=32, layers=1, heads=2, max_seq_len=40, image_factors=vq.factors)
    config = {"model": json.loads(cfg.to_json()), "vocab": {"text_size": text.size, "image_size": vq.size}}
    model = cfg.build()
    for name, data in model_files(model, config, text.to_bytes(), vq.to_bytes()).items():
        (tmp_path / name).write_bytes(data)
    predictor = _load_pyfunc(str(tmp_path))
    drawn, captioned = predictor.predict([{"prompt": "a handwritten digit 3"}, {"image_codes": [0] * 16}])
    assert np.asarray(drawn["image"]).shape == (8, 8, 1)
    assert isinstance(captioned["text"], str)
    assert type(predictor.m.vq) is type(vq) and predictor.m.model.cfg.image_factors == vq.factors


def test_generation_stops_at_the_context_length_without_a_stop_token():
    torch.manual_seed(0)
    m = ModelConfig(vocab_size=40, dim=32, layers=1, heads=2, max_seq_len=12).build()
    (out,) = generate(m, [list(range(1, 11))], max_new=24, allowed=(20, 30), stop=2)
    assert len(out) == 2  # 10 prompt tokens + 2 = the 12-token context


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
    got, parts = loss_mod.fused_next_token_loss(h1, w1, tokens, mask, (30, 40), z, (1.0, 0.5))
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
    plain, plain_parts = next_token_loss(hidden @ weight.t(), tokens, mask, (30, 40), z, (1.0, 0.5))
    assert torch.allclose(plain, want.detach(), atol=1e-5)
    for k in ("ce", "ce_text", "ce_image", "z", "tokens_text", "tokens_image"):
        assert torch.allclose(parts[k], plain_parts[k], atol=1e-5), k
    _, quiet = loss_mod.fused_next_token_loss(hidden, weight, tokens, mask, (30, 40), z, norms=False)
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
    la, _ = a(x, head=head_loss(x, mask, (40, 48), 1e-4))
    lb, _ = next_token_loss(b(x), x, mask, (40, 48), 1e-4)
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb, atol=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5), name


def test_factored_codes_are_the_sums_of_their_factors_and_survive_the_config_json():
    cfg = tiny(vocab=40, image_factors=(3, 4))  # 12 codes: the ids 28..39, code (a, b) = 28 + 4a + b
    assert ModelConfig.from_json(cfg.to_json()) == cfg and cfg.image_factors == (3, 4)
    m = cfg.build()
    colour, mask = m.code_embed.tables
    assert m.embed.weight.shape == (28, 32) and m.embed_weight().shape == (40, 32)
    assert torch.equal(m.embed_weight()[28 + 4 * 2 + 1], colour[2] + mask[1])
    assert torch.equal(m.head_weight()[:28], m.head.weight)
    assert m(torch.randint(0, 40, (2, 5))).shape == (2, 5, 40)
    with pytest.raises(ValueError, match="more codes than"):
        tiny(vocab=10, image_factors=(3, 4))


@pytest.mark.parametrize("factors", [(5, 5), ()])
def test_factored_codes_draw_a_pair_training_never_showed(factors):
    """Colour word c and shape word s ask for the code (c, s). Trained on every pair but (1, 1),
    the factored model draws (1, 1) when asked for it; a model with a row per code cannot.
    (Five of each: with three, the factored model drew the pair on 4 of 6 seeds; with five on 8 of 8.)"""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=36, dim=32, layers=2, heads=2, max_seq_len=4, image_factors=factors)
    model = cfg.build()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    code = lambda c, s: 11 + 5 * c + s
    rows = torch.tensor([[c, 5 + s, code(c, s)] for c in range(5) for s in range(5) if (c, s) != (1, 1)])
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(model(rows[:, :2])[:, -1], rows[:, 2])
        opt.zero_grad()
        loss.backward()
        opt.step()
    drawn = model(torch.tensor([[1, 6]]))[0, -1, 11:].argmax().item() + 11
    assert (drawn == code(1, 1)) == bool(factors)
