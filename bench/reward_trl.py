"""Our reward-model training loop against TRL's RewardTrainer, side by side in one run.

Both sides get the same thing: the same randomly initialised Llama-shaped model (built once, saved,
loaded by each side), the same tokenizer (SmolLM2's, with its chat template), the same training
pairs, max length, batch size, learning rate, warm-up, gradient clipping and hardware, no gradient
checkpointing, and (on CUDA) fp32 weights with bf16 autocast.

Data: the hh-rlhf harmless file (read in place, parsed by the importer), split by prompt. TRL's
RewardTrainer silently drops every pair with a side longer than max_length; the run counts how many
it drops and then trains both sides on the pairs that fit, so the two process identical tokens. Both
trained models are then scored by the same code (`training.reward.pair_rewards`) on the same
held-out pairs (every one of them, cut from the left where too long).

Each side runs once per training seed (--seeds: data order; the starting model is the same), and
the figures are means over the seeds: on a few hundred pairs one seed's held-out accuracy moves by
several points. Each run is a subprocess of its own, so its peak memory is its own: peak RSS on CPU
(`resource.getrusage`), `torch.cuda.max_memory_allocated` on CUDA. Throughput is training pairs per
second of the training loop (tokenization and model loading excluded on both sides).

    python bench/reward_trl.py                 # CPU: a small Llama shape, a few hundred pairs
    python bench/reward_trl.py --device cuda   # GPU: SmolLM2-135M shape, bf16 autocast, length 512, batch 16

Writes bench/results/reward_trl.json (bench/results/reward_trl_cuda.json with --device cuda) and
prints a table with the ratio ours / TRL.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
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

from bench.common import parse_training_args, peak_memory_mib, run_side, training_machine, write_results  # noqa: E402
from bench.reward_real_data import DATA, hh_pairs  # noqa: E402
from training import backbones  # noqa: E402
from training.reward import Encoded, Pair, RewardConfig, encode, metrics, pair_rewards, split_by_prompt  # noqa: E402

RESULTS = ROOT / "bench" / "results"


@dataclasses.dataclass(frozen=True)
class Preset:
    shape: dict[str, int]  # overrides of SmolLM2-135M's config; empty: its own shape
    max_length: int
    batch_size: int
    train_pairs: int  # 0: every training pair that fits
    learning_rate: float = 1e-4


# A small Llama for the CPU; SmolLM2-135M's own shape for a GPU. Both randomly initialised.
SMALL_LLAMA = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 4}  # fmt: skip
PRESETS = {
    "cpu": Preset(shape=SMALL_LLAMA, max_length=384, batch_size=8, train_pairs=320),
    "cuda": Preset(shape={}, max_length=512, batch_size=16, train_pairs=0),
}


@dataclasses.dataclass
class Setup:
    device: str
    model_dir: str
    max_length: int
    batch_size: int
    learning_rate: float
    warmup_ratio: float = 0.05
    seed: int = 42


# --- one side, in its own process -------------------------------------------------------------


class Clock:
    """Wall and process CPU seconds of a block: CPU time is what a busy shared machine disturbs least."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.wall, self.cpu = device, 0.0, 0.0

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_ours(setup: Setup, train_pairs: list[Pair], device: torch.device) -> tuple[Any, Clock]:
    from training.reward import train_member

    config = RewardConfig(
        backbone=setup.model_dir, max_length=setup.max_length, batch_size=setup.batch_size,
        learning_rate=setup.learning_rate, warmup_ratio=setup.warmup_ratio, seed=setup.seed,
    )  # fmt: skip
    model = transformers.AutoModelForSequenceClassification.from_pretrained(setup.model_dir).to(device)
    tokenizer = AutoTokenizer.from_pretrained(setup.model_dir)
    data = Encoded(train_pairs, tokenizer, config)
    with Clock(device) as clock:
        train_member(model, data, config, seed=setup.seed, device=device)
    return model, clock


