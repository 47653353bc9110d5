"""Offline preference optimization on exported pairs: DPO (Rafailov et al. 2023), IPO (Azar et
al. 2023) and KTO (Ethayarajh et al. 2024). Pure torch + transformers (+ peft for LoRA): no
Django, so a GPU box runs it from an exported file.

    python -m training.dpo --policy NAME_OR_DIR --data PREFS --out DIR [--loss dpo|ipo|kto] [...]

`train` reads top to bottom: tokenize, plan the batches of every epoch, score every answer once
under the reference (the starting policy; with LoRA, the policy before its adapters exist), then
each step: the policy's log-probs of the batch's answers, the loss against the stored reference,
update, metrics, checkpoint. The losses are those of TRL 1.16's DPOTrainer (`sigmoid`, `ipo`) and
KTOTrainer (`kto`), and the defaults are TRL's.
"""

import argparse
import dataclasses
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training import cli, distributed, ppo, reward
from training.ppo import Prompt

LOSSES = ("dpo", "ipo", "kto")


@dataclass
class DPOConfig:
    policy: str = field(
        default="smollm2-135m", metadata={"help": "Starting policy, also the reference: model id, path, smollm2-135m."}
    )
    loss: str = field(default="dpo", metadata={"help": "dpo (Rafailov et al.), ipo (Azar et al.) or kto (Ethayarajh)."})
    beta: float = field(default=0.1, metadata={"help": "Pull toward the reference: DPO's and KTO's beta, IPO's tau."})
    desirable_weight: float = field(default=1.0, metadata={"help": "KTO: weight of the desirable examples' loss."})
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "KTO: weight of the undesirable examples' loss (KTO paper: balance the two)."}
    )
    epochs: int = field(default=1, metadata={"help": "Passes over the data."})
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate (DPO paper and TRL: 1e-6)."})
    batch_size: int = field(
        default=8, metadata={"help": "Pairs per step; KTO: examples, at least 2 (its KL term pairs them up)."}
    )
    max_length: int = field(
        default=1024, metadata={"help": "Tokens per sequence: the prompt is cut from the left, then the answer."}
    )
    warmup_ratio: float = field(
        default=0.1, metadata={"help": "Share of steps with a linear warm-up (DPO paper: 150 steps), then decay to 0."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    lora: bool = field(
        default=False, metadata={"help": "Train LoRA adapters; the reference is the adapter-off policy."}
    )
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank."})
    fsdp: bool = field(
        default=False, metadata={"help": "Under torchrun: shard the policy over the ranks (FSDP2), not a copy each."}
    )
    checkpoint_every: int = field(default=100, metadata={"help": "Steps between resumable checkpoints."})
    seed: int = field(default=42, metadata={"help": "Seed of the data order."})

    def to_json(self, world_size: int = 1) -> str:
        return json.dumps({**dataclasses.asdict(self), "world_size": world_size}, indent=2)


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Example:
    """One answer judged on its own, as KTO learns from."""

    prompt: Prompt
    completion: str
    desirable: bool


@dataclass
class Preferences:
    pairs: list[reward.Pair]
    unpaired: list[Example]  # TRL's unpaired rows, and both answers of a comparison voted both bad

    def examples(self) -> list[Example]:
        """KTO's view of the data: each pair's chosen answer desirable, its rejected one not."""
        paired = [
            Example(pair.prompt, answer, desirable)
            for pair in self.pairs
            for answer, desirable in ((pair.chosen, True), (pair.rejected, False))
        ]
        return paired + self.unpaired


def _rows(path: Path) -> list[tuple[int, Any]]:
    """(row number, row): the line number in JSON Lines, the position in Parquet, from 1."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} row {number}: not JSON ({error.msg})") from None
    return rows


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value)
    )  # fmt: skip


def load_preferences(path: Path) -> Preferences:
    """Rows of the export format, JSON Lines or Parquet, text or conversational: pairs
    {prompt, chosen, rejected, label?}, where a tie is left out and both bad gives two undesirable
    answers; and TRL's unpaired rows {prompt, completion, label: true|false}."""
    pairs, unpaired = [], []
    for number, row in _rows(path):
        where = f"{path} row {number}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: not an object")
        fields = ("prompt", "completion") if "completion" in row else ("prompt", "chosen", "rejected")
        missing = [name for name in fields if name not in row]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        prompt = row["prompt"]
        if not ((isinstance(prompt, str) and prompt.strip()) or _is_messages(prompt)):
            raise ValueError(f"{where}: 'prompt' must be text or a list of {{role, content}} messages")
        for name in fields[1:]:
            if not (isinstance(row[name], str) or _is_messages(row[name])):
                raise ValueError(f"{where}: '{name}' must be text or a list of {{role, content}} messages")
        label = row.get("label")
        if "completion" in row:
            if not isinstance(label, bool):
                raise ValueError(f"{where}: 'label' must be true or false in an unpaired row")
            unpaired.append(Example(prompt, reward._answer(row["completion"]), label))
        elif label == "both_bad":
            unpaired += [Example(prompt, reward._answer(row[name]), False) for name in ("chosen", "rejected")]
        elif label != "tie":
            chosen, rejected = reward._answer(row["chosen"]), reward._answer(row["rejected"])
            pairs.append(reward.Pair(prompt, chosen, rejected, comparison_id=row.get("comparison_id")))
    return Preferences(pairs, unpaired)


# ---------------------------------------------------------------------------------------------
# Tokens and log-probabilities


class Tokenized(NamedTuple):
    ids: list[int]
    prompt_length: int  # the answer is ids[prompt_length:]


def tokenize(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, answer: str, max_length: int) -> Tokenized:
    """The prompt as the policy sees it before it answers (`ppo.prompt_ids`), then the answer and
    EOS, as sampling would produce them. Over max_length the prompt loses its oldest tokens, down
    to one (the first answer token is predicted from it), then the answer its last ones."""
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    answer_ids = answer_ids[: max_length - 1]
    prompt_ids = ppo.prompt_ids(tokenizer, prompt, max_length - len(answer_ids))
    return Tokenized(prompt_ids + answer_ids, len(prompt_ids))


def collate(
    sequences: Sequence[Tokenized], pad_id: int, side: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, answer mask), padded on `side`."""
    ids, mask = reward.pad([s.ids for s in sequences], pad_id, side)
    answers = [[0] * s.prompt_length + [1] * (len(s.ids) - s.prompt_length) for s in sequences]
    answer_mask, _ = reward.pad(answers, 0, side)
    return ids.to(device), mask.to(device), answer_mask.to(device)


def answer_logprobs(
    model: PreTrainedModel | torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, answer_mask: torch.Tensor
) -> torch.Tensor:
    """Per sequence, the sum of its answer tokens' log-probabilities; prompt and padding add
    nothing. Position ids skip left padding, so left and right padding give the same sums. Logits
    start at the batch's first answer token: none for prompt tokens before it."""
    first = max(1, int(answer_mask.argmax(1).min()))
    logits = ppo.answer_pass(model, ids, mask, first)[0].float()
    tokens = ppo.gathered_logprobs(logits, ids[:, first:])
    # where, not a product: a fully masked padding row may hold NaN, and NaN * 0 is NaN
    return torch.where(answer_mask[:, first:].bool(), tokens, 0.0).sum(1)


@torch.no_grad()
def reference_logprobs(
    model: PreTrainedModel,
    sequences: Sequence[Tokenized],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    world: distributed.World = distributed.ALONE,
) -> torch.Tensor:
    """Every sequence's answer log-prob under `model`, in one pass before training, so that no
    reference model stays in memory beside the policy. Batched by length (less padding); each rank
    scores its share and all get every one."""
    device = next(model.parameters()).device
    model.eval()
    order = world.share(sorted(range(len(sequences)), key=lambda index: len(sequences[index].ids)))
    out = torch.zeros(len(sequences), dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = collate([sequences[i] for i in indices], tokenizer.pad_token_id, tokenizer.padding_side, device)
        with reward.autocast_for(device):
            out[indices] = answer_logprobs(model, *batch).double().cpu()
    return world.sum(out).float()  # each entry was filled on one rank, zero on the others


# ---------------------------------------------------------------------------------------------
# The losses, per pair or per example, each checked against TRL's in the tests


def dpo_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float) -> torch.Tensor:
    """-log sigmoid(beta * ((log pi_w - log ref_w) - (log pi_l - log ref_l)))."""
    return -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))


