"""PPO against a Bradley-Terry reward model, with a frozen reference and a critic. Pure torch +
transformers (+ peft for LoRA): no Django, so a GPU box runs it from a prompts file.

    python -m training.ppo --policy NAME_OR_DIR --reward-model DIR --prompts FILE --out DIR [...]

Each step of `train` reads top to bottom: rollout (sample with the KV cache), score (the reward
model, through its own tokenizer), KL shaping (per-token penalty, score at the EOS token),
advantages (GAE, whitened), update (clipped surrogate and clipped value loss over minibatches),
metrics, checkpoint. The recipe follows Ziegler et al. 2019, Stiennon et al. 2020 and InstructGPT;
the defaults are theirs or TRL's PPO trainer's. The rollout, scoring, run directory and command
line are shared with the critic-free trainers of `training.grpo`.
"""

import argparse
import dataclasses
import functools
import inspect
import json
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from training import backbones, cli, distributed, reward

Messages = list[dict[str, str]]
Prompt = str | Messages


@dataclass
class OnlineConfig:
    """What every online trainer reads (PPO here, GRPO and RLOO in `training.grpo`): the models,
    sampling, scoring, the ratio clip, LoRA, checkpoints and the seed."""

    policy: str = field(
        default="smollm2-135m", metadata={"help": "Starting policy: model id, local path, or smollm2-135m."}
    )
    reward_model: str = field(default="", metadata={"help": "Directory written by `python -m training.reward`."})
    reference: str = field(default="", metadata={"help": "KL reference model; empty: the starting policy (frozen)."})
    max_new_tokens: int = field(default=53, metadata={"help": "Longest sampled response, in policy tokens."})
    max_prompt_length: int = field(default=256, metadata={"help": "Prompts are cut from the left to this."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (log-probs use the same)."})
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling for answers sent to labelers; training itself needs 1.0."}
    )
    missing_eos_penalty: float = field(
        default=0.0, metadata={"help": "Subtracted from the score of a response that never emits EOS."}
    )
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    reward_max_length: int = field(default=512, metadata={"help": "Tokens per sequence the reward model reads."})
    lora: bool = field(
        default=False, metadata={"help": "Train LoRA adapters; the reference is the adapter-off policy."}
    )
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank."})
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "Under torchrun: shard policy, critic and reference over the ranks (FSDP2), not a copy each."
        },
    )
    checkpoint_every: int = field(default=10, metadata={"help": "Steps between resumable checkpoints."})
    seed: int = field(default=42, metadata={"help": "Seed of sampling, prompt order and initialisation."})

    def to_json(self, world_size: int = 1) -> str:
        return json.dumps({**dataclasses.asdict(self), "world_size": world_size}, indent=2)


@dataclass
class PPOConfig(OnlineConfig):
    steps: int = field(default=100, metadata={"help": "PPO steps (a rollout batch and its update each)."})
    batch_size: int = field(default=16, metadata={"help": "Episodes (prompt + sampled response) per step."})
    minibatches: int = field(default=4, metadata={"help": "Minibatches each update epoch splits the batch into."})
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch (Stiennon et al.: 4)."})
    learning_rate: float = field(default=3e-6, metadata={"help": "AdamW learning rate of policy and critic."})
    beta: float = field(default=0.05, metadata={"help": "KL penalty coefficient: reward -= beta*(log pi - log ref)."})
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt beta toward target_kl (Ziegler et al.)."})
    target_kl: float = field(default=6.0, metadata={"help": "KL per episode the adaptive controller aims at."})
    kl_horizon: int = field(default=10000, metadata={"help": "Horizon (episodes) of the adaptive controller."})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value prediction clip around the old value."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    shared_critic: bool = field(
        default=False,
        metadata={
            "help": "The critic as a value head on the policy's last hidden state (TRL's former "
            "AutoModelForCausalLMWithValueHead), starting at zero, instead of a model of its own started from the "
            "reward model: one pass instead of two, and the value loss also trains the policy's trunk."
        },
    )


def load_prompts(path: Path) -> list[Prompt]:
    """JSON Lines with a `prompt` per line: a string or a list of {role, content} messages."""
    prompts: list[Prompt] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number}: not JSON ({error.msg})") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        is_text = isinstance(prompt, str) and prompt.strip()
        is_messages = isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt
        )  # fmt: skip
        if not (is_text or is_messages):
            raise ValueError(f"{path} line {number}: 'prompt' must be text or a list of {{role, content}} messages")
        prompts.append(cast(Prompt, prompt))  # checked just above: text or messages
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


