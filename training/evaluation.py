"""The proxy figures of a policy that was not trained online: one rollout batch, sampled and scored
as PPO samples and scores its own (training.ppo's rollout, score and rollout_metrics), with no
update. A round that trains offline (DPO, IPO, KTO) measures the previous and the new policy this
way, so its proxy reward, KL and length stand beside an online round's and the reward-hacking flag
reads them alike."""

import random
from collections.abc import Sequence

import torch

from training import ppo


@torch.no_grad()
def proxy_figures(
    config: ppo.OnlineConfig, prompts: Sequence[ppo.Prompt], *, episodes: int, device: torch.device | None = None
) -> dict[str, float]:
    """`episodes` answers of `config.policy` to prompts drawn with `config.seed`, scored by
    `config.reward_model`, with the KL from `config.reference`: the metrics of PPO's first step."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    roles = ppo.load_roles(config, device)
    roles.policy.eval()
    encoded = [ppo.prompt_ids(roles.tokenizer, prompt, config.max_prompt_length) for prompt in prompts]
    batch = ppo.rollout(roles, config, encoded, random.Random(config.seed), count=episodes)
    return ppo.rollout_metrics(batch, ppo.score(roles, config, batch, prompts))