def run_trl(setup: Setup, train_pairs: list[Pair], device: torch.device) -> tuple[Any, Clock, int]:
    import datasets
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    rows = [{"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in train_pairs]  # fmt: skip
    steps = -(-len(rows) // setup.batch_size)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TRLRewardConfig(
            output_dir=output_dir, per_device_train_batch_size=setup.batch_size, num_train_epochs=1,
            learning_rate=setup.learning_rate, warmup_steps=max(1, int(setup.warmup_ratio * steps)),
            lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0, max_length=setup.max_length,
            gradient_checkpointing=False, bf16=device.type == "cuda", use_cpu=device.type == "cpu",
            report_to="none", save_strategy="no", logging_steps=10**6, seed=setup.seed, disable_tqdm=True,
        )  # fmt: skip
        model = transformers.AutoModelForSequenceClassification.from_pretrained(setup.model_dir)
        trainer = RewardTrainer(
            model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
            processing_class=AutoTokenizer.from_pretrained(setup.model_dir),
        )  # fmt: skip
        assert isinstance(trainer.train_dataset, datasets.Dataset)  # as given, tokenized and filtered: it has a length
        kept = len(trainer.train_dataset)
        with Clock(device) as clock:
            trainer.train()
    return trainer.model, clock, kept


def side(name: str, setup: Setup, split_file: Path) -> dict[str, Any]:
    device = torch.device(setup.device)
    split = json.loads(split_file.read_text())
    train_pairs = [Pair(**row) for row in split["train"]]
    held_out = [Pair(**row) for row in split["held_out"]]
    if name == "ours":
        model, clock = run_ours(setup, train_pairs, device)
        trained = len(train_pairs)
    else:
        model, clock, trained = run_trl(setup, train_pairs, device)
    peak = peak_memory_mib(device)
    tokenizer = AutoTokenizer.from_pretrained(setup.model_dir)
    config = RewardConfig(backbone=setup.model_dir, max_length=setup.max_length)
    evaluated = Encoded(held_out, tokenizer, config)
    rewards = pair_rewards(model.to(device), evaluated, device, setup.batch_size)
    result = metrics(rewards, evaluated)
    tokens = sum(
        len(encode(tokenizer, p.prompt, a, setup.max_length)) for p in train_pairs for a in (p.chosen, p.rejected)
    )
    return {
        "pairs_trained": trained,
        "train_seconds": round(clock.wall, 2),
        "train_cpu_seconds": round(clock.cpu, 2),
        "pairs_per_second": round(trained / clock.wall, 3),
        "pairs_per_cpu_second": round(trained / clock.cpu, 3),
        "tokens_per_second": round(tokens / clock.wall, 1),
        "peak_memory_mib": round(peak, 1),
        "held_out_accuracy": result["accuracy"],
        "held_out_pairs": result["pairs"],
    }


# --- the comparison ---------------------------------------------------------------------------


def over_seeds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the seeds (data order; the starting model is the same), peak memory at its highest."""
    summary = {key: round(statistics.mean(row[key] for row in rows), 4) for key in rows[0] if key != "seed"}
    summary["peak_memory_mib"] = max(row["peak_memory_mib"] for row in rows)
    summary["held_out_accuracy_by_seed"] = {row["seed"]: row["held_out_accuracy"] for row in rows}
    return summary


def build_model(device: str, directory: Path, seed: int) -> str:
    """The shared starting point: a randomly initialised Llama with SmolLM2's tokenizer and vocabulary."""
    smollm2 = backbones.resolve("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    config = transformers.AutoConfig.from_pretrained(smollm2, num_labels=1, **PRESETS[device].shape)
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    transformers.set_seed(seed)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--data", type=Path, default=DATA, help="hh-rlhf JSON Lines file, gzipped or not.")
    parser.add_argument("--train-pairs", type=int, help="Training pairs that fit (0: all). Default per device.")
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[42, 1, 2, 3], help="Training seeds (data order); results are means."
    )
    args = parse_training_args(parser, argv, side, Setup, "--split")
    if args is None:  # this process was one side, started by run_side
        return 0

    preset = PRESETS[args.device]
    limit = preset.train_pairs if args.train_pairs is None else args.train_pairs
    with tempfile.TemporaryDirectory() as directory:
        setup = Setup(
            device=args.device, model_dir=build_model(args.device, Path(directory) / "model", seed=42),
            max_length=args.max_length or preset.max_length, batch_size=args.batch_size or preset.batch_size,
            learning_rate=preset.learning_rate,
        )  # fmt: skip
        pairs, _ = hh_pairs(args.data)
        train_pairs, held_out = split_by_prompt(pairs, RewardConfig.eval_fraction)
        tokenizer = AutoTokenizer.from_pretrained(setup.model_dir)
        fitting = [
            p for p in train_pairs
            if max(len(encode(tokenizer, p.prompt, a, 10**9)) for a in (p.chosen, p.rejected)) <= setup.max_length
        ]  # fmt: skip
        chosen = fitting[:limit] if limit else fitting
        split_file = Path(directory) / "split.json"
        split_file.write_text(
            json.dumps(
                {
                    "train": [dataclasses.asdict(p) for p in chosen],
                    "held_out": [dataclasses.asdict(p) for p in held_out],
                }
            )
        )
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
        for seed in args.seeds:
            for name in runs:
                print(f"{name}, seed {seed}: training on {len(chosen)} pairs ...", file=sys.stderr, flush=True)
                seeded = dataclasses.replace(setup, seed=seed)
                runs[name].append({"seed": seed, **run_side(__file__, name, seeded, "--split", split_file)})
        sides = {name: over_seeds(rows) for name, rows in runs.items()}

    ours, trl = sides["ours"], sides["trl"]
    model_config = json.loads((Path(backbones.resolve("smollm2-135m")) / "config.json").read_text())
    model_config.update(preset.shape)
    results = {
        "machine": {**training_machine(), "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"},
        "parameters": {
            **{k: v for k, v in dataclasses.asdict(setup).items() if k != "model_dir"},
            "model_shape": {
                k: model_config[k]
                for k in (
                    "hidden_size",
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "vocab_size",
                )
            },
            "autocast": "bf16" if args.device == "cuda" else "none (fp32)",
            "gradient_checkpointing": False,
        },  # fmt: skip
        "data": {
            "training_pairs_in_split": len(train_pairs),
            "dropped_by_trl_for_length": len(train_pairs) - len(fitting),
            "trained_on": len(chosen),
            "held_out": len(held_out),
        },
        "ours": ours,
        "trl": trl,
        "ratio_ours_over_trl": {
            "pairs_per_second": round(ours["pairs_per_second"] / trl["pairs_per_second"], 3),
            "pairs_per_cpu_second": round(ours["pairs_per_cpu_second"] / trl["pairs_per_cpu_second"], 3),
            "peak_memory": round(ours["peak_memory_mib"] / trl["peak_memory_mib"], 3),
            "held_out_accuracy_points": round(100 * (ours["held_out_accuracy"] - trl["held_out_accuracy"]), 1),
        },
    }
    out = args.out or RESULTS / ("reward_trl.json" if args.device == "cpu" else "reward_trl_cuda.json")
    write_results(out, results)
    print(f"{'':22} {'ours':>10} {'TRL':>10} {'ours/TRL':>9}")
    for key in ("pairs_per_second", "pairs_per_cpu_second", "tokens_per_second", "peak_memory_mib"):
        ratio = ours[key] / trl[key] if trl[key] else float("nan")
        print(f"{key:22} {ours[key]:>10.3f} {trl[key]:>10.3f} {ratio:>9.2f}")
    print(f"{'held_out_accuracy':22} {ours['held_out_accuracy']:>10.3f} {trl['held_out_accuracy']:>10.3f}")
    data = results["data"]
    print(f"TRL drops {data['dropped_by_trl_for_length']} of {data['training_pairs_in_split']} training pairs "
          f"longer than {setup.max_length} tokens; both trained on {data['trained_on']}; wrote {out}")  # fmt: skip
    if trl["pairs_trained"] != ours["pairs_trained"]:
        print(
            f"warning: TRL kept {trl['pairs_trained']} of the {ours['pairs_trained']} pairs we gave it", file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
