"""Reward-model recipes on real data, side by side in one run: TRL's RewardTrainer with its recipe
for MiniLM-L6 against `training.reward` with the command line's defaults, and each idea toggled.

Data: the hh-rlhf harmless file in ../shared/data (read in place), parsed as
bench/reward_real_data.py does, held out by prompt (`split_by_prompt`, 10%). Every side sees the
same training prompts (ours sets some of them aside for validation) and is scored by the same code
(`pair_rewards`) on the same held-out pairs, every one of them, cut from the left past 256 tokens.

- `trl`: TRL's RewardTrainer, lr 5e-5, max length 256, batch 16, one epoch, its other defaults
  (dropout off, no warm-up, linear decay) but fp32, as ours on a CPU (its bf16 default crawls on
  one without bf16 instructions). It gets our token ids (so both sides read identical tokens) and
  drops, as it does, every pair longer than max_length.
- `defaults`: `training.reward.train` with `RewardConfig(backbone="minilm-l6")`, i.e. the CLI's
  defaults; the held-out accuracy at each validation is recorded too (never used to choose).
- the ideas: the defaults with one thing changed (see VARIANTS).

Each run keeps its rewards on every held-out pair (and ours on every validation pair), so runs are
compared pair by pair against `trl`: the pairs one side gets right and the other wrong (McNemar's
exact test) and a bootstrap interval of the accuracy difference. With 156 held-out pairs one
accuracy alone has a standard error of about 4 points.

`--seeds 42 43 44` runs every variant once per seed. Ensemble member k of a run with seed s trains
exactly as a single run with seed s + k does (the same seed for its head, its data order and its
dropout), so the rewards of the runs at seeds 42, 43, ... averaged are those `ensemble_size` 2, 3, ...
would score, and are reported as such (validation figures averaged the same way). Runs split over
several processes are joined with `--merge`.

    python bench/reward_recipes.py [--variants trl defaults one-epoch ensemble-2 ...] [--seeds 42 43]
    python bench/reward_recipes.py --merge a.json b.json [--out bench/results/reward_recipes.json]

Writes bench/results/reward_recipes.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import training.reward  # noqa: E402
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
    split_validation,
    train,
)

RESULTS = ROOT / "bench" / "results" / "reward_recipes.json"
BACKBONE = "minilm-l6"
TRL_RECIPE: dict[str, Any] = {"learning_rate": 5e-5, "max_length": 256, "batch_size": 16, "epochs": 1}
CPU = torch.device("cpu")
DEFAULT_SEED = 42

# Each idea: the CLI's defaults with these fields changed. "dropout": False is no RewardConfig field:
# the bench sets every dropout of the loaded model to 0 (TRL's disable_dropout) to measure the idea.
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "one-epoch": {"epochs": 1},  # the TRL recipe in our trainer, still keeping the best validation
    "trl-recipe": {**TRL_RECIPE, "validation_fraction": 0.0},  # TRL's recipe, every training pair, last checkpoint
    "ensemble-2": {"ensemble_size": 2},  # two members, their rewards averaged at scoring time
    "ensemble-3": {"ensemble_size": 3},
    "one-epoch-ensemble-3": {"epochs": 1, "ensemble_size": 3},
    "three-epochs-early-stop": {"epochs": 3, "patience": 2},
    "warmup-0.1": {"warmup_ratio": 0.1},
    "no-warmup": {"warmup_ratio": 0.0},
    "one-epoch-no-dropout": {"epochs": 1, "dropout": False},
    "lr-1e-4": {"learning_rate": 1e-4},
    "one-epoch-no-dropout-lr-1e-4": {"epochs": 1, "dropout": False, "learning_rate": 1e-4},
    "one-epoch-no-dropout-lr-2e-4": {"epochs": 1, "dropout": False, "learning_rate": 2e-4},
    "no-dropout": {"dropout": False},
    "max-length-384": {"max_length": 384},
}


def run_key(name: str, seed: int) -> str:
    return name if seed == DEFAULT_SEED else f"{name} seed {seed}"


def rounded(rewards: np.ndarray) -> list[list[float]]:
    return [[round(float(value), 5) for value in row] for row in rewards]


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
            # TRL turns bf16 on by default; on a CPU without bf16 instructions (AVX2 only) that runs its
            # matrix products about 100x slower, and ours trains in fp32 on a CPU: both sides in fp32.
            bf16=False,
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
    rewards = pair_rewards(model, held_out_data, CPU, 16)
    result = metrics(rewards, held_out_data)
    return {
        "recipe": {
            **TRL_RECIPE,
            "dropout": "off (TRL's disable_dropout)",
            "warmup": "none",
            "schedule": "linear",
            "precision": "fp32",
        },
        "seed": seed,
        "train_pairs": kept,
        "dropped_for_length": len(train_pairs) - kept,
        "accuracy": result["accuracy"],
        "ece": result["ece"],
        "train_seconds": round(seconds, 1),
        "held_out_rewards": rounded(rewards),
    }


def without_dropout(load_model: Any) -> Any:
    """`training.reward.load_model`, with every dropout of the model it loads set to 0."""

    def load(config: RewardConfig, device: torch.device) -> Any:
        model, tokenizer = load_model(config, device)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model, tokenizer

    return load


def member_rewards(directory: Path, pairs: list[Pair], config: RewardConfig) -> np.ndarray:
    """The saved members' rewards on `pairs`, averaged, as `train` scores them."""
    rewards = []
    for member in sorted(directory.glob("member_*")):
        tokenizer = AutoTokenizer.from_pretrained(member)
        model = AutoModelForSequenceClassification.from_pretrained(member)
        rewards.append(pair_rewards(model, Encoded(pairs, tokenizer, config), CPU, 16))
    return np.mean(rewards, axis=0)


