"""Reward model options: LoRA trains only adapters and the head and saves a merged model;
gradient checkpointing leaves the loss trajectory unchanged; bf16 autocast runs through scoring."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.tiny_models import marker_pairs
from training.reward import (
    Encoded,
    Pair,
    RewardConfig,
    autocast_for,
    bradley_terry_loss,
    load_model,
    pair_rewards,
    scores,
    train,
    train_member,
)

CPU = torch.device("cpu")


def pairs(count: int = 64) -> list[Pair]:
    return [Pair(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"]) for r in marker_pairs(count)]


def tiny_config(backbone: str, **options) -> RewardConfig:
    return RewardConfig(backbone=backbone, max_length=32, learning_rate=3e-3, batch_size=16, **options)


def test_lora_changes_only_adapters_and_head(tiny_backbone):
    config = tiny_config(tiny_backbone, lora=True, lora_rank=4)
    torch.manual_seed(0)
    model, tokenizer = load_model(config, CPU)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    train_member(model, Encoded(pairs(), tokenizer, config), config, seed=0, device=CPU)
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}
    assert any("lora_" in name for name in changed)
    assert any("modules_to_save" in name and "score" in name for name in changed)
    assert all("lora_" in name or "modules_to_save" in name for name in changed), changed


def test_lora_run_saves_a_merged_model_that_scores_alike_without_peft(tiny_backbone, tmp_path):
    config = tiny_config(tiny_backbone, lora=True, lora_rank=4, eval_fraction=0.25)
    torch.manual_seed(0)
    adapter_model, tokenizer = load_model(config, CPU)
    data = Encoded(pairs(), tokenizer, config)
    train_member(adapter_model, data, config, seed=0, device=CPU)
    with_adapters = pair_rewards(adapter_model, data, CPU, batch_size=16)
    adapter_model.merge_and_unload().save_pretrained(tmp_path / "merged")

    plain, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert not any("lora" in name for name in plain.state_dict())
    assert pair_rewards(plain, data, CPU, batch_size=16) == pytest.approx(with_adapters, abs=1e-5)

    # The same through train(): the saved member, loaded by transformers alone, gives the held-out metrics.
    summary = train(pairs(), config, tmp_path / "run", device=CPU)
    member = tmp_path / "run" / "member_0"
    assert not list(member.glob("adapter_*")) and not (member / "checkpoint.pt").exists()
    saved = AutoModelForSequenceClassification.from_pretrained(member)
    held_out = [p for p in pairs() if p.prompt in {q.prompt for q in _held_out(config)}]
    rewards = pair_rewards(saved, Encoded(held_out, AutoTokenizer.from_pretrained(member), config), CPU, 16)
    assert float(rewards.mean()) == pytest.approx(summary["mean_reward"], abs=1e-5)


def _held_out(config: RewardConfig) -> list[Pair]:
    from training.reward import split_by_prompt

    return split_by_prompt(pairs(), config.eval_fraction)[1]


@pytest.mark.statistical
def test_gradient_checkpointing_leaves_the_loss_trajectory_unchanged(tiny_backbone, seed_offset, figures):
    trajectories = []
    for checkpointing in (False, True):
        config = tiny_config(tiny_backbone, gradient_checkpointing=checkpointing, epochs=2)
        torch.manual_seed(seed_offset)
        model, tokenizer = load_model(config, CPU)
        assert model.is_activation_checkpointing == checkpointing
        result = train_member(model, Encoded(pairs(32), tokenizer, config), config, seed=seed_offset, device=CPU)
        trajectories.append(result.losses)
    assert len(trajectories[0]) == 4
    assert trajectories[1] == pytest.approx(trajectories[0], rel=1e-4, abs=1e-5)
    # It did learn something on the way: the loss fell by 0.21 to 0.40 over 4 steps on seed offsets
    # 0-4, 1 and 2 threads.
    assert figures("reward.checkpointing.loss_drop", trajectories[0][0] - trajectories[0][-1]) > 0


def test_autocast_is_off_on_cpu_and_bf16_autocast_runs_through_scoring(tiny_backbone):
    with autocast_for(CPU):
        assert not torch.is_autocast_enabled("cpu")

    config = tiny_config(tiny_backbone)
    torch.manual_seed(0)
    model, tokenizer = load_model(config, CPU)
    ids, mask, _ = Encoded(pairs(8), tokenizer, config).batch(list(range(8)), CPU)
    with torch.no_grad():
        full_precision = scores(model, ids, mask)
    head_inputs: list[torch.dtype] = []
    model.score.register_forward_hook(lambda module, inputs, output: head_inputs.append(output.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rewards = scores(model, ids, mask)
    assert head_inputs == [torch.bfloat16]  # autocast really ran the model in bf16
    assert rewards.dtype == torch.float32 and torch.isfinite(rewards).all()
    assert rewards.detach() == pytest.approx(full_precision, abs=0.05)
    bradley_terry_loss(rewards[:8], rewards[8:]).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert json.loads(config.to_json())["gradient_checkpointing"] is False
