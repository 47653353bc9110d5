"""Bradley-Terry reward model training on exported preference pairs. Pure torch + transformers
(+ peft for LoRA): no Django, so a GPU box runs it from an exported file.

    python -m training.reward --data prefs.jsonl --out runs/rm [--backbone NAME] [...]
    python -m training.reward --evaluate runs/rm --data prefs.jsonl

The loop reads top to bottom in `train`: split by prompt, batch by length, score chosen and
rejected in one forward pass, Bradley-Terry loss with optional margin and reward centering,
checkpoint, evaluate on held-out prompts.
"""

import argparse
import dataclasses
import hashlib
import itertools
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from training import backbones, cli, distributed
from training.reward_config import (  # noqa: F401 - the config is reward.RewardConfig to its users
    MIN_TRAIN_PAIRS,
    PRESETS,
    RewardConfig,
    presets_help,
    resolve_defaults,
)

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Pair:
    prompt: str | Messages
    chosen: str
    rejected: str
    strength: float | None = None
    agreement: float | None = None
    comparison_id: int | None = None


def _answer(value: Any) -> str:
    """Export rows carry the answer as text, or (conversational format) as one assistant message."""
    if isinstance(value, list):
        return "".join(message["content"] for message in value)
    return str(value)


def load_pairs(path: Path) -> list[Pair]:
    """Rows of the export format (JSON Lines or Parquet); ties and both-bad are left out."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    pairs = []
    for number, row in enumerate(rows, start=1):
        missing = {"prompt", "chosen", "rejected"} - row.keys()
        if missing:
            raise ValueError(f"{path} row {number}: missing {', '.join(sorted(missing))}")
        if row.get("label") in ("tie", "both_bad"):
            continue
        pairs.append(
            Pair(
                prompt=row["prompt"],
                chosen=_answer(row["chosen"]),
                rejected=_answer(row["rejected"]),
                strength=row.get("mean_strength"),
                agreement=row.get("agreement"),
                comparison_id=row.get("comparison_id"),
            )
        )
    return pairs


def split_by_prompt(pairs: Sequence[Pair], fraction: float) -> tuple[list[Pair], list[Pair]]:
    """Held-out pairs are chosen by prompt, so no prompt is on both sides of the split."""

    train = [pair for pair in pairs if _prompt_position(pair) >= fraction]
    return train, [pair for pair in pairs if _prompt_position(pair) < fraction]


def _prompt_position(pair: Pair) -> float:
    """Where the pair's prompt falls in [0, 1): a hash, so a prompt's side of every split is fixed."""
    digest = hashlib.sha256(json.dumps(pair.prompt, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_validation(
    train_pairs: Sequence[Pair], eval_fraction: float, validation_fraction: float
) -> tuple[list[Pair], list[Pair]]:
    """`validation_fraction` of the training prompts (those of `split_by_prompt(pairs, eval_fraction)`)
    set aside to choose the checkpoint kept. Positions past the held-out ones: never a held-out prompt."""
    end = eval_fraction + validation_fraction * (1 - eval_fraction)
    validation = [pair for pair in train_pairs if _prompt_position(pair) < end]
    return [pair for pair in train_pairs if _prompt_position(pair) >= end], validation


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str | Messages, answer: str, max_length: int) -> list[int]:
    """Prompt and answer as the model sees them, cut from the left so the answer always survives."""
    return encode_all(tokenizer, [(prompt, answer)], max_length)[0]


def encode_all(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[tuple[str | Messages, str]], max_length: int
) -> list[list[int]]:
    """`encode` of every (prompt, answer) row, in one call of the tokenizer: a call a row costs 1.5
    to 2 times as much (a scoring pass encodes a whole rollout batch, training all its pairs).
    Without a chat template, the prompt is `plain_text` and an encoder with a separator token
    ([SEP]) reads prompt and answer as a text pair, "[CLS] prompt [SEP] answer [SEP]": where the
    answer begins is marked, not lost in whitespace. Other tokenizers get them joined by a blank line."""
    if not rows:
        return []
    templated = bool(tokenizer.chat_template)
    prompts = [as_messages(prompt) for prompt, _ in rows]
    answers = [answer for _, answer in rows]
    encoded: list[list[int]]
    if templated:
        texts = [
            str(tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False))
            for messages, answer in zip(prompts, answers, strict=True)
        ]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    elif tokenizer.sep_token is not None:
        encoded = tokenizer([plain_text(messages) for messages in prompts], answers)["input_ids"]
    else:
        joined = [f"{plain_text(messages)}\n\n{answer}" for messages, answer in zip(prompts, answers, strict=True)]
        encoded = tokenizer(joined)["input_ids"]
    eos, special = tokenizer.eos_token_id, set(tokenizer.all_special_ids)
    cut = []
    for ids in encoded:
        if not templated and eos is not None and ids[-1:] != [eos]:
            ids = [*ids, eos]
        # Cut from the left, keeping a leading special token ([CLS], <bos>): encoders pool on it.
        keep = 1 if ids and ids[0] in special else 0
        cut.append(ids if len(ids) <= max_length else ids[:keep] + ids[len(ids) - (max_length - keep) :])
    return cut


def as_messages(prompt: str | Messages) -> Messages:
    """A text prompt as the one user turn it is; a conversational prompt as it is."""
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def plain_text(messages: Messages) -> str:
    """A prompt for a tokenizer without a chat template: a lone user turn as it is, a dialogue with
    each turn labelled by its role ("User: ...", "Assistant: ..."), so that who said what survives."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{message['role'].capitalize()}: {message['content']}" for message in messages)


