"""GRPO and RLOO: advantages, baselines and clipping against hand-computed values, KL zero before
the first update, resume, the command line, and a tiny policy that improves a hidden gold score
through a learned reward model."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.training.test_ppo import PROMPTS, _rows, assert_resuming_is_bit_exact, gold, gold_win_rate, write_prompts
from training import grpo, ppo
from training.grpo import GRPOConfig, grpo_advantages, grpo_loss, leave_one_out_baseline, rloo_loss

ROOT = Path(__file__).resolve().parents[2]
TINY = {"batch_size": 2, "group_size": 2, "max_new_tokens": 6, "learning_rate": 3e-3}


def test_grpo_advantages_are_each_groups_z_scores():
    advantages = grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0]), group_size=4)
    # First group: mean 3, standard deviation sqrt((4 + 1 + 0 + 9) / 3) (Bessel's correction).
    std = math.sqrt(14 / 3)
    assert advantages[:4].tolist() == pytest.approx([-2 / (std + 1e-4), -1 / (std + 1e-4), 0.0, 3 / (std + 1e-4)])
    assert advantages[4:].tolist() == [0.0] * 4  # a group that agrees teaches nothing


def test_rloo_baseline_is_the_mean_of_the_other_rewards_of_the_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    baseline = leave_one_out_baseline(rewards, group_size=4)
    assert baseline.tolist() == pytest.approx([11 / 3, 10 / 3, 3.0, 2.0])
    assert (rewards - baseline).tolist() == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0])
    # Groups of two: each is the other's baseline.
    assert leave_one_out_baseline(torch.tensor([1.0, 5.0, 0.0, 2.0]), group_size=2).tolist() == [5.0, 1.0, 2.0, 0.0]


def test_grpo_clips_each_token_and_keeps_the_kl_gradient():
    advantages = torch.tensor([1.0, -1.0])  # one per response
    old = reference = torch.zeros(2, 2)
    # Response 0 (A = 1): ratios 1.5 (clipped) and 0.5; response 1 (A = -1): 1.5 and 0.5 (clipped).
    ratios = torch.tensor([[1.5, 0.5], [1.5, 0.5]])
    logprobs = ratios.log().requires_grad_()
    loss, clip_fraction, _ = grpo_loss(logprobs, old, reference, advantages, torch.ones(2, 2), clip=0.2, beta=0.0)
    # max(-A r, -A clip(r)) per token: -1.2, -0.5 | 1.5, 0.8; each response's mean, then their mean.
    assert loss.item() == pytest.approx(((-1.2 - 0.5) / 2 + (1.5 + 0.8) / 2) / 2)
    assert clip_fraction.item() == 0.5
    loss.backward()
    # d/dlogp of -A r / 4 is -A r / 4 where the ratio is not clipped, 0 where it is.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.125], [0.375, 0.0]]))

    logprobs.grad = None
    loss, _, _ = grpo_loss(logprobs, old, reference, advantages, torch.ones(2, 2), clip=0.2, beta=0.1)
    loss.backward()
    # The k3 term's gradient, beta * (1 - exp(ref - logp)) / 4, passes on clipped tokens too.
    kl_grad = [[0.1 * (1 - 1 / r) / 4 for r in row] for row in ratios.tolist()]
    expected = [[0.0 + kl_grad[0][0], -0.125 + kl_grad[0][1]], [0.375 + kl_grad[1][0], 0.0 + kl_grad[1][1]]]
    torch.testing.assert_close(logprobs.grad, torch.tensor(expected))


def test_the_unbiased_kl_has_the_same_value_on_policy_and_the_reverse_kls_gradient():
    # On-policy (old = logp), as in the default one update a rollout; no advantage: only the KL acts.
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    old, reference = logprobs.detach().clone(), torch.tensor([[-1.5, -1.0], [-0.5, -2.0]])
    mask, advantages = torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.zeros(2)
    gradients, values = [], []
    for unbiased in (False, True):
        logprobs.grad = None
        loss, _, _ = grpo_loss(logprobs, old, reference, advantages, mask, clip=0.2, beta=0.1, unbiased_kl=unbiased)
        loss.backward()
        gradients.append(logprobs.grad.clone())
        values.append(loss.item())
    assert values[0] == pytest.approx(values[1])  # the ratio is 1: the loss reads the same
    # Weights: response 0 has two tokens (1/2 each), response 1 one; then the mean of the 2 responses.
    weights = torch.tensor([[0.25, 0.25], [0.5, 0.0]])
    x = logprobs.detach() - reference
    torch.testing.assert_close(gradients[0], 0.1 * weights * (1 - torch.exp(-x)))  # k3's own
    torch.testing.assert_close(gradients[1], 0.1 * weights * x)  # d KL(pi || ref): (logp - ref) d logp


def test_rloo_clips_the_ratio_of_the_whole_response():
    old = torch.zeros(2, 2)
    # Response 0: token ratios 1.25 and 1.2, a response ratio of 1.5 (clipped at 1.2 for A > 0);
    # response 1: 1.1 and 1.0, then padding, whose log-prob counts for nothing.
    logprobs = torch.tensor([[1.25, 1.2], [1.1, 7.0]]).log().requires_grad_()
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, clip_fraction, _ = rloo_loss(logprobs, old, torch.tensor([1.0, 1.0]), mask, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 - 1.1) / 2)
    assert clip_fraction.item() == 0.5
    loss.backward()
    # -A r / 2 on every real token of the unclipped response; nothing on the clipped one or on padding.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0], [-0.55, 0.0]]))


def test_bad_settings_are_refused_before_any_model_loads(tmp_path):
    with pytest.raises(ValueError, match="estimator 'ppo'"):
        grpo.train(GRPOConfig(estimator="ppo"), PROMPTS, tmp_path / "a")
    with pytest.raises(ValueError, match="group_size 1"):
        grpo.train(GRPOConfig(group_size=1), PROMPTS, tmp_path / "b")
    with pytest.raises(ValueError, match="top_p 0.9"):
        grpo.train(GRPOConfig(top_p=0.9), PROMPTS, tmp_path / "c")


@pytest.mark.parametrize("estimator", grpo.ESTIMATORS)
def test_kl_is_zero_before_the_first_update_and_grows_after(tiny_policy, banana_reward_model, tmp_path, estimator):
    config = GRPOConfig(policy=tiny_policy, reward_model=banana_reward_model, estimator=estimator, steps=2, **TINY)
    grpo.train(config, PROMPTS, tmp_path / "out")
    first, second = _rows(tmp_path / "out")
    assert first["objective/kl"] == 0.0 and first["objective/kl_k3"] == 0.0  # policy == reference, bit for bit
    assert first["objective/non_score_reward"] == 0.0
    assert abs(second["objective/kl"]) > 1e-4  # the update moved the policy away from the reference
    assert first["policy/clipfrac"] == 0.0  # one on-policy pass: every ratio is 1


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tiny_policy, banana_reward_model, tmp_path):
    # Two passes of two minibatches: the shuffled order, and ratios off 1, must resume too.
    config = GRPOConfig(
        policy=tiny_policy, reward_model=banana_reward_model, steps=4, checkpoint_every=2, epochs=2, minibatches=2,
        **TINY,
    )  # fmt: skip
    assert_resuming_is_bit_exact(grpo.train, config, tmp_path)
    assert any(row["policy/clipfrac"] > 0 for row in _rows(tmp_path / "straight"))


def test_command_line_trains_with_lora_and_writes_policy_config_and_metrics(tiny_policy, banana_reward_model, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    args = [sys.executable, "-m", "training.grpo", "--policy", tiny_policy, "--reward-model", banana_reward_model,
            "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--estimator", "rloo", "--group-size", "3",
            "--steps", "2", "--batch-size", "2", "--max-new-tokens", "6", "--beta", "0.1", "--learning-rate", "1e-3",
            "--lora", "--seed", "3"]  # fmt: skip
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2
    config = json.loads((tmp_path / "out" / "grpo_config.json").read_text())
    assert (config["estimator"], config["group_size"], config["beta"], config["lora"]) == ("rloo", 3, 0.1, True)
    assert len(_rows(tmp_path / "out")) == 2
    assert not (tmp_path / "out" / "adapter_config.json").exists()  # the adapters are merged
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert set(merged) == set(AutoModelForCausalLM.from_pretrained(tiny_policy).state_dict())
    assert "2/2" in done.stderr  # the progress bar


SEEDS = 3  # runs per estimator: the claims below are about their pooled figures, not one lucky run


@pytest.mark.statistical
@pytest.mark.parametrize("estimator", grpo.ESTIMATORS)
def test_a_tiny_policy_improves_the_hidden_gold_score(
    tiny_policy, banana_reward_model, tmp_path, seed_offset, figures, estimator
):
    """The banana reward model likes more bananas without end; the hidden judge likes one or two.
    With a KL leash (beta 0.3) and 15 steps the policy learns to say banana, and gold improves."""
    held_out = [f"question w{i} w{i + 1}" for i in range(20)] * 3
    before = ppo.generate(tiny_policy, held_out, max_new_tokens=12, temperature=1.0, seed=1)
    gold_before = sum(map(gold, before)) / len(before)
    rises, gold_after, wins = [], [], []
    for seed in range(100 * seed_offset, 100 * seed_offset + SEEDS):
        config = GRPOConfig(
            policy=tiny_policy, reward_model=banana_reward_model, estimator=estimator, steps=15, batch_size=4,
            group_size=4, max_new_tokens=12, learning_rate=5e-3, beta=0.3, seed=seed,
        )  # fmt: skip
        summary = grpo.train(config, PROMPTS, tmp_path / f"seed-{seed}")
        rises.append(summary["score"] - _rows(tmp_path / f"seed-{seed}")[0]["objective/score"])
        after = ppo.generate(str(tmp_path / f"seed-{seed}"), held_out, max_new_tokens=12, temperature=1.0, seed=1)
        gold_after.append(sum(map(gold, after)) / len(after))
        wins.append(gold_win_rate(after, before))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    rise = figures(f"{estimator}.proxy_rise", mean(rises))
    gold_change = figures(f"{estimator}.gold_change", mean(gold_after) - gold_before)
    win_rate = figures(f"{estimator}.gold_win_rate", mean(wins))
    # Seen pooled over 3 seeds, seed offsets 0-4, 1 and 2 threads (2 threads gave the same figures):
    # GRPO rise 0.66 to 1.54, gold +0.68 to +0.76, win rate 0.75 to 0.77; RLOO rise 0.19 to 1.75,
    # gold +0.33 to +0.73, win rate 0.64 to 0.76 (its worst, offset 1, at 10 steps was +0.24 and 0.61).
    assert rise > 0
    assert gold_change > 0.15 and win_rate > 0.55
