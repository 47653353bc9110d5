"""The reward trainer's config and its per-backbone defaults, without torch: a web process (the
dashboard's "Train reward model", a round's readiness) resolves and checks them without loading
the training stack. Only a backbone with no preset reads its config.json through transformers."""

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from training import backbones

MIN_TRAIN_PAIRS = 50  # fewer teach a reward model nothing a round could rely on


@dataclass
class RewardConfig:
    backbone: str = field(
        default="smollm2-135m",
        metadata={"help": "Model id, local path, or an offline package: smollm2-135m, minilm-l6."},
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Tokens per side; longer pairs lose their oldest turns. Default: per backbone."}
    )
    learning_rate: float | None = field(
        default=None, metadata={"help": "AdamW learning rate (InstructGPT: 9e-6). Default: per backbone."}
    )
    epochs: int | None = field(
        default=None, metadata={"help": "Passes over the training pairs (InstructGPT: 1). Default: per backbone."}
    )
    batch_size: int | None = field(
        default=None, metadata={"help": "Pairs per step (each pair is two sequences). Default: per backbone."}
    )
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps with a linear warm-up."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    margin_from_strength: bool = field(
        default=False, metadata={"help": "Subtract a margin (mean vote strength - 1) / 2 from the reward gap."}
    )
    center_rewards_coefficient: float = field(
        default=0.0, metadata={"help": "Weight of mean((r_chosen + r_rejected)^2), pulling rewards to zero mean."}
    )
    ensemble_size: int = field(default=1, metadata={"help": "Members trained with different seeds and data order."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for activation memory."})
    fsdp: bool = field(
        default=False, metadata={"help": "Under torchrun: shard the model over the ranks (FSDP2), not a copy each."}
    )
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of prompts held out for evaluation."})
    validation_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of the training prompts set aside to choose the checkpoint kept (0: the last)."},
    )
    validations_per_epoch: int = field(
        default=2, metadata={"help": "Validations an epoch; the checkpoint with the best validation accuracy is kept."}
    )
    patience: int = field(
        default=0, metadata={"help": "Stop after this many validations without improvement (0: never stop early)."}
    )
    checkpoint_every: int = field(default=200, metadata={"help": "Steps between resumable checkpoints."})
    seed: int = field(default=42, metadata={"help": "Seed of the first ensemble member."})

    def to_json(self, reasons: dict[str, str] | None = None, world_size: int = 1) -> str:
        """The config, the processes that train it, and where each per-backbone default came from
        under "defaults"."""
        saved = {**dataclasses.asdict(self), "world_size": world_size, **({"defaults": reasons} if reasons else {})}
        return json.dumps(saved, indent=2)


# The fields whose defaults depend on the backbone. A preset per packaged backbone, measured on
# shared/data's hh-rlhf pairs (bench/reward_recipes.py); other backbones get RULE's values.
PER_BACKBONE = ("learning_rate", "max_length", "batch_size", "epochs")
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # TRL's RewardTrainer recipe for this backbone (lr 5e-5, 256 tokens, batch 16), with a second
    # epoch: the checkpoint kept is chosen on validation prompts, so more passes cannot overfit it.
    "minilm-l6": (
        "encoder, 22.7M parameters",
        {"learning_rate": 5e-5, "max_length": 256, "batch_size": 16, "epochs": 2},
    ),
    # InstructGPT's single epoch at about 1e-5; 512 tokens keep most multi-turn prompts whole.
    "smollm2-135m": (
        "decoder, 135M parameters",
        {"learning_rate": 1e-5, "max_length": 512, "batch_size": 16, "epochs": 1},
    ),
}
RULE = """Other backbones, by their config.json (no weights loaded):
  encoder (BERT-like): lr 5e-5 under 100M parameters, else 2e-5; 256 tokens; batch 16; 2 epochs
  decoder: lr 1e-5 under 1B parameters, else 5e-6; 512 tokens; batch 16; 1 epoch
  max length never above the model's max_position_embeddings; no config.json found: decoder, under 1B."""


def rule_defaults(architecture: backbones.Architecture | None) -> tuple[str, dict[str, Any]]:
    """RULE's values for a backbone without a preset, and why."""
    if architecture is None:
        return "no config.json found locally: taken as a decoder under 1B parameters", {
            "learning_rate": 1e-5, "max_length": 512, "batch_size": 16, "epochs": 1,
        }  # fmt: skip
    millions = architecture.parameters / 1e6
    kind = "encoder" if architecture.encoder else "decoder"
    if architecture.encoder:
        values = {"learning_rate": 5e-5 if millions < 100 else 2e-5, "max_length": 256, "batch_size": 16, "epochs": 2}
    else:
        values = {"learning_rate": 1e-5 if millions < 1000 else 5e-6, "max_length": 512, "batch_size": 16, "epochs": 1}
    if architecture.max_positions:
        values["max_length"] = min(values["max_length"], architecture.max_positions)
    return f"rule: {kind}, {millions:.3g}M parameters", values


def resolve_defaults(config: RewardConfig) -> tuple[RewardConfig, dict[str, str]]:
    """The config with every per-backbone field left at None filled in from the backbone's preset
    (or RULE), and for each field why it has its value. Fields given explicitly are kept."""
    missing = [name for name in PER_BACKBONE if getattr(config, name) is None]
    reasons = {name: "given" for name in PER_BACKBONE if name not in missing}
    if not missing:
        return config, reasons
    if config.backbone in PRESETS:
        why, values = PRESETS[config.backbone]
        why = f"{config.backbone} preset: {why}"
    else:
        why, values = rule_defaults(backbones.architecture(config.backbone))
    reasons.update({name: why for name in missing})
    return dataclasses.replace(config, **{name: values[name] for name in missing}), reasons


def presets_help() -> str:
    """The --help epilog: each preset's values, and the rule for other backbones."""
    lines = ["Per-backbone defaults (a flag given wins):"]
    for name, (why, values) in PRESETS.items():
        lines.append(f"  {name} ({why}): " + ", ".join(f"{key} {value}" for key, value in values.items()))
    return "\n".join([*lines, RULE])
