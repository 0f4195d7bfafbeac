"""The transformer: causal and bidirectional attention, grid positions, the KV cache, factored codes."""

import pytest
import torch

from nmm.model import ModelConfig
from nmm.model.generate import generate
from tests.unit.tiny import tiny


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
