"""PPO core: the objective's pieces against hand-computed values, log-probs that match sampling,
resume, LoRA, the command line, and over-optimization reproduced with a tiny policy."""

import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from training import ppo
from training.hacking import hacking_reason
from training.ppo import PPOConfig, gae, policy_loss, shaped_rewards, value_loss, whiten

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [f"question w{i}" for i in range(20)]
TINY = {"batch_size": 16, "max_new_tokens": 12, "learning_rate": 3e-3, "temperature": 1.0}


def test_gae_matches_hand_computed_values_and_stops_at_the_last_real_token():
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.2, 0.4]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    # t=2: 1 - 0.4 = 0.6; t=1: (0 + 0.4 - 0.2) + 0.5*0.6 = 0.5; t=0: (0 + 0.2 - 0.5) + 0.5*0.5 = -0.05
    assert advantages.tolist()[0] == pytest.approx([-0.05, 0.5, 0.6])
    assert returns.tolist()[0] == pytest.approx([0.45, 0.7, 1.0])
    # A padded position contributes nothing, whatever reward or value it carries.
    advantages, _ = gae(torch.tensor([[0.0, 1.0, 9.0]]), torch.tensor([[0.5, 0.2, 7.0]]), torch.tensor([[1.0, 1, 0]]),
                        gamma=1.0, lam=0.5)  # fmt: skip
    assert advantages.tolist()[0] == pytest.approx([0.1, 0.8, 0.0])


def test_whitening_uses_only_real_tokens():
    whitened = whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1, 1, 0]]))
    assert whitened.tolist()[0] == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-4)


def test_kl_penalty_on_every_token_and_the_score_on_the_eos_token_not_the_first_pad():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    reference = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, -1.0]])
    mask = torch.tensor([[1.0, 1, 1], [1.0, 1, 0]])  # the second response ended with EOS at index 1
    rewards, kl = shaped_rewards(logprobs, reference, mask, torch.tensor([2.0, 5.0]), beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0], [0.0, 1.0, 0.0]]))
    assert rewards.tolist()[0] == pytest.approx([-0.05, 0.0, 0.1 + 2.0])
    assert rewards.tolist()[1] == pytest.approx([0.0, -0.1 + 5.0, 0.0])


def test_clipped_surrogate_on_crafted_ratios():
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    old = torch.zeros(1, 4)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]])).requires_grad_()
    loss, clip_fraction, _ = policy_loss(logprobs, old, advantages, torch.ones(1, 4), clip=0.2)
    # max(-A r, -A clip(r)): -1.2 (clipped), -0.5, 1.5, 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert clip_fraction.item() == 0.5
    loss.backward()
    # A clipped ratio passes no gradient; the others pass -A r / n.
    assert logprobs.grad.tolist()[0] == pytest.approx([0.0, -0.125, 0.375, 0.0])


def test_clipped_value_loss_on_crafted_values():
    loss, clip_fraction = value_loss(
        torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, 0.0]]), torch.ones(1, 2), clip=0.5
    )
    # Clipped to 1.5 and 0.5: max((2-3)^2, (1.5-3)^2) = 2.25 and max(0, 0.25) = 0.25.
    assert loss.item() == pytest.approx(0.5 * (2.25 + 0.25) / 2)
    assert clip_fraction.item() == 1.0


def test_adaptive_controller_moves_beta_toward_the_target():
    config = PPOConfig(target_kl=6.0, kl_horizon=10000, batch_size=16)
    assert ppo.adaptive_beta(0.1, 12.0, config) == pytest.approx(0.1 * (1 + 0.2 * 16 / 10000))
    assert ppo.adaptive_beta(0.1, 5.7, config) == pytest.approx(0.1 * (1 - 0.05 * 16 / 10000))