def pad(sequences: Sequence[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), padded on `side`. The tokens go in with one copy, not a tensor a row
    (about 3x faster on a small batch): in row-major order the mask's ones are each row's
    positions in order, on either side."""
    lengths = torch.tensor([len(sequence) for sequence in sequences])
    columns = torch.arange(int(lengths.max()))
    mask = columns >= len(columns) - lengths[:, None] if side == "left" else columns < lengths[:, None]
    ids = torch.full(mask.shape, pad_id, dtype=torch.long)
    ids[mask] = torch.tensor(list(itertools.chain.from_iterable(sequences)), dtype=torch.long)
    return ids, mask.long()


def unwrap_peft(model: PreTrainedModel, *, merge: bool = False) -> PreTrainedModel:
    """The transformers model inside peft's wrapper of a LoRA model (the model itself when there is
    none), for what the wrapper hides: its head, its body, its generation config. The adapters sit
    inside its layers, so it computes as the wrapper does. With `merge` they are folded into the
    weights for good, and the result saves and loads as a plain model."""
    if not hasattr(model, "get_base_model"):
        return model
    return model.merge_and_unload() if merge else model.get_base_model()  # type: ignore[operator]  # a PeftModel


def scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per sequence. Decoders are read at the last real token, found from the attention
    mask, so padding side and a pad token equal to EOS cannot move it; encoders use their own
    pooled head."""
    inner = unwrap_peft(model)
    head = getattr(inner, "score", None)
    if head is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    hidden = inner.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask * positions).argmax(dim=1)
    return head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).squeeze(-1).float()


class Scorer(torch.nn.Module):
    """`scores` as a module's forward, for DDP to wrap: its gradient hooks follow forward calls."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return scores(self.model, input_ids, attention_mask)


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, center: float = 0.0
) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected - margin), plus center * mean((r_chosen + r_rejected)^2)."""
    gap = chosen - rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(gap).mean()
    if center:
        loss = loss + center * ((chosen + rejected) ** 2).mean()
    return loss