def run_ours(name: str, train_pairs: list[Pair], held_out: list[Pair], seed: int) -> dict[str, Any]:
    fields = dict(VARIANTS[name])
    dropout = fields.pop("dropout", True)
    config = RewardConfig(backbone=BACKBONE, seed=seed, **fields)
    resolved = resolve_defaults(config)[0]
    _, validation_pairs = split_validation(train_pairs, resolved.eval_fraction, resolved.validation_fraction)
    load_model = training.reward.load_model
    with tempfile.TemporaryDirectory() as directory:
        if not dropout:
            training.reward.load_model = without_dropout(load_model)  # train() looks it up at each member
        try:
            started = time.perf_counter()
            # train() splits by prompt again: the held-out pairs land on the held-out side, the rest train.
            summary = train([*train_pairs, *held_out], config, Path(directory), device=CPU, watch_held_out=True)
            seconds = time.perf_counter() - started
        finally:
            training.reward.load_model = load_model
        held_out_rewards = member_rewards(Path(directory), held_out, resolved)
        validation_rewards = member_rewards(Path(directory), validation_pairs, resolved)
    # Rescored from the saved members: the same figure train() reported, or the pairs are not the same.
    assert abs(float((held_out_rewards[:, 0] > held_out_rewards[:, 1]).mean()) - summary["accuracy"]) < 1e-9
    validation = summary["validation"]
    return {
        "config": {**dataclasses.asdict(resolved), **({"dropout": "off (set by the bench)"} if not dropout else {})},
        "train_pairs": summary["train_pairs"],
        "validation_pairs": validation["pairs"],
        "held_out_pairs": summary["held_out_pairs"],
        "accuracy": summary["accuracy"],
        "validation_accuracy": validation["accuracy"],
        "ece": summary["ece"],
        "members": validation["members"],
        "train_seconds": round(seconds, 1),
        "held_out_rewards": rounded(held_out_rewards),
        "validation_rewards": rounded(validation_rewards),
    }


def correct(rewards: list[list[float]]) -> np.ndarray:
    array = np.asarray(rewards)
    return array[:, 0] > array[:, 1]


def paired(ours: np.ndarray, theirs: np.ndarray, *, resamples: int = 10000) -> dict[str, Any]:
    """Ours against theirs on the same pairs: the discordant counts, McNemar's exact two-sided p and
    a bootstrap 95% interval of the accuracy difference (in points)."""
    only_ours, only_theirs = int((ours & ~theirs).sum()), int((~ours & theirs).sum())
    discordant = only_ours + only_theirs
    tail = sum(math.comb(discordant, k) for k in range(min(only_ours, only_theirs) + 1)) / 2**discordant
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(ours), size=(resamples, len(ours)))
    differences = (ours[draws].mean(axis=1) - theirs[draws].mean(axis=1)) * 100
    return {
        "difference_points": round(float(ours.mean() - theirs.mean()) * 100, 2),
        "right_only_here": only_ours,
        "right_only_trl": only_theirs,
        "mcnemar_p": round(min(1.0, 2 * tail), 4),
        "bootstrap_95": [round(float(x), 2) for x in np.percentile(differences, [2.5, 97.5])],
    }