# ---------------------------------------------------------------------------------------------
# Models and tokens


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, max_length: int) -> list[int]:
    """The prompt as the policy sees it, ready for the answer; cut from the left."""
    messages = reward.as_messages(prompt)
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids: list[int] = tokenizer(str(text), add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(reward.plain_text(messages), add_special_tokens=True)["input_ids"]
    return ids[-max_length:]


def load_policy(name: str, device: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = backbones.resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device)  # type: ignore[arg-type]  # transformers' stub of .to() drops the device overload
    return model.eval(), tokenizer


class RewardModel:
    """The reward model written by `training.reward`: every ensemble member, averaged. It reads
    text, so it may use another tokenizer than the policy (decode, then re-encode)."""

    def __init__(self, directory: Path, device: torch.device, max_length: int) -> None:
        members = sorted(path for path in directory.glob("member_*") if (path / "config.json").exists())
        if not members:
            raise FileNotFoundError(f"{directory} holds no trained reward model (member_*/config.json)")
        self.members = [
            AutoModelForSequenceClassification.from_pretrained(m, dtype=torch.float32).to(device).eval()
            for m in members
        ]
        self.tokenizer = AutoTokenizer.from_pretrained(members[0])
        self.first_member = members[0]
        self.device, self.max_length = device, max_length

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> torch.Tensor:
        sequences = reward.encode_all(self.tokenizer, list(zip(prompts, answers, strict=True)), self.max_length)
        ids, mask = reward.pad(sequences, self.tokenizer.pad_token_id, self.tokenizer.padding_side)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with reward.autocast_for(self.device):
            return torch.stack([reward.scores(m, ids, mask).float() for m in self.members]).mean(0)


def load_critic(
    reward_model: RewardModel, policy_path: str, tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> PreTrainedModel:
    """A value model initialised from the reward model (Stiennon et al., InstructGPT). The critic
    reads policy tokens, so a reward model with another vocabulary (or an encoder) cannot seed it:
    then it starts from the policy's backbone with a fresh scalar head."""
    same_vocab = reward_model.tokenizer.get_vocab() == tokenizer.get_vocab()
    decoder = getattr(reward_model.members[0], "score", None) is not None
    source = str(reward_model.first_member) if same_vocab and decoder else policy_path
    critic = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32)
    critic.config.pad_token_id = tokenizer.pad_token_id
    return critic.to(device).eval()


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as `generate` numbers them."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def response_logits(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, context: int, temperature: float
) -> torch.Tensor:
    """Logits of the sampling distribution (over temperature) at each response token."""
    return _response_pass(model, ids, mask, context, temperature, hidden=False)[0]


def keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model (inside a DDP or peft wrapper) takes `logits_to_keep`: logits for the last
    positions only, instead of a vocabulary-wide row for every prompt token."""
    inner = reward.unwrap_peft(cast(PreTrainedModel, getattr(model, "module", model)))
    return _takes_logits_to_keep(type(inner).forward)


@functools.cache
def _takes_logits_to_keep(forward: Callable[..., Any]) -> bool:
    """Read once a model class: inspecting a signature costs about 37 us, and every pass asks."""
    return "logits_to_keep" in inspect.signature(forward).parameters


def answer_pass(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, first: int, hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits that predict ids[:, first:] (at positions first - 1 to the last but one), and with
    `hidden` the last hidden state at those positions. The prompt's logits are never computed
    when the model can skip them: with a large vocabulary they are most of a pass's memory."""
    keep = ids.shape[1] - first + 1
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions(mask), output_hidden_states=hidden,
        **({"logits_to_keep": keep} if keeps_logits(model) else {}),
    )  # fmt: skip
    return out.logits[:, -keep:-1], out.hidden_states[-1][:, first - 1 : -1] if hidden else None


def _response_pass(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, context: int, temperature: float, hidden: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(response_logits, and with `hidden` the last hidden state before each response token)."""
    logits, states = answer_pass(model, ids, mask, context, hidden)
    return logits.float() / temperature, states


def token_logprobs(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, context: int, temperature: float
) -> torch.Tensor:
    """Log-probability of each response token. Gather minus logsumexp: no vocabulary-wide
    log-softmax is kept for the backward pass."""
    return gathered_logprobs(response_logits(model, ids, mask, context, temperature), ids[:, context:])


def gathered_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.gather(logits, 2, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logprobs = F.log_softmax(logits, dim=-1)
    return -(logprobs.exp() * logprobs).sum(-1)


class ValueHead(torch.nn.Module):
    """A critic that is a scalar head on the policy's own last hidden state (TRL's former
    AutoModelForCausalLMWithValueHead), instead of a model of its own: one forward and backward
    pass serve both, and the value loss trains the shared trunk too. Starts at zero."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden).squeeze(-1).float()