def margin_of(pair: Pair, config: RewardConfig) -> float:
    return (pair.strength - 1) / 2 if config.margin_from_strength and pair.strength is not None else 0.0


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of similar lengths (less padding), in random order: shuffle, sort within chunks of
    50 batches, cut, shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        ordered = sorted(order[start : start + chunk], key=lambda index: lengths[index])
        batches += [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    rng.shuffle(batches)
    return batches


class Encoded:
    """Token ids of both sides of every pair, computed once."""

    def __init__(self, pairs: Sequence[Pair], tokenizer: PreTrainedTokenizerBase, config: RewardConfig) -> None:
        max_length = config.max_length or resolve_defaults(config)[0].max_length
        assert max_length is not None
        self.pairs = list(pairs)
        self.chosen = encode_all(tokenizer, [(p.prompt, p.chosen) for p in self.pairs], max_length)
        self.rejected = encode_all(tokenizer, [(p.prompt, p.rejected) for p in self.pairs], max_length)
        self.margins = [margin_of(p, config) for p in self.pairs]
        self.pad_id = tokenizer.pad_token_id
        self.side = tokenizer.padding_side

    def batch(self, indices: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chosen then rejected sequences stacked, for one forward pass."""
        ids, mask = pad([self.chosen[i] for i in indices] + [self.rejected[i] for i in indices], self.pad_id, self.side)
        margins = torch.tensor([self.margins[i] for i in indices], dtype=torch.float32, device=device)
        return ids.to(device), mask.to(device), margins

    def lengths(self) -> list[int]:
        return [max(len(c), len(r)) for c, r in zip(self.chosen, self.rejected, strict=True)]


def load_model(config: RewardConfig, device: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = backbones.resolve(config.backbone)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    # A fresh scalar head per member (seeded by the caller): ensemble members must not start alike.
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    for parameter_name, parameter in head.named_parameters() if head is not None else []:
        if parameter_name.endswith("weight"):
            torch.nn.init.normal_(parameter, std=getattr(model.config, "initializer_range", 0.02))
        else:
            torch.nn.init.zeros_(parameter)
    if config.gradient_checkpointing:
        # Renamed in transformers 5.2x; the old name still works there, with a warning.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if config.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, task_type="SEQ_CLS")
        )
    return model.to(device), tokenizer


def autocast_for(device: torch.device) -> Any:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # sampling on a GPU draws from the CUDA generators
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_states(world: distributed.World) -> dict[str, Any]:
    """A checkpoint's generators: rank 0's under "rng", every rank's under "rng_by_rank" (a
    collective: every rank calls it)."""
    every = world.gather_objects(rng_state())
    return {"rng": every[0], "rng_by_rank": every}


def set_rng_states(state: dict[str, Any], world: distributed.World) -> None:
    """This rank's generators from a checkpoint written with as many ranks; with another count
    (or none recorded) rank 0's, so a resumed run is exact only with the count that wrote it."""
    every = state.get("rng_by_rank") or [state["rng"]]
    set_rng_state(every[world.rank] if len(every) == world.size else every[0])


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainResult:
    model: PreTrainedModel
    losses: list[float]
    steps: int
    validations: list[dict[str, Any]] = field(default_factory=list)  # step, accuracy, loss (and watched_accuracy)
    best_step: int | None = None  # the step whose weights the model holds; None: the last


def validation_steps(pairs: int, config: RewardConfig) -> set[int]:
    """The steps after which the model is validated: `validations_per_epoch` an epoch, evenly spread,
    the epoch's last step among them."""
    assert config.batch_size is not None and config.epochs is not None
    per_epoch = -(-pairs // config.batch_size)
    count = max(1, min(config.validations_per_epoch, per_epoch))
    epochs = range(config.epochs)
    return {epoch * per_epoch + round(k * per_epoch / count) for epoch in epochs for k in range(1, count + 1)}


def validate(
    model: PreTrainedModel, data: Encoded, device: torch.device, batch_size: int, world: distributed.World
) -> dict[str, float]:
    """Accuracy and mean Bradley-Terry loss on validation pairs; the model is left in training mode."""
    rewards = pair_rewards(model, data, device, batch_size, world)
    model.train()
    gap = torch.from_numpy(rewards[:, 0] - rewards[:, 1])
    return {"accuracy": float((gap > 0).float().mean()), "loss": float(-F.logsigmoid(gap).mean())}


def adamw(parameters: list[torch.nn.Parameter], device: torch.device, **options: Any) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel (CPU, CUDA): one kernel for all parameters instead of
    a loop over them (torch's default on CPU), which is most of a small model's optimizer step."""
    return torch.optim.AdamW(parameters, fused=device.type in ("cpu", "cuda"), **options)


def linear_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float) -> Any:
    """A linear warm-up over `warmup_ratio` of `steps`, then a linear decay to 0 (reward and DPO)."""
    warmup = max(1, int(warmup_ratio * steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))
    )


def train_member(
    model: PreTrainedModel,
    data: Encoded,
    config: RewardConfig,
    *,
    seed: int,
    device: torch.device,
    checkpoint_dir: Path | None = None,
    stop_after: int | None = None,
    progress: Any = None,
    validation: Encoded | None = None,
    watch: Encoded | None = None,
    world: distributed.World = distributed.ALONE,
) -> TrainResult:
    """Train one reward model. A checkpoint in checkpoint_dir is resumed; `stop_after` ends the run
    after that many steps (as a killed worker would), leaving the last checkpoint behind. With
    `validation` pairs the model is validated `validations_per_epoch` times an epoch and ends with
    the weights of its best validation (accuracy, then loss), stopping early after `patience`
    validations without improvement. `watch` pairs are scored at each validation and reported,
    never used to choose (a benchmark's held-out curve). In a `world` of several ranks each takes
    its share of every batch (`batches` are the same on all), DDP averages the gradients, and only
    rank 0 writes the checkpoint."""
    config, _ = resolve_defaults(config)
    assert config.batch_size is not None and config.epochs is not None and config.learning_rate is not None
    rng = random.Random(seed)
    torch.manual_seed(seed)
    batches = [b for _ in range(config.epochs) for b in length_grouped_batches(data.lengths(), config.batch_size, rng)]
    model.train()
    scorer = world.wrap(Scorer(model), fsdp=config.fsdp)  # before the optimizer: FSDP replaces the parameters
    optimizer = adamw(
        [p for p in model.parameters() if p.requires_grad], device, lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )  # fmt: skip
    schedule = linear_schedule(optimizer, len(batches), config.warmup_ratio)
    start, losses = 0, []
    validations: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None  # step, key and weights (on the CPU) of the best validation so far
    checkpoint = checkpoint_dir / "checkpoint.pt" if checkpoint_dir else None
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        world.load_state_dict(model, state["model"])
        world.load_optimizer_state_dict(model, optimizer, state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        set_rng_states(state, world)
        start, losses = state["step"], state["losses"]
        validations, best = state.get("validations", []), state.get("best")
    checks = validation_steps(len(data.pairs), config) if validation is not None and validation.pairs else set()

    interrupted = False
    for step in range(start, len(batches)):
        if stop_after is not None and step >= stop_after:
            interrupted = True
            break
        # Forward: this rank's share of the batch, chosen and rejected in one pass; Bradley-Terry
        # loss on the score gap, weighted so that DDP's average is the whole batch's mean.
        share, weight = world.share_or_one(batches[step])
        ids, mask, margins = data.batch(share, device)
        with autocast_for(device):
            rewards = scorer(ids, mask)
        half = len(share)
        loss = weight * bradley_terry_loss(
            rewards[:half], rewards[half:], margins if config.margin_from_strength else None,
            config.center_rewards_coefficient,
        )  # fmt: skip
        # Update.
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(world.sum(loss) / world.size))
        if progress is not None:
            progress(step + 1, len(batches), losses[-1])
        # Validate: keep the best weights so far; stop when `patience` validations bring nothing better.
        stop = False
        if validation is not None and step + 1 in checks:
            row = {"step": step + 1, **validate(model, validation, device, config.batch_size, world)}
            if watch is not None:
                row["watched_accuracy"] = validate(model, watch, device, config.batch_size, world)["accuracy"]
            validations.append(row)
            key = (row["accuracy"], -row["loss"])
            if best is None or key > best["key"]:
                weights = {
                    name: tensor.detach().to("cpu", copy=True) for name, tensor in world.state_dict(model).items()
                }
                best = {"step": step + 1, "key": key, "weights": weights}
            stop = bool(config.patience) and sum(1 for v in validations if v["step"] > best["step"]) >= config.patience
        if checkpoint is not None and ((step + 1) % config.checkpoint_every == 0 or stop):
            state = {
                "model": world.state_dict(model), "optimizer": world.optimizer_state_dict(model, optimizer),
                "schedule": schedule.state_dict(),
                **rng_states(world), "step": len(batches) if stop else step + 1, "losses": losses,
                "validations": validations, "best": best,
            }  # fmt: skip
            if world.main:
                torch.save(state, checkpoint.with_suffix(".tmp"))
                checkpoint.with_suffix(".tmp").replace(checkpoint)
        if stop:
            break
    if not interrupted:
        world.check_in_step(model)
    if best is not None and not interrupted:
        world.load_state_dict(model, best["weights"])
    return TrainResult(
        model=model, losses=losses, steps=len(losses), validations=validations,
        best_step=best["step"] if best is not None else None,
    )  # fmt: skip


@torch.no_grad()
def pair_rewards(
    model: PreTrainedModel,
    data: Encoded,
    device: torch.device,
    batch_size: int,
    world: distributed.World = distributed.ALONE,
) -> np.ndarray:
    """(pairs, 2): reward of chosen and of rejected; each rank scores its share, all get them all."""
    model.eval()
    first, last = world.bounds(len(data.pairs))
    # FSDP gathers each block's weights on every rank at once: all ranks take as many passes (an
    # empty share a pass over the first pair, dropped).
    share = -(-len(data.pairs) // world.size) if distributed.sharded(model) else last - first
    passes = -(-share // batch_size)
    out = [torch.zeros((0, 2), device=device)]
    for start in range(first, first + passes * batch_size, batch_size):
        indices = list(range(start, min(start + batch_size, last)))
        ids, mask, _ = data.batch(indices or [0], device)
        with autocast_for(device):
            rewards = scores(model, ids, mask).float()
        out.append(torch.stack([rewards[: len(indices)], rewards[len(indices) : 2 * len(indices)]], dim=1))
    return world.gather(torch.cat(out)).cpu().numpy()


def _ranks(values: np.ndarray) -> np.ndarray:
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    # Ties get the mean of their ranks, as Spearman's rho wants.
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def metrics(rewards: np.ndarray, data: Encoded, *, bins: int = 10) -> dict[str, Any]:
    """Accuracy, accuracy by agreement, expected calibration error and the length-bias alarm."""
    if len(rewards) == 0:
        return {"pairs": 0, "accuracy": None, "ece": None, "length_spearman": None}
    gap = rewards[:, 0] - rewards[:, 1]
    correct = gap > 0
    probability = 1 / (1 + np.exp(-gap))
    # ECE over the predicted winner's probability, as for any binary classifier.
    confidence = np.maximum(probability, 1 - probability)
    edges = np.linspace(0.5, 1.0, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence >= low) & ((confidence < high) | (high == 1.0))
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    lengths = np.array([len(c) for c in data.chosen] + [len(r) for r in data.rejected], dtype=float)
    by_agreement: dict[str, float] = {}
    agreement = np.array([p.agreement if p.agreement is not None else np.nan for p in data.pairs])
    for name, low, high in (("unanimous", 0.999, 1.01), ("majority", 0.5, 0.999)):
        inside = (agreement >= low) & (agreement < high)
        if inside.any():
            by_agreement[name] = float(correct[inside].mean())
    return {
        "pairs": len(rewards),
        "accuracy": float(correct.mean()),
        "accuracy_by_agreement": by_agreement,
        "ece": float(ece),
        "length_spearman": spearman(np.concatenate([rewards[:, 0], rewards[:, 1]]), lengths),
        "mean_reward": float(rewards.mean()),
    }


def train(
    pairs: Sequence[Pair],
    config: RewardConfig,
    out: Path,
    *,
    device: torch.device | None = None,
    progress: Any = None,
    stop_after: int | None = None,
    watch_held_out: bool = False,
) -> dict[str, Any]:
    """Train `ensemble_size` members on the training split, keep each member's checkpoint with the
    best accuracy on validation prompts (carved from the training prompts), evaluate on held-out
    prompts, save everything under `out`: member_<k>/ (Hugging Face format), config.json (with why
    each per-backbone default has its value), metrics.json (held-out figures at the top level,
    validation figures under "validation") and uncertainty.jsonl (the members' spread per held-out
    pair). `watch_held_out` also scores the held-out pairs at each validation, for a benchmark's
    curve; they never choose anything. Under torchrun every rank runs this, each on its share of
    the batches; rank 0 alone writes `out` (config.json records the world size)."""
    world = distributed.world()
    device = device or world.device
    train_pairs, held_out = split_by_prompt(pairs, config.eval_fraction)
    if len(train_pairs) < MIN_TRAIN_PAIRS:
        raise ValueError(
            f"{len(train_pairs)} training pairs after holding out {len(held_out)}: at least {MIN_TRAIN_PAIRS} are "
            "needed (pairs judged tie or both bad are left out)"
        )
    if not held_out:
        raise ValueError(f"no held-out prompt among {len(pairs)} pairs: raise --eval-fraction or add prompts")
    config, reasons = resolve_defaults(config)
    assert config.batch_size is not None
    if config.fsdp and config.lora:
        raise ValueError("--fsdp with --lora: LoRA's adapters are small enough to train on a whole copy each")
    fit_pairs, validation_pairs = split_validation(train_pairs, config.eval_fraction, config.validation_fraction)
    if len(fit_pairs) < MIN_TRAIN_PAIRS or not validation_pairs:
        # Too few pairs to spare some: train on them all and keep the last checkpoint.
        fit_pairs, validation_pairs = train_pairs, []
    out.mkdir(parents=True, exist_ok=True)
    if world.main:
        (out / "config.json").write_text(config.to_json(reasons, world_size=world.size))
    member_rewards, member_validation_rewards, members = [], [], []
    for member in range(config.ensemble_size):
        torch.manual_seed(config.seed + member)
        model, tokenizer = load_model(config, device)
        train_data, eval_data = Encoded(fit_pairs, tokenizer, config), Encoded(held_out, tokenizer, config)
        validation_data = Encoded(validation_pairs, tokenizer, config)
        member_dir = out / f"member_{member}"
        member_dir.mkdir(exist_ok=True)
        result = train_member(
            model, train_data, config, seed=config.seed + member, device=device, checkpoint_dir=member_dir,
            stop_after=stop_after, progress=progress if world.main else None, validation=validation_data,
            watch=eval_data if watch_held_out else None, world=world,
        )  # fmt: skip
        if stop_after is not None:
            return {"stopped_at": result.steps}
        merged = unwrap_peft(model, merge=True)
        weights = world.state_dict(merged)
        if world.main:
            merged.save_pretrained(member_dir, state_dict=weights)
            tokenizer.save_pretrained(member_dir)
            (member_dir / "checkpoint.pt").unlink(missing_ok=True)
            (member_dir / "losses.json").write_text(json.dumps(result.losses))
        member_rewards.append(pair_rewards(merged, eval_data, device, config.batch_size, world))
        member_validation_rewards.append(pair_rewards(merged, validation_data, device, config.batch_size, world))
        members.append({"steps": result.steps, "best_step": result.best_step, "validations": result.validations})
    rewards = np.mean(member_rewards, axis=0)
    spread = np.std([r[:, 0] - r[:, 1] for r in member_rewards], axis=0)
    summary = {"train_pairs": len(fit_pairs), "held_out_pairs": len(held_out), **metrics(rewards, eval_data)}
    summary["mean_ensemble_spread"] = float(spread.mean()) if len(spread) else None
    validation_metrics = metrics(np.mean(member_validation_rewards, axis=0), validation_data)
    summary["validation"] = {**validation_metrics, "members": members}
    if not world.main:
        return summary
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    with (out / "uncertainty.jsonl").open("w") as handle:
        for pair, value in zip(held_out, spread, strict=True):
            handle.write(json.dumps({"comparison_id": pair.comparison_id, "spread": float(value)}) + "\n")
    return summary


def evaluate(model_dir: Path, pairs: Sequence[Pair], *, device: torch.device | None = None) -> dict[str, Any]:
    """Score every pair with the (ensemble) model in model_dir."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    saved = json.loads((model_dir / "config.json").read_text())
    fields = {spec.name for spec in dataclasses.fields(RewardConfig)}
    config = RewardConfig(**{name: value for name, value in saved.items() if name in fields})  # not "defaults"
    config, _ = resolve_defaults(config)
    assert config.batch_size is not None
    members = sorted(path for path in model_dir.glob("member_*") if (path / "config.json").exists())
    if not members:
        raise FileNotFoundError(f"{model_dir} holds no trained member (member_*/config.json)")
    all_rewards, data = [], None
    for member in members:
        tokenizer = AutoTokenizer.from_pretrained(member)
        model = AutoModelForSequenceClassification.from_pretrained(member).to(device)
        data = Encoded(pairs, tokenizer, config)
        all_rewards.append(pair_rewards(model, data, device, config.batch_size))
    assert data is not None
    return metrics(np.mean(all_rewards, axis=0), data)


def _progress_bar(step: int, total: int, loss: float) -> None:
    cli.progress_bar(step, total, f"loss {loss:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.reward", description=__doc__.split("\n\n")[0], epilog=presets_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--data", type=Path, required=True, help="Export file: JSON Lines or Parquet.")
    parser.add_argument("--out", type=Path, help="Directory for the trained model, config and metrics.")
    parser.add_argument("--evaluate", type=Path, metavar="DIR", help="Score --data with the model in DIR.")
    cli.add_config_flags(parser, RewardConfig)
    args = parser.parse_args(argv)
    pairs = load_pairs(args.data)
    if args.evaluate:
        print(json.dumps(evaluate(args.evaluate, pairs)))
        return 0
    if args.out is None:
        parser.error("--out is required when training")
    config = cli.config_from_flags(RewardConfig, args)
    try:
        summary = train(pairs, config, args.out, progress=_progress_bar)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    distributed.finish(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