def ipo_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float) -> torch.Tensor:
    """(h - 1/(2 beta))^2 with h the log-ratio difference (Azar et al., eq. 17). Pass log-ratios
    averaged over each answer's tokens, not summed: TRL's `ipo` averages them (the IPO authors told
    TRL that the paper's results used this form), and the tests hold us to TRL's definition."""
    return (chosen_logratio - rejected_logratio - 1 / (2 * beta)) ** 2


def kl_reference_point(mismatched_logratio: torch.Tensor, world: distributed.World = distributed.ALONE) -> torch.Tensor:
    """KTO's z0: the batch's mean log-ratio over mismatched (prompt, answer) pairs (over every
    rank's share), floored at 0, and held constant (no gradient), as in the KTO paper and TRL."""
    count = mismatched_logratio.new_tensor(float(mismatched_logratio.numel()))
    total = world.sum(torch.stack([mismatched_logratio.detach().sum(), count]))
    return (total[0] / total[1]).clamp(min=0)


def kto_loss(
    logratio: torch.Tensor,
    desirable: torch.Tensor,
    z0: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Ethayarajh et al., eq. 7: w_d (1 - sigmoid(beta (r - z0))) for a desirable answer,
    w_u (1 - sigmoid(beta (z0 - r))) for an undesirable one, r the answer's log-ratio."""
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio)))
    return torch.where(desirable, good, bad)


