"""GRPO's objective (nmm.train.grpo) against hand computations."""

import dataclasses
import math
import os
import signal

import numpy as np
import pytest
import torch

from nmm.train.grpo import ADV_EPS, group_advantages, policy_loss, token_logprobs
from nmm.train.recipes import GrpoOptions
from nmm.train.rewards import Reward, answer_exact, drawn_images
from nmm.train.trainer import PhaseConfig, Preempted, TrainConfig, train
from tests.unit.test_recipes import CPU, IMAGE, MIX, TEXT, model_cfg, train_data


def test_advantages_are_standardised_within_each_group():
    # group 1: rewards 0, 1, 1, 0 → mean 0.5, Bessel std sqrt(1/3); group 2: all 1 → nothing to learn
    adv = group_advantages(torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]), group=4)
    s = math.sqrt(1 / 3) + ADV_EPS
    expected = [-0.5 / s, 0.5 / s, 0.5 / s, -0.5 / s, 0.0, 0.0, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    # 3 completions scored 1, 2, 6: mean 3, std sqrt(((-2)²+(-1)²+3²)/2) = sqrt(7)
    adv = group_advantages(torch.tensor([1.0, 2.0, 6.0]), group=3)
    assert adv.tolist() == pytest.approx(
        [-2 / (math.sqrt(7) + ADV_EPS), -1 / (math.sqrt(7) + ADV_EPS), 3 / (math.sqrt(7) + ADV_EPS)], abs=1e-6
    )
    with pytest.raises(ValueError, match="multiple of group=4"):
        group_advantages(torch.zeros(6), group=4)


def test_the_clipped_loss_matches_a_hand_computation():
    # one completion, advantage +2, two sampled tokens (position 0 is the prompt) and clip 0.2:
    # token 1: ratio e^0.5 = 1.6487 → clipped to 1.2: objective min(3.2974, 2.4) = 2.4 (clipped)
    # token 2: ratio e^-0.1 = 0.9048 → inside the range: objective 1.8097
    # KL (k3) with ref − logp = 0.3 and 0: e^0.3 − 0.3 − 1 = 0.049859, and 0
    logp = torch.tensor([[0.0, -1.0, -2.0]])
    old = torch.tensor([[0.0, -1.5, -1.9]])
    ref = torch.tensor([[0.0, -0.7, -2.0]])
    sampled = torch.tensor([[0, 1, 1]])
    loss, parts = policy_loss(logp, old, ref, torch.tensor([2.0]), sampled, clip=0.2, kl_weight=0.1)
    k3 = math.exp(0.3) - 0.3 - 1
    objective = [2.4, math.exp(-0.1) * 2]
    expected = (-objective[0] + 0.1 * k3 - objective[1]) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert parts["clip_fraction"].item() == pytest.approx(0.5)
    assert parts["kl"].item() == pytest.approx(k3 / 2, abs=1e-7)
    assert parts["pg"].item() == pytest.approx(-sum(objective) / 2, abs=1e-6)
    # a negative advantage clips from below: ratio 0.5 → 0.8, objective min(−1, −1.6) = −1.6 (clipped)
    loss, parts = policy_loss(
        torch.tensor([[0.0, math.log(0.5)]]),
        torch.zeros(1, 2),
        torch.zeros(1, 2),
        torch.tensor([-2.0]),
        torch.tensor([[0, 1]]),
        clip=0.2,
        kl_weight=0.0,
    )
    assert loss.item() == pytest.approx(1.6, abs=1e-6) and parts["clip_fraction"].item() == 1.0


def test_the_kl_term_is_zero_when_policy_and_reference_agree_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    tokens = torch.randint(11, (3, 6))
    sampled = torch.ones(3, 6, dtype=torch.long)
    logp = token_logprobs(logits, tokens)
    _, same = policy_loss(logp, logp, logp, torch.zeros(3), sampled, clip=0.2, kl_weight=1.0)
    assert same["kl"].item() == 0.0
    _, other = policy_loss(
        logp,
        logp,
        token_logprobs(logits + torch.randn(3, 6, 11), tokens),
        torch.zeros(3),
        sampled,
        clip=0.2,
        kl_weight=1.0,
    )
    assert other["kl"].item() > 0.0


def test_token_logprobs_reads_each_token_from_the_position_before_it():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 5.0  # position 0 predicts token 1 (= 2)
    logits[0, 1, 3] = 1.0  # position 1 predicts token 2 (= 1): not the favoured one
    lp = token_logprobs(logits, torch.tensor([[0, 2, 1]]))
    assert lp[0, 0].item() == 0.0
    assert lp[0, 1].item() == pytest.approx(5 - math.log(math.exp(5) + 3), abs=1e-6)
    assert lp[0, 2].item() == pytest.approx(-math.log(math.exp(1) + 3), abs=1e-6)
    # at temperature 2 the logits are halved first
    assert token_logprobs(logits, torch.tensor([[0, 2, 1]]), 2.0)[0, 1].item() == pytest.approx(
        2.5 - math.log(math.exp(2.5) + 3), abs=1e-6
    )


def test_the_gradient_pushes_up_completions_with_positive_advantage():
    logits = torch.zeros(2, 2, 3, requires_grad=True)
    tokens = torch.tensor([[0, 1], [0, 1]])
    logp = token_logprobs(logits, tokens)
    loss, _ = policy_loss(
        logp,
        logp.detach(),
        logp.detach(),
        torch.tensor([1.0, -1.0]),
        torch.tensor([[0, 1], [0, 1]]),
        clip=0.2,
        kl_weight=0.0,
    )
    loss.backward()
    assert logits.grad[0, 0, 1] < 0 < logits.grad[1, 0, 1]  # descent raises row 0's token 1, lowers row 1's


# --- the recipe in the trainer, on the tiny model and data of test_recipes -------------------


COLOUR = 3  # the toy reward: the share of the drawn image's codes that are code 3 ("draw colour 3")


def colour(rows, tokens, sampled) -> torch.Tensor:
    return torch.from_numpy((drawn_images(tokens, sampled, IMAGE, 4) == COLOUR).mean(1))


def rl_cfg(steps: int = 24, **phase) -> TrainConfig:
    return TrainConfig(
        model=model_cfg(image_lo=IMAGE[0], image_hi=IMAGE[1], tokens_per_image=4),
        phases=(
            PhaseConfig(mixture=MIX, name="pre", steps=20, batch_size=8, lr=1e-2),
            PhaseConfig(
                mixture={"m2g": 1.0},
                name="rl",
                steps=steps,
                batch_size=4,
                lr=1e-2,
                recipe="grpo",
                options=GrpoOptions(reference="pre", reward=(("colour", 1.0),), group=8, **phase),
            ),
        ),
        seed=2,
        checkpoint_interval=1000,
        log_every=1,
    )


def test_an_rl_phase_raises_the_mean_reward_of_a_toy_reward(tmp_path):
    seen, samples = {}, {}
    train(
        rl_cfg(samples_every=10),
        train_data(),
        CPU,
        tmp_path.as_uri(),
        lambda m, s: seen.update({s: m}),
        rewards={"colour": Reward("colour", "m2g", colour)},
        on_samples=lambda step, phase, x, sampled: samples.update({step: (phase, x, sampled)}),
    )
    rl = [seen[s] for s in range(21, 45)]
    assert {
        "train/reward",
        "train/reward/colour",
        "train/reward_std",
        "train/reward_std/colour",
        "train/kl",
        "train/clip_fraction",
    } <= set(rl[0])
    # the phase's completions every 10 steps and at its end: 4 prompts × a group of 8 each
    assert sorted(samples) == [30, 40, 44] and all(p == "rl" and x.shape[0] == 32 for p, x, _ in samples.values())
    _, x, sampled = samples[44]
    assert (sampled.sum(1) == 4).all()  # each completion: one whole image drawn, nothing else sampled
    assert ((x[sampled.bool()] >= IMAGE[0]) & (x[sampled.bool()] < IMAGE[1])).all()
    first, last = np.mean([m["train/reward"] for m in rl[:4]]), np.mean([m["train/reward"] for m in rl[-4:]])
    assert first < 0.3 and last > first + 0.3, (first, last)
    assert all(m["train/clip_fraction"] == 0.0 for m in rl)  # one update per sample: the ratio is 1
    assert rl[-1]["train/kl"] > 0.0  # the policy moved off its reference


def test_several_updates_on_each_sample_make_the_clip_bind_and_still_raise_the_reward(tmp_path):
    seen = {}
    train(
        rl_cfg(12, updates=3, clip=0.05),
        train_data(),
        CPU,
        tmp_path.as_uri(),
        lambda m, s: seen.update({s: m}),
        rewards={"colour": Reward("colour", "m2g", colour)},
    )
    rl = [seen[s] for s in range(21, 33)]
    assert max(m["train/clip_fraction"] for m in rl) > 0.05  # later updates move the ratio past 1 ± clip
    first, last = np.mean([m["train/reward"] for m in rl[:3]]), np.mean([m["train/reward"] for m in rl[-3:]])
    assert last > first + 0.2, (first, last)


@pytest.mark.parametrize("updates", [1, 2])
def test_an_rl_phase_resumes_bitwise(tmp_path, updates):
    rewards = {"colour": Reward("colour", "m2g", colour)}
    cfg = rl_cfg(8, updates=updates)
    straight, _ = train(cfg, train_data(), CPU, (tmp_path / "a").as_uri(), lambda m, s: None, rewards=rewards)
    root = (tmp_path / "b").as_uri()

    def kill_inside_rl(metrics, step):
        if step == 24:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
        train(cfg, train_data(), CPU, root, kill_inside_rl, rewards=rewards)
    resumed, summary = train(cfg, train_data(), CPU, root, lambda m, s: None, rewards=rewards)
    assert summary["resumed_from"] == 24
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_sampling_phase_is_logged_at_least_twenty_times():
    from nmm.train.trainer import log_interval

    cfg = dataclasses.replace(rl_cfg(250), log_every=50)  # the train stage's interval for a long run
    pre, rl = cfg.phases
    assert log_interval(cfg, pre) == 50 and log_interval(cfg, rl) == 12
    assert log_interval(cfg, dataclasses.replace(rl, steps=10)) == 1


def test_a_grpo_phase_without_its_reward_is_refused():
    with pytest.raises(ValueError, match="missing \\['colour'\\]"):
        train(rl_cfg(), train_data(), CPU, "file:///nonexistent", lambda m, s: None, rewards={})


def test_answer_exact_scores_the_reference_answer_one_and_anything_else_zero():
    from nmm.tokenizers.vocab import EOS, PAD

    tokens = np.array([[1, 2, 9, 8, EOS, PAD]])  # prompt 1 2, answer 9 8 <eos>
    mask = np.array([[0, 0, 1, 1, 1, 0]])
    fn = answer_exact(tokens, mask)
    x = torch.tensor([[1, 2, 9, 8, EOS], [1, 2, 9, 7, EOS], [1, 2, 9, 8, 8]])  # exact; a wrong word; one word too many
    sampled = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert fn(np.array([0, 0, 0]), x, sampled).tolist() == [1.0, 0.0, 0.0]


def test_guided_logits_are_those_generation_samples_from_and_blank_only_the_drawing_prompts():
    from nmm.tokenizers.vocab import BOI, BOS, EOI, EOS, PAD
    from nmm.train.recipes.grpo import guided_logits, unconditional

    torch.manual_seed(0)
    model = model_cfg().build().eval()
    drawing = [BOS, 7, 8, 9, BOI, 31, 32, 33, 34, EOI]  # a caption, then the image it drew
    writing = [BOS, BOI, 31, 32, 33, 34, EOI, 7, 8, EOS]  # an image, then the caption it wrote
    x = torch.tensor([drawing, writing])
    sampled = torch.tensor([[0] * 5 + [1] * 4 + [0], [0] * 7 + [1] * 3])
    blank = unconditional(x, sampled, IMAGE, TEXT)
    assert blank[0].tolist() == [BOS, PAD, PAD, PAD, BOI, 31, 32, 33, 34, EOI]  # the caption padded out
    assert torch.equal(blank[1], x[1])  # a written answer's prompt keeps its image
    with torch.no_grad():
        cond, uncond = model(x), model(blank)
        assert torch.allclose(
            guided_logits(model, x, blank, 2.5, None, None), uncond + 2.5 * (cond - uncond), atol=1e-5
        )
        assert torch.allclose(guided_logits(model, x, blank, 2.5, None, None)[1], cond[1], atol=1e-5)
        assert torch.equal(guided_logits(model, x, None, 2.5, None, None), cond)


def test_an_rl_phase_with_guidance_raises_the_reward_of_its_guided_drawings(tmp_path):
    seen = {}
    train(
        rl_cfg(guidance=2.0),
        train_data(),
        CPU,
        tmp_path.as_uri(),
        lambda m, s: seen.update({s: m}),
        rewards={"colour": Reward("colour", "m2g", colour)},
    )
    rl = [seen[s] for s in range(21, 45)]
    first, last = np.mean([m["train/reward"] for m in rl[:4]]), np.mean([m["train/reward"] for m in rl[-4:]])
    assert last > first + 0.3, (first, last)
    assert all(m["train/clip_fraction"] == 0.0 for m in rl)  # the ratio of guided probabilities starts at 1 too
