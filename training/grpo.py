"""Critic-free online RL against a Bradley-Terry reward model: GRPO (Shao et al. 2024, DeepSeekMath)
and RLOO (Ahmadian et al. 2024). Pure torch + transformers (+ peft for LoRA): no Django, so a GPU
box runs it from a prompts file.

    python -m training.grpo --policy NAME_OR_DIR --reward-model DIR --prompts FILE --out DIR [--estimator grpo|rloo]

Each prompt of a step is sampled `group_size` times, and each response is judged against its own
group instead of a learned value. Each step of `train` reads top to bottom: rollout, score, KL
(RLOO: in the reward), advantages (GRPO: the group's z-score; RLOO: the reward less the mean of
the others in the group), update (a clipped ratio; GRPO: per token, plus the k3 KL to the
reference in the loss; RLOO: one ratio per response), metrics, checkpoint. The rollout, scoring,
log-probs, run directory and command line are PPO's (`training.ppo`); the losses follow TRL 1.16's
GRPOTrainer (loss_type "grpo") and RLOOTrainer, and the defaults are the papers' or TRL's.
"""

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import distributed, ppo, reward
from training.ppo import Prompt

ESTIMATORS = ("grpo", "rloo")


@dataclass
class GRPOConfig(ppo.OnlineConfig):
    estimator: str = field(
        default="grpo", metadata={"help": "grpo (group z-score, KL in the loss) or rloo (leave-one-out, KL in reward)."}
    )
    steps: int = field(default=100, metadata={"help": "Steps (a rollout batch and its update each)."})
    batch_size: int = field(
        default=4, metadata={"help": "Prompts per step; each is sampled group_size times (16 episodes by default)."}
    )
    group_size: int = field(
        default=4, metadata={"help": "Responses per prompt, each judged against its group (TRL: GRPO 8, RLOO 2)."}
    )
    epochs: int = field(
        default=1, metadata={"help": "Passes over each rollout batch (GRPO paper's mu, TRL's num_iterations: 1)."}
    )
    minibatches: int = field(default=1, metadata={"help": "Minibatches each pass splits the batch's episodes into."})
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate (GRPO paper and TRL: 1e-6)."})
    beta: float = field(
        default=0.04,
        metadata={
            "help": "KL coefficient. grpo: weight of the k3 KL to the reference in the loss (GRPO paper: 0.04); "
            "rloo: reward -= beta * sum of log pi - log ref over the response (TRL's RLOO: 0.05)."
        },
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (log-probs use the same; TRL: 1)."})
    unbiased_kl: bool = field(
        default=False,
        metadata={
            "help": "grpo: weight the k3 KL by the policy ratio (1, but differentiable), so that its gradient is "
            "the reverse KL's own (DeepSeek-V3.2; TRL's use_bias_correction_kl, on by default there). Off: the GRPO "
            "paper's k3, whose gradient pulls toward the reference more."
        },
    )


# ---------------------------------------------------------------------------------------------
# Advantages and losses, each checked against hand-computed values in the tests


def grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(reward - its group's mean) / (its group's standard deviation + 1e-4), the deviation with
    Bessel's correction, as TRL's GRPOTrainer. The groups are adjacent runs of `group_size`."""
    groups = rewards.view(-1, group_size)
    advantages = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
    return advantages.reshape(-1)


def leave_one_out_baseline(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """For each episode, the mean reward of the other `group_size - 1` episodes of its group."""
    groups = rewards.view(-1, group_size)
    return ((groups.sum(1, keepdim=True) - groups) / (group_size - 1)).reshape(-1)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    beta: float,
    unbiased_kl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GRPO paper's objective, negated: on every token, PPO's clipped surrogate with the
    episode's advantage, plus beta times the k3 estimate of the KL to the reference,
    exp(ref - logp) - (ref - logp) - 1; averaged over each response's tokens, then over the
    responses. `unbiased_kl` multiplies k3 by the ratio pi / pi_old (TRL's use_bias_correction_kl):
    the same value on-policy, but the gradient of the reverse KL, (logp - ref) d logp, where k3's
    alone is (1 - exp(ref - logp)) d logp. Returns (loss, clip fraction, approximate KL to the
    sampling policy)."""
    # Weights 1/|response| make the token mean of ppo.policy_loss the paper's mean of per-response means.
    weights = mask / mask.sum(1, keepdim=True).clamp(min=1)
    token_advantages = advantages[:, None].expand_as(logprobs)
    surrogate, clip_fraction, approx_kl = ppo.policy_loss(logprobs, old_logprobs, token_advantages, weights, clip)
    # Zero on padding before exp: a pad token's log-ratio may be large enough to overflow.
    log_ratio = (ref_logprobs - logprobs) * (mask > 0)
    kl = log_ratio.exp() - log_ratio - 1
    if unbiased_kl:
        kl = kl * ((logprobs - old_logprobs) * (mask > 0)).exp()
    return surrogate + beta * ppo.masked_mean(kl, weights), clip_fraction, approx_kl


def rloo_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """REINFORCE with the leave-one-out baseline, clipped as TRL's RLOOTrainer: one ratio per
    response, of its whole probability, times its advantage; mean over the responses (the KL is
    in the reward). Returns (loss, clip fraction, approximate KL to the sampling policy)."""
    sequence_logprobs = (logprobs * mask).sum(1, keepdim=True)
    sequence_old_logprobs = (old_logprobs * mask).sum(1, keepdim=True)
    one_per_response = torch.ones_like(sequence_logprobs)
    return ppo.policy_loss(sequence_logprobs, sequence_old_logprobs, advantages[:, None], one_per_response, clip)


# ---------------------------------------------------------------------------------------------
# The loop


def train(
    config: GRPOConfig,
    prompts: Sequence[Prompt],
    out: Path,
    *,
    device: torch.device | None = None,
    progress: ppo.Progress | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run `config.steps` steps and save the policy (adapters merged) in Hugging Face format in
    `out`, beside grpo_config.json, metrics.jsonl (a row per step) and summary.json, as
    `ppo.train` does. A checkpoint in `out` is resumed; `stop_after` ends the run after that many
    steps, as a killed worker would, leaving the last checkpoint behind."""
    world = distributed.world()
    device = device or world.device
    ppo.check_run(config, prompts)
    if config.estimator not in ESTIMATORS:
        raise ValueError(f"estimator {config.estimator!r}: grpo or rloo")
    if config.group_size < 2:
        raise ValueError(f"group_size {config.group_size}: a group baseline needs at least 2 responses per prompt")
    # Each rank samples whole groups (its share of the prompts), so the group baselines are exact.
    ppo.check_shares(world, config.batch_size, 1, "batch_size (prompts)")
    episodes_per_rank = config.batch_size // world.size * config.group_size
    ppo.check_shares(world, episodes_per_rank * world.size, config.minibatches, "episodes per step")
    done = ppo.open_run(out, config, "grpo_config.json", world)
    if done is not None:
        return done
    roles = ppo.load_roles(config, device)
    learner = world.wrap(ppo.Learner(roles.policy), fsdp=config.fsdp)  # before the optimizer: FSDP swaps parameters
    trainable = [p for p in roles.policy.parameters() if p.requires_grad]
    optimizer = reward.adamw(trainable, device, lr=config.learning_rate, weight_decay=0.0)
    encoded = [ppo.prompt_ids(roles.tokenizer, p, config.max_prompt_length) for p in prompts]
    run = ppo.Run(out, config, config.steps, roles, optimizer, learner, world)
    start = run.resume()["step"]
    autocast = reward.autocast_for(device)

    for step in range(start, config.steps):
        if stop_after is not None and step >= stop_after:
            return {"stopped_at": step}
        began = time.perf_counter()
        # 1. Rollout: batch_size prompts (this rank's share), each sampled group_size times (a group's rows adjacent).
        episodes = ppo.rollout(
            roles, config, encoded, run.sampler, count=config.batch_size, group_size=config.group_size, world=world
        )
        ids, mask, context, response_mask = episodes.ids, episodes.mask, episodes.context, episodes.response_mask
        generated = time.perf_counter()

        # 2. Score: the reward model reads the decoded text; log-probs of the policy and the reference.
        # With one update on the whole batch (epochs 1, minibatches 1: the default, TRL's too) that
        # update's forward pass, taken here, gives the sampling policy's log-probs: no pass of its own.
        live = config.epochs == 1 and config.minibatches == 1
        sampling_logprobs, _, sampling_entropy = ppo.sampling_pass(learner, episodes, config.temperature, live)
        scored = ppo.score(roles, config, episodes, prompts, policy_pass=(sampling_logprobs, sampling_entropy))
        scored_at = time.perf_counter()

        # 3. KL: RLOO subtracts beta * the response's summed log-ratio from its reward; GRPO's is in the loss.
        sequence_kl = ((scored.logprobs - scored.ref_logprobs) * response_mask).sum(1)
        rewards = scored.score - config.beta * sequence_kl if config.estimator == "rloo" else scored.score

        # 4. Advantages: one per episode, from its own group.
        if config.estimator == "rloo":
            advantages = rewards - leave_one_out_baseline(rewards, config.group_size)
        else:
            advantages = grpo_advantages(rewards, config.group_size)

        # 5. Update: clipped ratio objective over shuffled minibatches (one pass by default: on-policy).
        stats: dict[str, list[float]] = {k: [] for k in ("loss", "clip", "approxkl")}
        for rows in ppo.shuffled_minibatches(episodes_per_rank, config.epochs, config.minibatches):
            if live:
                logprobs = sampling_logprobs[rows]
            else:
                with autocast:
                    logprobs, _, _ = learner(ids[rows], mask[rows], context, config.temperature)
            old, row_mask = scored.logprobs[rows], response_mask[rows]
            if config.estimator == "rloo":
                loss, clip_fraction, approx_kl = rloo_loss(logprobs, old, advantages[rows], row_mask, config.cliprange)
            else:
                loss, clip_fraction, approx_kl = grpo_loss(
                    logprobs, old, scored.ref_logprobs[rows], advantages[rows], row_mask, config.cliprange, config.beta,
                    unbiased_kl=config.unbiased_kl,
                )  # fmt: skip
            ppo.optimizer_step(optimizer, trainable, loss, config.max_grad_norm)
            for key, value in zip(stats, (loss, clip_fraction, approx_kl), strict=True):
                stats[key].append(float(value.detach()))
        updated = time.perf_counter()

        # 6. Metrics, in PPO's named groups where they apply.
        row = {
            "step": step + 1,
            **ppo.rollout_metrics(episodes, scored),
            "objective/non_score_reward": float((rewards - scored.score).mean()),
            "objective/rlhf_reward": float(rewards.mean()),
            "objective/group_score_std": float(scored.score.view(-1, config.group_size).std(1).mean()),
            "policy/clipfrac": float(np.mean(stats["clip"])),
            "policy/approxkl": float(np.mean(stats["approxkl"])),
            "loss/policy": float(np.mean(stats["loss"])),
            **ppo.timing_metrics(episodes, began, generated, scored_at, updated, world.size),
        }
        row = world.mean(row)
        run.record(step + 1, row)
        if progress is not None:
            progress(step + 1, config.steps, row)
    return run.finish()


def main(argv: list[str] | None = None) -> int:
    return ppo.command_line(
        argv, prog="python -m training.grpo", doc=__doc__ or "", config_class=GRPOConfig, train=train
    )


if __name__ == "__main__":
    sys.exit(main())