# ---------------------------------------------------------------------------------------------
# The plan: every step's sequences, fixed before training


@dataclass(frozen=True)
class Step:
    sequences: list[int]  # DPO, IPO: the pairs' chosen answers, then their rejected ones; KTO: examples
    mismatched: list[int]  # KTO: each example's prompt with the previous example's answer; else empty


@dataclass
class Plan:
    sequences: list[Tokenized]
    desirable: list[bool]  # KTO: per sequence of an example (mismatched ones: False, unused)
    steps: list[Step]


def plan(config: DPOConfig, preferences: Preferences, tokenizer: PreTrainedTokenizerBase) -> Plan:
    """Tokenize once and fix every epoch's batches (length-grouped, seeded), so that the reference
    pass can score everything up front and a resumed run takes the same batches. KTO's mismatched
    pairs rotate the answers by one within each batch, as TRL's KTOTrainer builds them: the answers
    of z0's estimate are the batch's own, with other prompts."""
    rng = random.Random(config.seed)
    encode = lambda prompt, answer: tokenize(tokenizer, prompt, answer, config.max_length)  # noqa: E731
    steps = []
    if config.loss == "kto":
        examples = preferences.examples()
        sequences = [encode(e.prompt, e.completion) for e in examples]
        desirable = [e.desirable for e in examples]
        lengths = [len(s.ids) for s in sequences]
        for _ in range(config.epochs):
            for batch in reward.length_grouped_batches(lengths, config.batch_size, rng):
                first = len(sequences)
                sequences += [
                    encode(examples[i].prompt, examples[batch[k - 1]].completion) for k, i in enumerate(batch)
                ]
                desirable += [False] * len(batch)
                steps.append(Step(batch, list(range(first, len(sequences)))))
        return Plan(sequences, desirable, steps)
    pairs = preferences.pairs
    chosen = [encode(p.prompt, p.chosen) for p in pairs]
    rejected = [encode(p.prompt, p.rejected) for p in pairs]
    lengths = [max(len(c.ids), len(r.ids)) for c, r in zip(chosen, rejected, strict=True)]
    for _ in range(config.epochs):
        for batch in reward.length_grouped_batches(lengths, config.batch_size, rng):
            steps.append(Step(batch + [len(pairs) + i for i in batch], []))
    return Plan(chosen + rejected, [True] * len(pairs) + [False] * len(pairs), steps)


def _mean(values: torch.Tensor) -> float | None:
    return float(values.float().mean()) if values.numel() else None


# ---------------------------------------------------------------------------------------------
# The loop


