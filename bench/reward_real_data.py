"""Held-out accuracy of the reward model on real preference data, with the offline backbones.

Data: the hh-rlhf harmless file in ../shared/data (read in place), parsed by the importer's own
hh-rlhf reader, so the prompt is the shared dialogue and the answers are the last Assistant turns.
Held-out pairs are chosen by prompt (`training.reward.split_by_prompt`), as in every training run.

For each backbone it trains one model with `training.reward.train` and reports held-out accuracy,
ECE and length bias, plus the accuracy on the held-out pairs that fit in max_length untruncated:
TRL's RewardTrainer drops every longer pair, so that is the subset its reference figure (about 64%
for MiniLM, one epoch, lr 5e-5, batch 16, max_length 256) is measured on. We keep every pair,
cut from the left so the final answers survive.

- MiniLM-L6 (`minilm-l6`): the whole training split, one epoch, lr 5e-5, batch 16, max_length 256.
- SmolLM2-135M-Instruct (`smollm2-135m`): a 135M decoder costs about 30x MiniLM a step on a CPU, so
  by default only the first --smollm2-train-pairs training pairs are used (same held-out set).

    python bench/reward_real_data.py [--backbones minilm-l6 smollm2-135m] [--smollm2-train-pairs 320]

Writes bench/results/reward_real_data.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from annotation.importing import parse_pair_lines  # noqa: E402
from bench.common import training_machine, write_results  # noqa: E402
from training import backbones  # noqa: E402
from training.reward import Pair, RewardConfig, encode, evaluate, resolve_defaults, split_by_prompt, train  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz"
RESULTS = ROOT / "bench" / "results" / "reward_real_data.json"


def hh_pairs(path: Path) -> tuple[list[Pair], list[str]]:
    """The hh-rlhf `{"chosen", "rejected"}` dialogues as pairs, and the importer's error per unusable line."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the hh-rlhf harmless file lives in shared/data")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as lines:
        records, errors = parse_pair_lines(lines, max_line_bytes=2**22)
    if not records:
        raise ValueError(f"{path}: no usable pair ({len(errors)} bad lines, first: {errors[:1]})")
    return [
        Pair(prompt=record.prompt, chosen=record.response_a, rejected=record.response_b) for record in records
    ], errors


def fits_untruncated(pairs: list[Pair], backbone: str, max_length: int) -> list[bool]:
    """Whether both sides fit in max_length whole: the pairs TRL's RewardTrainer would keep."""
    tokenizer = AutoTokenizer.from_pretrained(backbones.resolve(backbone))
    return [
        max(len(encode(tokenizer, pair.prompt, answer, 10**9)) for answer in (pair.chosen, pair.rejected)) <= max_length
        for pair in pairs
    ]


def run_backbone(config: RewardConfig, train_pairs: list[Pair], held_out: list[Pair]) -> dict[str, Any]:
    config, _ = resolve_defaults(config)
    assert config.max_length is not None and config.epochs is not None
    fits = fits_untruncated(held_out, config.backbone, config.max_length)
    fitting = [pair for pair, fit in zip(held_out, fits, strict=True) if fit]
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        # train() splits by prompt again: the held-out pairs land on the held-out side, the rest train.
        summary = train([*train_pairs, *held_out], config, Path(directory), device=torch.device("cpu"))
        seconds = time.perf_counter() - started
        on_fitting = evaluate(Path(directory), fitting, device=torch.device("cpu")) if fitting else {}
    return {
        "config": dataclasses.asdict(config),
        "train_pairs": summary["train_pairs"],
        "held_out_pairs": summary["held_out_pairs"],
        "accuracy": summary["accuracy"],
        "ece": summary["ece"],
        "length_spearman": summary["length_spearman"],
        "held_out_fitting_max_length": len(fitting),
        "accuracy_on_fitting": on_fitting.get("accuracy"),
        "train_and_eval_seconds": round(seconds, 1),
        "train_pairs_per_second": round(summary["train_pairs"] * config.epochs / seconds, 2),
    }


CONFIGS = {
    "minilm-l6": RewardConfig(backbone="minilm-l6", learning_rate=5e-5, batch_size=16, max_length=256),
    "smollm2-135m": RewardConfig(backbone="smollm2-135m", learning_rate=1e-5, batch_size=16, max_length=256),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="hh-rlhf JSON Lines file, gzipped or not.")
    parser.add_argument("--backbones", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    parser.add_argument(
        "--smollm2-train-pairs", type=int, default=320, help="Training pairs for SmolLM2 (0: all of them)."
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    pairs, errors = hh_pairs(args.data)
    train_pairs, held_out = split_by_prompt(pairs, RewardConfig.eval_fraction)
    results: dict[str, Any] = {
        "machine": training_machine(),
        "data": {"file": args.data.name, "pairs": len(pairs), "unusable_lines": len(errors), "held_out": len(held_out)},
        "trl_reference": {"minilm-l6_accuracy": 0.64, "note": "TRL RewardTrainer, pairs over max_length dropped"},
        "backbones": {},
    }
    for name in args.backbones:
        config = CONFIGS[name]
        subset = (
            train_pairs[: args.smollm2_train_pairs]
            if name == "smollm2-135m" and args.smollm2_train_pairs
            else train_pairs
        )
        print(f"{name}: {len(subset)} training pairs, {len(held_out)} held out", file=sys.stderr, flush=True)
        results["backbones"][name] = run_backbone(config, subset, held_out)
        write_results(args.out, results)

    header = ("backbone", "train", "held-out", "accuracy", "acc fits", "ece", "len rho", "pairs/s")
    print(f"{header[0]:14} " + " ".join(f"{title:>9}" for title in header[1:]))
    for name, row in results["backbones"].items():
        rho = row["length_spearman"]
        print(
            f"{name:14} {row['train_pairs']:>9} {row['held_out_pairs']:>9} {row['accuracy']:>9.3f} "
            f"{row['accuracy_on_fitting'] or float('nan'):>9.3f} {row['ece']:>9.3f} "
            f"{rho if rho is not None else float('nan'):>9.3f} {row['train_pairs_per_second']:>9.2f}"
        )
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
