"""Generation: the allowed range, the KV cache against recomputing, guidance, the context length."""

import pytest
import torch

from nmm.model import ModelConfig
from nmm.model.generate import generate
from tests.unit.tiny import tiny


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


def test_generation_stops_at_the_context_length_without_a_stop_token():
    torch.manual_seed(0)
    m = ModelConfig(vocab_size=40, dim=32, layers=1, heads=2, max_seq_len=12).build()
    (out,) = generate(m, [list(range(1, 11))], max_new=24, allowed=(20, 30), stop=2)
    assert len(out) == 2  # 10 prompt tokens + 2 = the 12-token context