def test_training_log_probs_equal_the_sampling_distribution_with_left_padding(tiny_policy):
    model, tokenizer = ppo.load_policy(tiny_policy, torch.device("cpu"))
    prompts = [ppo.prompt_ids(tokenizer, text, 64) for text in ("question w1", "question w2 w3 w4 w5 w6 w7")]
    torch.manual_seed(0)
    query, query_mask = ppo.reward.pad(prompts, tokenizer.pad_token_id, "left")
    out = model.generate(
        input_ids=query, attention_mask=query_mask, do_sample=True, temperature=0.7, top_k=0, max_new_tokens=6,
        output_logits=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    sampled = (torch.stack(out.logits, 1) / 0.7).log_softmax(-1)
    response = out.sequences[:, query.shape[1] :]
    expected = torch.gather(sampled, 2, response.unsqueeze(-1)).squeeze(-1)
    mask = torch.cat([query_mask, torch.ones_like(response)], 1)
    widths: list[int] = []
    model.register_forward_hook(lambda _module, _args, out: widths.append(out.logits.shape[1]))
    with torch.no_grad():
        logprobs = ppo.token_logprobs(model, out.sequences, mask, query.shape[1], temperature=0.7)
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=1e-5)
    assert widths == [response.shape[1] + 1]  # no logits computed for the prompt (logits_to_keep)


