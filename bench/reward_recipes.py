"""Reward-model recipes on real data, side by side in one run: TRL's RewardTrainer with its recipe
for MiniLM-L6 against `training.reward` with the command line's defaults, and each idea toggled.

Data: the hh-rlhf harmless file in ../shared/data (read in place), parsed as
bench/reward_real_data.py does, held out by prompt (`split_by_prompt`, 10%). Every side sees the
same training prompts (ours sets some of them aside for validation) and is scored by the same code
(`pair_rewards`) on the same held-out pairs, every one of them, cut from the left past 256 tokens.

- `trl`: TRL's RewardTrainer, lr 5e-5, max length 256, batch 16, one epoch, its other defaults
  (dropout off, no warm-up, linear decay). It gets our token ids (so both sides read identical
  tokens) and drops, as it does, every pair longer than max_length.
- `defaults`: `training.reward.train` with `RewardConfig(backbone="minilm-l6")`, i.e. the CLI's
  defaults; the held-out accuracy at each validation is recorded too (never used to choose).
- the ideas: the defaults with one thing changed (see VARIANTS).

    python bench/reward_recipes.py [--variants trl defaults one-epoch ensemble-2 ...]

Writes bench/results/reward_recipes.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from bench.common import training_machine, write_results  # noqa: E402
from bench.reward_real_data import DATA, hh_pairs  # noqa: E402
from training import backbones  # noqa: E402
from training.reward import (  # noqa: E402
    Encoded,
    Pair,
    RewardConfig,
    encode,
    metrics,
    pair_rewards,
    resolve_defaults,
    split_by_prompt,
    train,
)

RESULTS = ROOT / "bench" / "results" / "reward_recipes.json"
BACKBONE = "minilm-l6"
TRL_RECIPE: dict[str, Any] = {"learning_rate": 5e-5, "max_length": 256, "batch_size": 16, "epochs": 1}
CPU = torch.device("cpu")

# Each idea: the CLI's defaults with these fields changed.
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "one-epoch": {"epochs": 1},  # the TRL recipe in our trainer, still keeping the best validation
    "trl-recipe": {**TRL_RECIPE, "validation_fraction": 0.0},  # TRL's recipe, every training pair, last checkpoint
    "ensemble-2": {"ensemble_size": 2},  # two members, their rewards averaged at scoring time
    "three-epochs-early-stop": {"epochs": 3, "patience": 2},
    "warmup-0.1": {"warmup_ratio": 0.1},
    "max-length-384": {"max_length": 384},
}


def run_trl(train_pairs: list[Pair], held_out: list[Pair], seed: int) -> dict[str, Any]:
    import datasets
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    source = backbones.resolve(BACKBONE)
    tokenizer = AutoTokenizer.from_pretrained(source)
    rows = [
        {"chosen_ids": encode(tokenizer, p.prompt, p.chosen, 10**9),
         "rejected_ids": encode(tokenizer, p.prompt, p.rejected, 10**9)}
        for p in train_pairs
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as output_dir:
        args = TRLRewardConfig(
            output_dir=output_dir, per_device_train_batch_size=TRL_RECIPE["batch_size"],
            num_train_epochs=TRL_RECIPE["epochs"], learning_rate=TRL_RECIPE["learning_rate"],
            max_length=TRL_RECIPE["max_length"], gradient_checkpointing=False, use_cpu=True, report_to="none",
            save_strategy="no", logging_steps=10**6, seed=seed, disable_tqdm=True,
        )  # fmt: skip
        transformers.set_seed(seed)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(source, num_labels=1)
        trainer = RewardTrainer(
            model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
        )
        assert isinstance(trainer.train_dataset, datasets.Dataset)
        kept = len(trainer.train_dataset)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    config, _ = resolve_defaults(RewardConfig(backbone=BACKBONE, **TRL_RECIPE))
    held_out_data = Encoded(held_out, tokenizer, config)
    result = metrics(pair_rewards(model, held_out_data, CPU, 16), held_out_data)
    return {
        "recipe": {**TRL_RECIPE, "dropout": "off (TRL's disable_dropout)", "warmup": "none", "schedule": "linear"},
        "train_pairs": kept,
        "dropped_for_length": len(train_pairs) - kept,
        "accuracy": result["accuracy"],
        "ece": result["ece"],
        "train_seconds": round(seconds, 1),
    }


def run_ours(name: str, train_pairs: list[Pair], held_out: list[Pair], seed: int) -> dict[str, Any]:
    config = RewardConfig(backbone=BACKBONE, seed=seed, **VARIANTS[name])
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        # train() splits by prompt again: the held-out pairs land on the held-out side, the rest train.
        summary = train([*train_pairs, *held_out], config, Path(directory), device=CPU, watch_held_out=True)
        seconds = time.perf_counter() - started
    validation = summary["validation"]
    return {
        "config": dataclasses.asdict(resolve_defaults(config)[0]),
        "train_pairs": summary["train_pairs"],
        "validation_pairs": validation["pairs"],
        "held_out_pairs": summary["held_out_pairs"],
        "accuracy": summary["accuracy"],
        "validation_accuracy": validation["accuracy"],
        "ece": summary["ece"],
        "members": validation["members"],
        "train_seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="hh-rlhf JSON Lines file, gzipped or not.")
    parser.add_argument("--variants", nargs="+", choices=["trl", *VARIANTS], default=["trl", "defaults"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    pairs, errors = hh_pairs(args.data)
    train_pairs, held_out = split_by_prompt(pairs, RewardConfig.eval_fraction)
    results: dict[str, Any] = {
        "machine": training_machine(),
        "command": "python bench/reward_recipes.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "data": {
            "file": args.data.name,
            "pairs": len(pairs),
            "unusable_lines": len(errors),
            "training_prompts_pairs": len(train_pairs),
            "held_out": len(held_out),
        },  # fmt: skip
        "runs": {},
    }
    for name in args.variants:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        if name == "trl":
            results["runs"][name] = run_trl(train_pairs, held_out, args.seed)
        else:
            results["runs"][name] = run_ours(name, train_pairs, held_out, args.seed)
        write_results(args.out, results)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: held-out {results['runs'][name]['accuracy']:.3f}",
              file=sys.stderr, flush=True)  # fmt: skip

    print(f"{'run':26} {'train':>6} {'val':>5} {'held-out':>8} {'val acc':>8} {'ece':>6} {'seconds':>8}")
    for name, row in results["runs"].items():
        validation = row.get("validation_accuracy")
        print(
            f"{name:26} {row['train_pairs']:>6} {row.get('validation_pairs', 0):>5} {row['accuracy']:>8.3f} "
            f"{validation if validation is not None else float('nan'):>8.3f} {row['ece']:>6.3f} "
            f"{row['train_seconds']:>8}"
        )
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