def train(
    config: DPOConfig,
    preferences: Preferences,
    out: Path,
    *,
    device: torch.device | None = None,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train the policy and save it (adapters merged) in Hugging Face format in `out`, beside
    dpo_config.json, metrics.jsonl (a row per step) and summary.json. A checkpoint in `out` is
    resumed; `stop_after` ends the run after that many steps, as a killed worker would, leaving
    the last checkpoint behind. Under torchrun every rank runs this on its share of each batch;
    rank 0 alone writes `out`."""
    world = distributed.world()
    device = device or world.device
    kto = config.loss == "kto"
    if config.loss not in LOSSES:
        raise ValueError(f"loss {config.loss!r}: one of {', '.join(LOSSES)}")
    if config.fsdp and config.lora:
        raise ValueError("--fsdp with --lora: LoRA's adapters are small enough to train on a whole copy each")
    if kto and config.batch_size < 2:
        raise ValueError(f"batch_size {config.batch_size}: KTO needs 2 or more, its KL term pairs examples up")
    if kto and not preferences.examples():
        raise ValueError("no examples to train on")
    if not kto and not preferences.pairs:
        raise ValueError(f"no preference pairs to train on ({len(preferences.unpaired)} unpaired: --loss kto)")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "summary.json").exists():  # a redelivered task finds the work done
        return json.loads((out / "summary.json").read_text())
    if world.main:
        (out / "dpo_config.json").write_text(config.to_json(world_size=world.size))
    policy, tokenizer = ppo.load_policy(config.policy, device)
    work = plan(config, preferences, tokenizer)
    checkpoint, metrics_file = out / "checkpoint.pt", out / "metrics.jsonl"
    state = torch.load(checkpoint, weights_only=False) if checkpoint.exists() else None

    # 1. Reference: every answer scored once by the starting policy, before any adapter exists;
    # a resumed run reads them from its checkpoint, as its policy has moved since.
    reference = (
        state["reference"]
        if state
        else reference_logprobs(policy, work.sequences, tokenizer, 2 * config.batch_size, world)
    )
    if config.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, task_type="CAUSAL_LM")
        policy = get_peft_model(policy, lora)  # type: ignore[assignment]  # it forwards the model's calls
    # Dropout off (TRL's disable_dropout): at the first step the policy must equal its reference.
    policy.eval()
    trainer = world.wrap(policy, fsdp=config.fsdp)  # before the optimizer: FSDP replaces the parameters
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = reward.adamw(trainable, device, lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = reward.linear_schedule(optimizer, len(work.steps), config.warmup_ratio)
    start = 0
    if state:
        world.load_state_dict(policy, state["model"])
        world.load_optimizer_state_dict(policy, optimizer, state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        reward.set_rng_states(state, world)
        start = state["step"]
    if world.main:  # rows written after the checkpoint belong to steps that will run again
        rows = metrics_file.read_text().splitlines()[:start] if metrics_file.exists() else []
        metrics_file.write_text("".join(row + "\n" for row in rows))
    desirable = torch.tensor(work.desirable, device=device)
    answer_lengths = torch.tensor([len(s.ids) - s.prompt_length for s in work.sequences], device=device)
    reference = reference.to(device)
    pad_id, side, autocast = tokenizer.pad_token_id, tokenizer.padding_side, reward.autocast_for(device)

    for number in range(start, len(work.steps)):
        if stop_after is not None and number >= stop_after:
            return {"stopped_at": number}
        began = time.perf_counter()
        step = work.steps[number]
        # This rank's share of the step: its examples (KTO, with their mismatched twins) or its pairs'
        # two answers; the loss is weighted so that DDP's average over ranks is the whole batch's mean.
        items = len(step.sequences) if kto else len(step.sequences) // 2
        mine, weight = world.share_or_one(range(items))
        if kto:
            sequences, mismatched_sequences = [step.sequences[k] for k in mine], [step.mismatched[k] for k in mine]
        else:
            sequences = [step.sequences[k] for k in mine] + [step.sequences[items + k] for k in mine]
        # 2. Policy: log-probs of the batch's answers, and their log-ratios to the reference.
        batch = collate([work.sequences[i] for i in sequences], pad_id, side, device)
        with autocast:
            logprobs = answer_logprobs(trainer, *batch)
        logratio = logprobs - reference[sequences]
        rewards = config.beta * logratio.detach()  # the implicit reward of DPO

        # 3. Loss. DPO and IPO compare each pair's two answers; KTO scores each answer against z0.
        if kto:
            with torch.no_grad(), autocast:
                mismatched = collate([work.sequences[i] for i in mismatched_sequences], pad_id, side, device)
                mismatched_logratio = answer_logprobs(policy, *mismatched) - reference[mismatched_sequences]
                z0 = kl_reference_point(mismatched_logratio[: len(mine) if weight else 0], world)
            good = desirable[sequences]
            loss = kto_loss(logratio, good, z0, config.beta, config.desirable_weight, config.undesirable_weight).mean()
            chosen_rewards, rejected_rewards = rewards[good], rewards[~good]
            chosen_logps, rejected_logps = logprobs.detach()[good], logprobs.detach()[~good]
            correct = torch.where(good, rewards > 0, rewards < 0)
            kl = z0
        else:
            half = len(mine)
            chosen, rejected = logratio[:half], logratio[half:]
            if config.loss == "ipo":
                lengths = answer_lengths[sequences]
                loss = ipo_loss(chosen / lengths[:half], rejected / lengths[half:], config.beta).mean()
            else:
                loss = dpo_loss(chosen, rejected, config.beta).mean()
            chosen_rewards, rejected_rewards = rewards[:half], rewards[half:]
            chosen_logps, rejected_logps = logprobs.detach()[:half], logprobs.detach()[half:]
            correct = chosen_rewards > rejected_rewards
            # On the data's answers, not on the policy's own samples: a gauge of drift from the
            # reference, not the KL a sampler would see.
            kl = logratio.detach().mean()

        # 4. Update.
        optimizer.zero_grad(set_to_none=True)
        (weight * loss).backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        elapsed = time.perf_counter() - began

        # 5. Metrics, in named groups, averaged over the ranks; KTO's margin compares the batch's
        # desirable and undesirable means.
        chosen_mean, rejected_mean = _mean(chosen_rewards), _mean(rejected_rewards)
        row = {
            "step": number + 1,
            f"loss/{config.loss}": float(loss.detach()),  # this share's mean: the weighted mean below makes the batch's
            "rewards/chosen": chosen_mean,
            "rewards/rejected": rejected_mean,
            "rewards/accuracy": _mean(correct),
            "rewards/margin": None if chosen_mean is None or rejected_mean is None else chosen_mean - rejected_mean,
            "logps/chosen": _mean(chosen_logps),
            "logps/rejected": _mean(rejected_logps),
            "objective/kl": float(kl),
            "policy/learning_rate": optimizer.param_groups[0]["lr"],
        }
        # A rank whose share was empty ran one example for DDP's sake: its figures weigh nothing.
        row = {**world.mean(row, weight=len(mine) if weight else 0), "speed/pairs_per_second": items / elapsed}
        if (number + 1) % config.checkpoint_every == 0 and number + 1 < len(work.steps):
            state = {
                "model": world.state_dict(policy), "optimizer": world.optimizer_state_dict(policy, optimizer),
                "schedule": schedule.state_dict(),
                **reward.rng_states(world), "step": number + 1, "reference": reference.cpu(),
            }  # fmt: skip
            if world.main:
                torch.save(state, checkpoint.with_suffix(".tmp"))
                checkpoint.with_suffix(".tmp").replace(checkpoint)
        if not world.main:
            continue
        with metrics_file.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if progress is not None:
            progress(number + 1, len(work.steps), row)

    world.check_in_step(policy)
    merged = reward.unwrap_peft(policy, merge=True)
    weights = world.state_dict(merged)
    if not world.main:
        return {}  # rank 0 writes and reports the run
    merged.save_pretrained(out, state_dict=weights)
    tokenizer.save_pretrained(out)
    summary = summarize(config, [json.loads(line) for line in metrics_file.read_text().splitlines()])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    checkpoint.unlink(missing_ok=True)
    return summary


def summarize(config: DPOConfig, rows: Sequence[dict[str, Any]], last: int = 5) -> dict[str, Any]:
    """Means over the last steps (KTO's pairs are examples)."""
    tail = rows[-last:]

    def mean(key: str) -> float | None:
        values = [row[key] for row in tail if row.get(key) is not None]
        return float(np.mean(values)) if values else None

    return {
        "loss_type": config.loss,
        "steps": len(rows),
        "loss": mean(f"loss/{config.loss}"),
        "rewards_accuracy": mean("rewards/accuracy"),
        "rewards_margin": mean("rewards/margin"),
        "kl": mean("objective/kl"),
        "pairs_per_second": mean("speed/pairs_per_second"),
    }


def _progress_bar(step: int, total: int, row: dict[str, Any]) -> None:
    loss = next(value for key, value in row.items() if key.startswith("loss/"))
    accuracy = row["rewards/accuracy"]
    cli.progress_bar(step, total, f"loss {loss:.4f} accuracy {accuracy:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.dpo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="Export file: JSON Lines or Parquet.")
    parser.add_argument("--out", type=Path, required=True, help="Directory for the policy, config and metrics.")
    cli.add_config_flags(parser, DPOConfig)
    args = parser.parse_args(argv)
    config = cli.config_from_flags(DPOConfig, args)
    try:
        summary = train(config, load_preferences(args.data), args.out, progress=_progress_bar)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    distributed.finish(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