def ensembles(runs: dict[str, Any]) -> dict[str, Any]:
    """For each variant trained alone at seeds 42, 43, ...: the first k of them averaged, which is
    what the variant with `ensemble_size` k scores (member k trains as the run at seed 42 + k does)."""
    found: dict[str, Any] = {}
    for name in VARIANTS:
        seeds: list[dict[str, Any]] = []
        while run_key(name, DEFAULT_SEED + len(seeds)) in runs and VARIANTS[name].get("ensemble_size", 1) == 1:
            seeds.append(runs[run_key(name, DEFAULT_SEED + len(seeds))])
        for size in range(2, len(seeds) + 1):
            held_out = np.mean([run["held_out_rewards"] for run in seeds[:size]], axis=0)
            validation = np.mean([run["validation_rewards"] for run in seeds[:size]], axis=0)
            found[f"{name} ensemble-{size} (seeds {DEFAULT_SEED}-{DEFAULT_SEED + size - 1} averaged)"] = {
                "accuracy": float(correct(held_out.tolist()).mean()),
                "validation_accuracy": float(correct(validation.tolist()).mean()),
                "train_pairs": seeds[0]["train_pairs"],
                "validation_pairs": seeds[0]["validation_pairs"],
                "train_seconds": round(sum(run["train_seconds"] for run in seeds[:size]), 1),
                "held_out_rewards": rounded(held_out),
            }
    return found


def analyse(results: dict[str, Any]) -> None:
    """Adds the ensembles averaged from single runs, and each run's paired comparison with `trl`."""
    runs = results["runs"]
    results["ensembles"] = ensembles(runs)
    if "trl" not in runs:
        return
    theirs = correct(runs["trl"]["held_out_rewards"])
    for row in [*runs.values(), *results["ensembles"].values()]:
        if row is not runs["trl"]:
            row["versus_trl"] = paired(correct(row["held_out_rewards"]), theirs)


def print_table(results: dict[str, Any]) -> None:
    print(f"{'run':58} {'train':>5} {'val':>4} {'held-out':>8} {'val acc':>7} {'vs trl':>6} {'only us/trl':>11} "
          f"{'p':>6} {'bootstrap 95%':>15} {'seconds':>8}")  # fmt: skip
    for name, row in [*results["runs"].items(), *results.get("ensembles", {}).items()]:
        validation = row.get("validation_accuracy")
        versus = row.get("versus_trl")
        paired_columns = (
            f"{versus['difference_points']:>+6.1f} {versus['right_only_here']:>5}/{versus['right_only_trl']:<5} "
            f"{versus['mcnemar_p']:>6.3f} {str(versus['bootstrap_95']):>15}"
            if versus else f"{'':>6} {'':>11} {'':>6} {'':>15}"
        )  # fmt: skip
        print(
            f"{name:58} {row['train_pairs']:>5} {row.get('validation_pairs', 0):>4} {row['accuracy']:>8.3f} "
            f"{validation if validation is not None else float('nan'):>7.3f} {paired_columns} {row['train_seconds']:>8}"
        )


def merge(paths: list[Path]) -> dict[str, Any]:
    """Runs from several result files (single or merged) of the same data and split, in one."""
    parts = [json.loads(path.read_text()) for path in paths]
    if any(part["data"] != parts[0]["data"] for part in parts):
        raise ValueError("the result files differ in their data or split: their runs are not comparable")
    return {
        # A file merged before lists its machines and commands: it joins again as its runs' sum.
        "machines": [machine for part in parts for machine in part.get("machines", [part.get("machine")])],
        "commands": [command for part in parts for command in part.get("commands", [part.get("command")])],
        "data": parts[0]["data"],
        "runs": {name: run for part in parts for name, run in part["runs"].items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="hh-rlhf JSON Lines file, gzipped or not.")
    parser.add_argument("--variants", nargs="+", choices=["trl", *VARIANTS], default=["trl", "defaults"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[DEFAULT_SEED], help="Each variant runs once a seed.")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON", help="Join these result files instead.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.merge:
        merged = merge(args.merge)
        merged["commands"].append("python bench/reward_recipes.py " + " ".join(sys.argv[1:] if argv is None else argv))
        analyse(merged)
        write_results(args.out, merged)
        print_table(merged)
        return 0

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
    for seed in args.seeds:
        for name in args.variants:
            key = run_key(name, seed)
            print(f"[{time.strftime('%H:%M:%S')}] {key} ...", file=sys.stderr, flush=True)
            if name == "trl":
                results["runs"][key] = run_trl(train_pairs, held_out, seed)
            else:
                results["runs"][key] = run_ours(name, train_pairs, held_out, seed)
            analyse(results)
            write_results(args.out, results)
            print(f"[{time.strftime('%H:%M:%S')}] {key}: held-out {results['runs'][key]['accuracy']:.3f}",
                  file=sys.stderr, flush=True)  # fmt: skip

    print_table(results)
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