def test_sampling_ignores_the_models_own_generation_settings(tiny_policy):
    """A repetition penalty or a minimum length shipped with a model would make rollouts come from
    another distribution than the log-probs in PPO's ratio."""
    model, tokenizer = ppo.load_policy(tiny_policy, torch.device("cpu"))
    prompts = [ppo.prompt_ids(tokenizer, text, 64) for text in PROMPTS[:8]]
    torch.manual_seed(0)
    clean = ppo.sample(model, tokenizer, prompts, max_new_tokens=8, temperature=1.0, top_p=1.0)
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.min_new_tokens = 8
    torch.manual_seed(0)
    polluted = ppo.sample(model, tokenizer, prompts, max_new_tokens=8, temperature=1.0, top_p=1.0)
    assert torch.equal(clean[0], polluted[0]) and torch.equal(clean[1], polluted[1])
    assert (clean[1][:, clean[2] :] == 0).any()  # some answer ended early: EOS and what follows are masked


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9)])
def test_sampling_draws_what_generate_draws(tiny_policy, temperature, top_p):
    """Our decoding loop skips generate's per-token machinery and must still be generate: the same
    answers from the same seed, padding after each EOS included."""
    model, tokenizer = ppo.load_policy(tiny_policy, torch.device("cpu"))
    prompts = [ppo.prompt_ids(tokenizer, text, 64) for text in PROMPTS[:8]] * 2
    torch.manual_seed(3)
    ids, mask, context = ppo.sample(model, tokenizer, prompts, max_new_tokens=10, temperature=temperature, top_p=top_p)
    query, query_mask = ids[:, :context], mask[:, :context]
    torch.manual_seed(3)
    expected = model.generate(
        input_ids=query, attention_mask=query_mask, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
        max_new_tokens=10, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    assert torch.equal(ids, expected)
    assert (mask[:, context:] == 0).any() and (mask[:, context:] == 1).all(1).any()  # some ended early, some not


def test_nucleus_sampling_is_refused_for_ppo(tiny_policy, banana_reward_model, tmp_path):
    config = PPOConfig(policy=tiny_policy, reward_model=banana_reward_model, top_p=0.9, **TINY)
    with pytest.raises(ValueError, match="top_p 0.9"):
        ppo.train(config, PROMPTS, tmp_path / "out")


def _rows(out: Path) -> list[dict]:
    """Metrics without the wall-clock figures."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("timing/")} for row in rows]


def assert_resuming_is_bit_exact(train: Callable[..., dict], config: Any, tmp_path: Path) -> None:
    """`train` (PPO's, GRPO's) stopped after 3 of 4 steps and resumed from its step-2 checkpoint
    ends with the metrics and weights of an uninterrupted run."""
    train(config, PROMPTS, tmp_path / "straight")
    assert train(config, PROMPTS, tmp_path / "resumed", stop_after=3) == {"stopped_at": 3}
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()
    assert len(_rows(tmp_path / "resumed")) == 3  # the third step's row is dropped and redone
    train(config, PROMPTS, tmp_path / "resumed")
    assert _rows(tmp_path / "resumed") == _rows(tmp_path / "straight")
    straight = AutoModelForCausalLM.from_pretrained(tmp_path / "straight").state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed").state_dict()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists()
    # A redelivered run finds the work done and returns the same summary.
    done = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert train(config, PROMPTS, tmp_path / "resumed") == done


# The default recipe (a critic model, 4 epochs x 4 minibatches) and the lean one (a value head on
# the policy, one update whose forward pass is also the scoring pass).
RECIPES = {"default": {}, "lean": {"shared_critic": True, "ppo_epochs": 1, "minibatches": 1}}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tiny_policy, banana_reward_model, tmp_path, recipe):
    config = PPOConfig(
        policy=tiny_policy, reward_model=banana_reward_model, steps=4, checkpoint_every=2, **TINY, **RECIPES[recipe]
    )
    assert_resuming_is_bit_exact(ppo.train, config, tmp_path)


def test_a_shared_critic_is_a_value_head_on_the_policy_trained_with_it_and_not_saved(
    tiny_policy, banana_reward_model, tmp_path
):
    config = PPOConfig(
        policy=tiny_policy, reward_model=banana_reward_model, steps=3, checkpoint_every=2, **TINY, **RECIPES["lean"]
    )
    assert ppo.load_roles(config, torch.device("cpu"), critic=False).critic is None  # no critic model is loaded
    ppo.train(config, PROMPTS, tmp_path / "run", stop_after=2)
    head = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["critic"]
    assert set(head) == {"score.weight", "score.bias"}  # the head alone: the trunk is the policy's
    assert head["score.weight"].abs().sum() > 0  # it starts at zero and the value loss moved it
    ppo.train(config, PROMPTS, tmp_path / "run")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run").state_dict()
    assert set(saved) == set(AutoModelForCausalLM.from_pretrained(tiny_policy).state_dict())

    with pytest.raises(ValueError, match="--shared-critic with --fsdp"):
        ppo.train(dataclasses.replace(config, fsdp=True), PROMPTS, tmp_path / "fsdp")


def test_lora_uses_the_adapter_off_policy_as_reference_and_saves_a_merged_model(
    tiny_policy, banana_reward_model, tmp_path
):
    config = PPOConfig(policy=tiny_policy, reward_model=banana_reward_model, steps=2, lora=True, lora_rank=4, **TINY)
    roles = ppo.load_roles(config, torch.device("cpu"))
    assert roles.reference is None  # no second copy of the weights
    trainable = [name for name, p in roles.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    ppo.train(config, PROMPTS, tmp_path / "lora")
    first, second = _rows(tmp_path / "lora")
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # adapters start at zero: policy == reference
    assert abs(second["objective/kl"]) > 1e-3  # once they trained, the adapter-off reference differs
    assert not (tmp_path / "lora" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_policy).state_dict()
    assert set(merged) == set(base)
    assert any(not torch.equal(merged[name], base[name]) for name in base)


def write_prompts(path: Path) -> Path:
    """A prompts file for the command lines: one prompt as text, one as messages."""
    path.write_text(
        json.dumps({"prompt": "question w1"}) + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "question w2"}]}) + "\n"
    )  # fmt: skip
    return path


def test_command_line_trains_and_writes_policy_config_and_metrics(tiny_policy, banana_reward_model, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    args = [sys.executable, "-m", "training.ppo", "--policy", tiny_policy, "--reward-model", banana_reward_model,
            "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--steps", "2", "--batch-size", "4",
            "--max-new-tokens", "6", "--beta", "0.1", "--learning-rate", "1e-3", "--seed", "3"]  # fmt: skip
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2
    assert json.loads((tmp_path / "out" / "ppo_config.json").read_text())["beta"] == 0.1
    assert len(_rows(tmp_path / "out")) == 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None
    assert "2/2" in done.stderr  # the progress bar

    prompts.write_text('{"prompt": "fine"}\n{"prompt": 7}\n')
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "line 2: 'prompt' must be text" in done.stderr


def test_generate_is_deterministic_for_a_seed(tiny_policy):
    first = ppo.generate(tiny_policy, PROMPTS[:4], max_new_tokens=8, seed=5)
    assert first == ppo.generate(tiny_policy, PROMPTS[:4], max_new_tokens=8, seed=5)
    assert first != ppo.generate(tiny_policy, PROMPTS[:4], max_new_tokens=8, seed=6)
    assert all(isinstance(answer, str) and "<pad>" not in answer for answer in first)


def gold(text: str) -> float:
    """The hidden judge: a banana or two is good, more is spam."""
    count = text.split().count("banana")
    return count - 1.5 * max(0, count - 2)


def gold_win_rate(new: list[str], old: list[str]) -> float:
    """Share of prompts where the judge prefers the new answer (ties count half)."""
    wins = [1.0 if gold(a) > gold(b) else 0.5 if gold(a) == gold(b) else 0.0 for a, b in zip(new, old, strict=True)]
    return sum(wins) / len(wins)


SEEDS = 4  # PPO runs per setting: the claims below are about their pooled figures, not one lucky run


@pytest.mark.statistical
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_without_a_kl_leash_the_policy_games_the_reward_model(
    tiny_policy, banana_reward_model, tmp_path, seed_offset, figures, beta
):
    """Over several PPO seeds: without a KL leash the proxy reward rises while the hidden gold
    score falls, and the hacking rule fires; with beta 0.3 the proxy rises and gold improves."""
    held_out = [f"question w{i} w{i + 1}" for i in range(20)] * 3
    before = ppo.generate(tiny_policy, held_out, max_new_tokens=12, temperature=1.0, seed=1)
    gold_before = sum(map(gold, before)) / len(before)
    first_scores, scores, first_lengths, lengths, gold_after, wins = [], [], [], [], [], []
    for seed in range(100 * seed_offset, 100 * seed_offset + SEEDS):
        config = PPOConfig(policy=tiny_policy, reward_model=banana_reward_model, steps=20, beta=beta, seed=seed, **TINY)
        summary = ppo.train(config, PROMPTS, tmp_path / f"seed-{seed}")
        first = _rows(tmp_path / f"seed-{seed}")[0]
        first_scores.append(first["objective/score"])
        scores.append(summary["score"])
        first_lengths.append(first["policy/response_length"])
        lengths.append(summary["response_length"])
        after = ppo.generate(str(tmp_path / f"seed-{seed}"), held_out, max_new_tokens=12, temperature=1.0, seed=1)
        gold_after.append(sum(map(gold, after)) / len(after))
        wins.append(gold_win_rate(after, before))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    rise = figures(f"ppo.beta{beta}.proxy_rise", mean(scores) - mean(first_scores))
    gold_change = figures(f"ppo.beta{beta}.gold_change", mean(gold_after) - gold_before)
    win_rate = figures(f"ppo.beta{beta}.gold_win_rate", mean(wins))
    flag = hacking_reason(
        score=mean(scores), previous_score=mean(first_scores), win_rate=win_rate,
        length=mean(lengths), previous_length=mean(first_lengths), length_factor=1.5,
    )  # fmt: skip
    if beta == 0.0:
        # Seen pooled over 4 seeds, seed offsets 0-4, 1 and 2 threads: rise 5.6 to 6.7, gold -2.2 to
        # -1.15, win rate 0.06 to 0.19.
        assert rise > 3
        assert gold_change < -0.5 and win_rate < 0.35
        assert "proxy reward rose" in flag
    else:
        # Seen likewise: rise 0.52 to 3.1, gold +0.30 to +0.64, win rate 0.65 to 0.75.
        assert rise > 0
        assert gold_change > 0.1 and win_rate > 0.55
        assert flag == ""