class Learner(torch.nn.Module):
    """The forward pass of an update, the policy's log-probs (and the critic's values, when there
    is one) as one module, for DDP to wrap: its gradient hooks follow forward calls. With
    `with_entropy`, also each token's entropy (no gradient), for a trainer whose update's forward
    is also its scoring pass."""

    def __init__(self, policy: PreTrainedModel, critic: PreTrainedModel | ValueHead | None = None) -> None:
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, context: int, temperature: float, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        on_policy = isinstance(self.critic, ValueHead)  # the critic reads the policy's own hidden states
        logits, hidden = _response_pass(self.policy, ids, mask, context, temperature, hidden=on_policy)
        logprobs = gathered_logprobs(logits, ids[:, context:])
        if isinstance(self.critic, ValueHead):
            values = self.critic(hidden)
        else:
            values = token_values(self.critic, ids, mask, context) if self.critic is not None else None
        return logprobs, values, entropy(logits.detach()) if with_entropy else None


def token_values(critic: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, context: int) -> torch.Tensor:
    """The critic's value of the state before each response token."""
    base = critic.base_model
    hidden = base(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
    head = critic.get_submodule("score")
    return head(hidden[:, context - 1 : -1]).squeeze(-1).float()


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded prompts and their sampled responses: (ids, attention mask, context width).
    Tokens after a response's first EOS are masked out (EOS itself stays in)."""
    device = next(model.parameters()).device
    query, query_mask = reward.pad(prompts, tokenizer.pad_token_id, "left")
    query, query_mask = query.to(device), query_mask.to(device)
    # Only these settings: a model's own (a repetition penalty, a minimum length, suppressed tokens)
    # would sample from another distribution than the log-probs in PPO's ratio.
    config = GenerationConfig(
        do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True,
    )  # fmt: skip
    way = _generate_synced if distributed.sharded(model) else _decode
    out = way(model, query, query_mask, config)
    context = query.shape[1]
    response = out[:, context:]
    is_eos = response == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    return out, torch.cat([query_mask, (~after_eos).long()], dim=1), context


def _decode(
    model: PreTrainedModel, query: torch.Tensor, query_mask: torch.Tensor, config: GenerationConfig
) -> torch.Tensor:
    """Sampling with the KV cache, draw for draw as `generate` samples with `config` (the same
    answers for the same seed: a test holds it), without its per-token machinery, which is most of
    a small policy's rollout time. Stops when every answer has its EOS."""
    last_only = {"logits_to_keep": 1} if keeps_logits(model) else {}
    step_ids, mask, step_positions = query, query_mask, positions(query_mask)
    cache, tokens = None, []
    unfinished = torch.ones(len(query), dtype=torch.bool, device=query.device)
    for _ in range(config.max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions,
                    past_key_values=cache, use_cache=True, **last_only)  # fmt: skip
        cache, scores = out.past_key_values, out.logits[:, -1].float()
        if config.temperature != 1.0:
            scores = scores / config.temperature
        if config.top_p < 1.0:  # transformers' TopPLogitsWarper: the smallest set over top_p, at least one token
            ascending, order = torch.sort(scores)
            drop = ascending.softmax(-1).cumsum(-1) <= 1 - config.top_p
            drop[:, -1] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
        token = torch.multinomial(scores.softmax(-1), 1).squeeze(1)
        token = torch.where(unfinished, token, config.pad_token_id)
        tokens.append(token)
        unfinished &= token != config.eos_token_id
        if not unfinished.any():
            break
        step_ids, step_positions = token[:, None], step_positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
    return torch.cat([query, torch.stack(tokens, 1)], 1)


def _generate_synced(
    model: PreTrainedModel, query: torch.Tensor, query_mask: torch.Tensor, config: GenerationConfig
) -> torch.Tensor:
    """`generate` for a policy sharded by FSDP, which gathers its weights on every rank at once: all
    ranks keep stepping until the last one's answers are done (synced_gpus). generate() fills unset
    fields from the model's config, so the model carries `config` while it samples."""
    inner = reward.unwrap_peft(model)  # a LoRA policy's generate() reads the wrapped model's config
    own, inner.generation_config = inner.generation_config, config
    try:
        out = model.generate(input_ids=query, attention_mask=query_mask, generation_config=config, synced_gpus=True)  # type: ignore[operator]  # causal LMs mix generate in
    finally:
        inner.generation_config = own
    return cast(torch.Tensor, out)


def generate(
    policy: str,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    temperature: float = 0.7,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    max_prompt_length: int = 256,
    device: torch.device | None = None,
) -> list[str]:
    """One sampled answer per prompt, the same for the same seed."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_policy(policy, device)
    torch.manual_seed(seed)
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = [prompt_ids(tokenizer, p, max_prompt_length) for p in prompts[start : start + batch_size]]
        ids, mask, context = sample(
            model, tokenizer, batch, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p
        )
        answers += decode(tokenizer, ids[:, context:], mask[:, context:])
    return answers


def decode(tokenizer: PreTrainedTokenizerBase, response: torch.Tensor, mask: torch.Tensor) -> list[str]:
    rows = zip(response, mask, strict=True)
    return [str(tokenizer.decode(row[keep.bool()], skip_special_tokens=True)).strip() for row, keep in rows]


# ---------------------------------------------------------------------------------------------
# The pieces of the objective, each checked against hand-computed values in the tests


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, world: distributed.World = distributed.ALONE
) -> torch.Tensor:
    """Whitened over the real tokens of the whole batch (every rank's share)."""
    count = world.sum(mask.sum())
    mean = world.sum((values * mask).sum()) / count.clamp(min=1)
    variance = world.sum((((values - mean) ** 2) * mask).sum()) / count.clamp(min=1)
    variance = variance * count / (count - 1).clamp(min=1)  # unbiased, as TRL and the papers
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def shaped_rewards(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, score: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reward: -beta * (log pi - log ref) on every response token, plus the score on the
    last real one (the EOS token, or the last token of a response cut at max_new_tokens); nothing
    on padding. Returns (rewards, per-token k1 KL)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    last = (mask.sum(1) - 1).clamp(min=0).long()
    rewards[torch.arange(len(score)), last] += score
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens; the episode ends at the last
    real token (no bootstrap past it). Returns (advantages, returns)."""
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate: mean of max(-A r, -A clip(r, 1-e, 1+e)). Returns (loss, clip fraction,
    approximate KL 0.5*E[(log r)^2])."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction, masked_mean(0.5 * log_ratio**2, mask)


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * mean(max((v - R)^2, (v_clipped - R)^2)). Returns (loss, clip fraction)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask)


def adaptive_beta(beta: float, kl: float, config: PPOConfig) -> float:
    """Ziegler et al.'s proportional controller: beta *= 1 + clip(KL/target - 1, ±0.2) * n / horizon."""
    error = float(np.clip(kl / config.target_kl - 1, -0.2, 0.2))
    return beta * (1 + error * config.batch_size / config.kl_horizon)


# ---------------------------------------------------------------------------------------------
# What every online trainer shares (PPO here, GRPO and RLOO in `training.grpo`): the models in
# their roles, rollout, scoring, minibatches, metrics, the run directory and the command line


@dataclass
class Roles:
    policy: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    reference: PreTrainedModel | None  # None: the policy with its LoRA adapter switched off
    reward_model: RewardModel
    critic: PreTrainedModel | ValueHead | None = None  # PPO's; the critic-free trainers have none

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    @contextmanager
    def as_reference(self) -> Iterator[PreTrainedModel]:
        if self.reference is not None:
            yield self.reference
        else:
            with self.policy.disable_adapter():  # type: ignore[operator]  # a PeftModel here (reference is None)
                yield self.policy


def load_roles(config: OnlineConfig, device: torch.device, *, critic: bool = False) -> Roles:
    torch.manual_seed(config.seed)
    policy, tokenizer = load_policy(config.policy, device)
    reward_model = RewardModel(Path(config.reward_model), device, config.reward_max_length)
    # Before the LoRA adapters: a fresh value head and the adapters draw from the seeded generator in this order.
    value_model = load_critic(reward_model, backbones.resolve(config.policy), tokenizer, device) if critic else None
    reference = None
    if config.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, task_type="CAUSAL_LM")
        policy = get_peft_model(policy, lora).eval()  # type: ignore[assignment]  # it forwards the model's calls
    if not config.lora or (config.reference and config.reference != config.policy):
        reference, _ = load_policy(config.reference or config.policy, device)
        reference.requires_grad_(False)
        if config.fsdp:
            distributed.world().wrap(reference, fsdp=True)  # sharded in place
    return Roles(policy, tokenizer, reference, reward_model, value_model)


def check_run(config: OnlineConfig, prompts: Sequence[Prompt]) -> None:
    if not prompts:
        raise ValueError("no prompts to train on")
    if config.fsdp and config.lora:
        raise ValueError("--fsdp with --lora: LoRA's adapters are small enough to train on a whole copy each")
    if config.top_p != 1.0:
        # The ratio and the KL use the full distribution; a nucleus would bias both.
        raise ValueError(f"top_p {config.top_p}: training samples from the full distribution (top_p 1.0)")


@dataclass
class Episodes:
    """A rollout batch: left-padded prompts and their sampled responses, as token ids."""

    prompt_index: list[int]  # each episode's prompt; the samples of one prompt's group are adjacent rows
    ids: torch.Tensor
    mask: torch.Tensor  # the attention mask: no left padding, nothing after a response's first EOS
    context: int  # where the responses begin
    response_mask: torch.Tensor  # float, on the response tokens only
    has_eos: torch.Tensor


def rollout(
    roles: Roles,
    config: OnlineConfig,
    encoded: Sequence[list[int]],
    sampler: random.Random,
    *,
    count: int,
    group_size: int = 1,
    world: distributed.World = distributed.ALONE,
) -> Episodes:
    """Draw `count` prompts (with replacement) and sample `group_size` responses to each with the
    KV cache. Every rank draws the same prompts (its sampler is seeded alike) and samples its share."""
    drawn = world.share([sampler.randrange(len(encoded)) for _ in range(count)])
    prompt_index = [index for index in drawn for _ in range(group_size)]
    with reward.autocast_for(roles.device):
        ids, mask, context = sample(
            roles.policy, roles.tokenizer, [encoded[i] for i in prompt_index],
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
        )  # fmt: skip
    response_mask = mask[:, context:].float()
    has_eos = (ids[:, context:] == roles.tokenizer.eos_token_id).logical_and(response_mask.bool()).any(1)
    return Episodes(prompt_index, ids, mask, context, response_mask, has_eos)


@dataclass
class Scored:
    raw_score: torch.Tensor  # the reward model's
    score: torch.Tensor  # less the missing-EOS penalty
    logprobs: torch.Tensor  # per response token, under the policy that sampled it
    ref_logprobs: torch.Tensor
    entropy: torch.Tensor


@torch.no_grad()
def score(
    roles: Roles,
    config: OnlineConfig,
    episodes: Episodes,
    prompts: Sequence[Prompt],
    *,
    policy_pass: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Scored:
    """The reward model reads the decoded text with its own tokenizer; the policy and the reference
    give each response token its log-probability. `policy_pass`: the policy's (log-probs, entropy)
    of these episodes, already computed by the caller's update, so not computed again."""
    ids, mask, context = episodes.ids, episodes.mask, episodes.context
    answers = decode(roles.tokenizer, ids[:, context:], mask[:, context:])
    with reward.autocast_for(roles.device):
        raw_score = roles.reward_model([prompts[i] for i in episodes.prompt_index], answers)
        penalised = raw_score - config.missing_eos_penalty * (~episodes.has_eos).float()
        if policy_pass is None:
            logits = response_logits(roles.policy, ids, mask, context, config.temperature)
            logprobs, token_entropy = gathered_logprobs(logits, ids[:, context:]), entropy(logits)
            del logits
        else:
            logprobs, token_entropy = policy_pass[0].detach(), policy_pass[1]
        with roles.as_reference() as reference:
            ref_logprobs = token_logprobs(reference, ids, mask, context, config.temperature)
    return Scored(raw_score, penalised, logprobs, ref_logprobs, token_entropy)


def sampling_pass(
    learner: torch.nn.Module, episodes: Episodes, temperature: float, live: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The sampling policy's log-probs, the critic's values (when the learner has one) and each
    token's entropy, over the episodes. `live`, for one update on the whole batch: with the
    gradient, so that the update takes this pass as its own forward pass instead of another."""
    with torch.set_grad_enabled(live), reward.autocast_for(episodes.ids.device):
        logprobs, values, token_entropy = learner(
            episodes.ids, episodes.mask, episodes.context, temperature, with_entropy=True
        )
    assert token_entropy is not None  # asked for
    return logprobs, values, token_entropy


def shuffled_minibatches(episodes: int, epochs: int, minibatches: int) -> Iterator[torch.Tensor]:
    """The rows of each minibatch: `epochs` passes over the batch, each in a new random order."""
    size = episodes // minibatches
    for _ in range(epochs):
        order = torch.randperm(episodes)
        for first in range(0, episodes, size):
            yield order[first : first + size]


def optimizer_step(
    optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter], loss: torch.Tensor, max_grad_norm: float
) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()


def rollout_metrics(episodes: Episodes, scored: Scored) -> dict[str, float]:
    """The rollout's figures, named as every trainer logs them; the KL is per episode (summed over
    its tokens): k1, log pi - log ref, and k3, exp(log ref - log pi) - 1 - (log ref - log pi)."""
    response_mask = episodes.response_mask
    kl = (scored.logprobs - scored.ref_logprobs) * response_mask
    log_ratio_ref = (scored.ref_logprobs - scored.logprobs) * response_mask
    kl_k3 = ((log_ratio_ref.exp() - 1) - log_ratio_ref) * response_mask
    return {
        "objective/score": float(scored.raw_score.mean()),
        "objective/kl": float(kl.sum(1).mean()),
        "objective/kl_k3": float(kl_k3.sum(1).mean()),
        "objective/entropy": float(masked_mean(scored.entropy, response_mask)),
        "policy/response_length": float(response_mask.sum(1).mean()),
        "policy/eos_rate": float(episodes.has_eos.float().mean()),
    }


def timing_metrics(
    episodes: Episodes, began: float, generated: float, scored: float, updated: float, ranks: int = 1
) -> dict[str, float]:
    """Seconds of each phase, and throughput of all `ranks` (each rank's share taken as its own)."""
    return {
        "timing/generation_s": generated - began,
        "timing/scoring_s": scored - generated,
        "timing/update_s": updated - scored,
        "timing/episodes_per_second": ranks * len(episodes.ids) / (updated - began),
        "timing/generated_tokens_per_second": ranks * float(episodes.response_mask.sum()) / (generated - began),
    }


def open_run(out: Path, config: OnlineConfig, config_name: str, world: distributed.World) -> dict[str, Any] | None:
    """The summary of a run already finished in `out` (a redelivered task finds the work done);
    otherwise None, with the config written (by rank 0) beside what the run will write."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    if world.main:
        (out / config_name).write_text(config.to_json(world_size=world.size))
    return None


def check_shares(world: distributed.World, units: int, minibatches: int, name: str) -> None:
    """`units` (a step's episodes or prompts) split evenly over the ranks, and each share into
    `minibatches`: every rank then updates on the same number of minibatches of the same size."""
    if units % (world.size * minibatches):
        shares = f"{world.size} ranks x {minibatches} minibatches" if world.size > 1 else f"minibatches {minibatches}"
        raise ValueError(f"{name} {units} is not a multiple of {shares}")


class Run:
    """What a run keeps in `out`: metrics.jsonl (a row per step), checkpoint.pt (every
    `checkpoint_every` steps: weights, optimizer, random generators and the trainer's own state),
    and at the end the policy (adapters merged) in Hugging Face format and summary.json."""

    def __init__(
        self,
        out: Path,
        config: OnlineConfig,
        steps: int,
        roles: Roles,
        optimizer: torch.optim.Optimizer,
        learner: torch.nn.Module,
        world: distributed.World = distributed.ALONE,
    ) -> None:
        self.out, self.config, self.steps, self.roles, self.optimizer = out, config, steps, roles, optimizer
        self.learner, self.world = learner, world  # the optimizer's module (FSDP's optimizer state is per module)
        self.sampler = random.Random(config.seed)  # prompt order: the same on every rank
        self.checkpoint, self.metrics = out / "checkpoint.pt", out / "metrics.jsonl"

    def _modules(self) -> dict[str, torch.nn.Module]:
        critic = {"critic": self.roles.critic} if self.roles.critic is not None else {}
        return {"policy": self.roles.policy, **critic}

    def resume(self) -> dict[str, Any]:
        """The checkpoint's state (its `step` and the trainer's own entries) with the weights,
        optimizer and generators restored; without a checkpoint {"step": 0} and the torch seed set."""
        state: dict[str, Any] = {"step": 0}
        if self.checkpoint.exists():
            state = torch.load(self.checkpoint, weights_only=False)
            for name, module in self._modules().items():
                self.world.load_state_dict(module, state[name])
            self.world.load_optimizer_state_dict(self.learner, self.optimizer, state["optimizer"])
            reward.set_rng_states(state, self.world)
            self.sampler.setstate(state["rng"]["sampler"])
        else:
            torch.manual_seed(self.config.seed + self.world.rank)  # each rank samples its own answers
        if self.world.main:  # rows written after the checkpoint belong to steps that will run again
            rows = self.metrics.read_text().splitlines()[: state["step"]] if self.metrics.exists() else []
            self.metrics.write_text("".join(row + "\n" for row in rows))
        return state

    def record(self, step: int, row: dict[str, float], **trainer_state: Any) -> None:
        """The row of `step` (counted from 1), and a checkpoint after it when one is due: rank 0
        writes both, with every rank's generators (a collective: every rank calls it)."""
        if self.world.main:
            with self.metrics.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        if step % self.config.checkpoint_every == 0 and step < self.steps:
            generators = reward.rng_states(self.world)
            rng = {**generators["rng"], "sampler": self.sampler.getstate()}
            modules = {name: self.world.state_dict(module) for name, module in self._modules().items()}
            optimizer = self.world.optimizer_state_dict(self.learner, self.optimizer)
            state = {
                **modules, "optimizer": optimizer, "rng": rng,
                "rng_by_rank": generators["rng_by_rank"], **trainer_state, "step": step,
            }  # fmt: skip
            if self.world.main:
                torch.save(state, self.checkpoint.with_suffix(".tmp"))
                self.checkpoint.with_suffix(".tmp").replace(self.checkpoint)

    def finish(self) -> dict[str, Any]:
        """Rank 0 saves the policy and the summary and returns it; the other ranks return {}."""
        for module in self._modules().values():
            self.world.check_in_step(module)
        policy = reward.unwrap_peft(self.roles.policy, merge=True)
        weights = self.world.state_dict(policy)
        if not self.world.main:
            return {}
        policy.save_pretrained(self.out, state_dict=weights)
        self.roles.tokenizer.save_pretrained(self.out)
        summary = summarize([json.loads(line) for line in self.metrics.read_text().splitlines()])
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        self.checkpoint.unlink(missing_ok=True)
        return summary


def summarize(rows: Sequence[dict[str, float]], last: int = 5) -> dict[str, Any]:
    """Means over the last steps: what a round reports of its run."""
    tail = rows[-last:]
    mean = lambda key: float(np.mean([r[key] for r in tail])) if tail else None  # noqa: E731
    return {
        "steps": len(rows),
        "score": mean("objective/score"),
        "kl": mean("objective/kl"),
        "response_length": mean("policy/response_length"),
        "entropy": mean("objective/entropy"),
        "eos_rate": mean("policy/eos_rate"),
        "episodes_per_second": mean("timing/episodes_per_second"),
    }


def progress_bar(step: int, total: int, row: dict[str, float]) -> None:
    score, kl, length = row["objective/score"], row["objective/kl"], row["policy/response_length"]
    cli.progress_bar(step, total, f"score {score:.3f} kl {kl:.3f} len {length:.1f}")


Train = Callable[..., dict[str, Any]]
Progress = Callable[[int, int, dict[str, float]], None]  # (step, steps, the step's metrics row)


def command_line(argv: list[str] | None, *, prog: str, doc: str, config_class: type, train: Train) -> int:
    """`prog --prompts FILE --out DIR` and a flag per field of `config_class`; prints the summary."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, required=True, help="JSON Lines with a 'prompt' per line.")
    parser.add_argument("--out", type=Path, required=True, help="Directory for the policy, config and metrics.")
    cli.add_config_flags(parser, config_class)
    args = parser.parse_args(argv)
    if not args.reward_model:
        parser.error("--reward-model is required")
    config = cli.config_from_flags(config_class, args)
    world = distributed.world()
    summary = train(config, load_prompts(args.prompts), args.out, progress=progress_bar if world.main else None)
    distributed.finish(summary)
    return 0


# ---------------------------------------------------------------------------------------------
# The PPO loop


def train(
    config: PPOConfig,
    prompts: Sequence[Prompt],
    out: Path,
    *,
    device: torch.device | None = None,
    progress: Progress | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run `config.steps` PPO steps and save the policy (adapters merged) in Hugging Face format
    in `out`, beside ppo_config.json, metrics.jsonl (a row per step) and summary.json. A
    checkpoint in `out` is resumed; `stop_after` ends the run after that many steps, as a killed
    worker would, leaving the last checkpoint behind."""
    world = distributed.world()
    device = device or world.device
    check_run(config, prompts)
    check_shares(world, config.batch_size, config.minibatches, "batch_size")
    if config.shared_critic and config.fsdp:
        raise ValueError("--shared-critic with --fsdp: FSDP shards Hugging Face models, not the value head")
    done = open_run(out, config, "ppo_config.json", world)
    if done is not None:
        return done
    roles = load_roles(config, device, critic=not config.shared_critic)
    if config.shared_critic:
        roles.critic = ValueHead(reward.unwrap_peft(roles.policy).config.hidden_size).to(device)
    critic = roles.critic
    assert critic is not None  # loaded or made just above
    learner = world.wrap(Learner(roles.policy, critic), fsdp=config.fsdp)  # before the optimizer: FSDP swaps parameters
    trainable = [p for p in (*roles.policy.parameters(), *critic.parameters()) if p.requires_grad]
    optimizer = reward.adamw(trainable, device, lr=config.learning_rate, eps=1e-5, weight_decay=0.0)
    encoded = [prompt_ids(roles.tokenizer, p, config.max_prompt_length) for p in prompts]
    run = Run(out, config, config.steps, roles, optimizer, learner, world)
    state = run.resume()
    episodes_per_rank = config.batch_size // world.size
    beta, start = state.get("beta", config.beta), state["step"]
    autocast = reward.autocast_for(device)

    for step in range(start, config.steps):
        if stop_after is not None and step >= stop_after:
            return {"stopped_at": step}
        began = time.perf_counter()
        # 1. Rollout: sample a response to each prompt of the batch (this rank's share) with the KV cache.
        episodes = rollout(roles, config, encoded, run.sampler, count=config.batch_size, world=world)
        ids, mask, context, response_mask = episodes.ids, episodes.mask, episodes.context, episodes.response_mask
        generated = time.perf_counter()

        # 2. Score: the reward model reads the decoded text; log-probs of policy and reference, values.
        # With one update on the whole batch (ppo_epochs 1, minibatches 1), that update's forward
        # pass, taken here with its gradient, gives the sampling policy's log-probs and values.
        live = config.ppo_epochs == 1 and config.minibatches == 1
        sampling_logprobs, sampling_values, sampling_entropy = sampling_pass(
            learner, episodes, config.temperature, live
        )
        assert sampling_values is not None  # the learner has the critic
        scored = score(roles, config, episodes, prompts, policy_pass=(sampling_logprobs, sampling_entropy))
        old_values = sampling_values.detach()
        scored_at = time.perf_counter()

        # 3. KL shaping: -beta * (log pi - log ref) per token, the score at the last real token.
        rewards, kl = shaped_rewards(scored.logprobs, scored.ref_logprobs, response_mask, scored.score, beta)

        # 4. Advantages: GAE, whitened over the real tokens of the whole batch (every rank's share).
        advantages, returns = gae(rewards, old_values, response_mask, config.gamma, config.lam)
        advantages = whiten(advantages, response_mask, world=world)

        # 5. Update: several epochs of clipped policy and value losses over shuffled minibatches
        # (each rank's minibatch a share of the global one; DDP averages the gradients).
        stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "clip", "vclip", "approxkl")}
        for rows in shuffled_minibatches(episodes_per_rank, config.ppo_epochs, config.minibatches):
            row_mask = response_mask[rows]
            if live:
                logprobs, values = sampling_logprobs[rows], sampling_values[rows]
            else:
                with autocast:
                    logprobs, values, _ = learner(ids[rows], mask[rows], context, config.temperature)
            assert values is not None  # the learner has the critic
            pg, clip_fraction, approx_kl = policy_loss(
                logprobs, scored.logprobs[rows], advantages[rows], row_mask, config.cliprange
            )
            vf, value_clip_fraction = value_loss(
                values, old_values[rows], returns[rows], row_mask, config.cliprange_value
            )
            optimizer_step(optimizer, trainable, pg + config.vf_coef * vf, config.max_grad_norm)
            for key, value in zip(stats, (pg, vf, clip_fraction, value_clip_fraction, approx_kl), strict=True):
                stats[key].append(float(value.detach()))
        updated = time.perf_counter()

        # 6. Metrics, in named groups; the adaptive controller moves beta for the next step.
        sequence_kl = kl.sum(1)
        variance = masked_mean((returns - masked_mean(returns, response_mask)) ** 2, response_mask)
        residual = masked_mean((returns - old_values * response_mask) ** 2, response_mask)
        row = {
            "step": step + 1,
            **rollout_metrics(episodes, scored),
            "objective/non_score_reward": float((-beta * sequence_kl).mean()),
            "objective/rlhf_reward": float((scored.score - beta * sequence_kl).mean()),
            "policy/clipfrac": float(np.mean(stats["clip"])),
            "policy/approxkl": float(np.mean(stats["approxkl"])),
            "loss/policy": float(np.mean(stats["pg"])),
            "loss/value": float(np.mean(stats["vf"])),
            "val/clipfrac": float(np.mean(stats["vclip"])),
            "val/explained_variance": float(1 - residual / variance) if variance > 0 else 0.0,
            "kl_controller/beta": beta,
            **timing_metrics(episodes, began, generated, scored_at, updated, world.size),
        }
        row = world.mean(row)
        if config.adaptive_kl:
            beta = adaptive_beta(beta, row["objective/kl"], config)
        run.record(step + 1, row, beta=beta)
        if progress is not None:
            progress(step + 1, config.steps, row)
    return run.finish()


def main(argv: list[str] | None = None) -> int:
    return command_line(argv, prog="python -m training.ppo", doc=__doc__ or "", config_class=PPOConfig, train=train)


if __name__ == "__main__":
    sys.exit(main())
