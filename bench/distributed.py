"""The four command lines with 1 process and with N under torchrun, side by side on one task: the
speed-up of N over 1, and whether the results agree (the figure that matters on a 2-core CPU,
where N processes share the same cores and the speed-up is expected near 1x or below).

The task is bench/optimizers.py's: a small Llama-shaped policy warm-started to answer with 0 to 3
marker words, labeled pairs judged by a simulated labeler, held-out prompts, gold = the marker
count. Each command line runs as a user would run it, in a process (or a torchrun group) of its
own, with the same global batch and seed:

- `training.reward` on the pairs: held-out accuracy and the training losses, 1 against N;
- `training.dpo` on the pairs: the loss trajectory, 1 against N;
- `training.grpo` and `training.ppo` against the reward model trained with 1 process: gold and KL of
  the trained policy on the held-out prompts. Sampling differs between the two, so these agree
  only statistically: each side runs once per seed (`--seeds`, default 42 43 44), and the
  spread between seeds on one side is the yardstick for the difference between the sides.

Wall seconds cover the whole command (imports, models loaded, trained, saved); `steps_per_second`
is the training loop's own pace where the trainer logs one (DPO pairs/s, GRPO and PPO episodes/s).

    python bench/distributed.py                       # CPU: gloo, 2 processes
    python bench/distributed.py --device cuda --processes 8   # GPUs: NCCL, SmolLM2-135M shape

Writes bench/results/distributed.json (distributed_cuda.json with --device cuda).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

from bench.common import log, ratio, training_machine, write_results  # noqa: E402
from bench.optimizers import PRESETS, SEED, evaluate, llama_config, make_task, warm_start  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def launch(module: str, arguments: list[str], processes: int, threads: int) -> tuple[dict[str, Any], float]:
    """The command's summary line and its wall seconds."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else []
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *launcher, "-m", module, *arguments], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )  # fmt: skip
    seconds = time.perf_counter() - began
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"{module} with {processes} processes failed ({done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1]), seconds


def rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def largest_relative_gap(first: list[float], second: list[float]) -> float:
    return max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(first, second, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--processes", type=int, default=2, help="Processes of the distributed side.")
    parser.add_argument("--steps", type=int, default=30, help="GRPO and PPO steps.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="GRPO and PPO: a run per seed.")
    parser.add_argument("--out", type=Path, help="Results file (default: bench/results/distributed[_cuda].json).")
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.processes:
        parser.error(f"--device cuda --processes {args.processes}: {torch.cuda.device_count()} CUDA devices here")
    preset = PRESETS[args.device]
    # CPU: the two sides get the same cores (N processes of 1 thread against 1 process of N threads).
    cores = os.cpu_count() or 1
    threads = {1: cores if args.device == "cpu" else 1, args.processes: max(1, cores // args.processes)}
    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    log(f"task and warm start in {work}")
    task = make_task(preset)
    policy, _ = warm_start(preset, task["prompts"], work, torch.device(args.device))
    backbone = work / "reward-backbone"
    tokenizer = transformers.AutoTokenizer.from_pretrained(policy)
    transformers.set_seed(SEED + 2)
    transformers.AutoModelForSequenceClassification.from_config(llama_config(preset, tokenizer)).save_pretrained(
        backbone
    )
    tokenizer.save_pretrained(backbone)
    pairs, prompts = work / "pairs.jsonl", work / "prompts.jsonl"
    pairs.write_text("".join(json.dumps(pair) + "\n" for pair in task["pairs"]))
    prompts.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in task["prompts"]))
    length = ["--max-length", str(preset.max_length)]
    commands: dict[str, tuple[str, list[str]]] = {
        "reward": ("training.reward", ["--data", str(pairs), "--backbone", str(backbone), *length, "--epochs", "2",
                                       "--batch-size", "16", "--learning-rate", str(preset.reward_learning_rate)]),
        "dpo": ("training.dpo", ["--policy", policy, "--data", str(pairs), *length, "--batch-size", "8",
                                 "--learning-rate", str(preset.learning_rate)]),
    }  # fmt: skip
    online = ["--policy", policy, "--prompts", str(prompts), "--max-new-tokens", str(preset.max_new_tokens),
              "--temperature", "1.0", "--steps", str(args.steps),
              "--learning-rate", str(preset.learning_rate)]  # fmt: skip
    results: dict[str, Any] = {
        "machine": training_machine(),
        "command": "python bench/distributed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "processes": args.processes,
        "threads_per_process": threads,
        "runs": {},
    }
    for name in ("reward", "dpo", "grpo", "ppo"):
        if name in ("grpo", "ppo"):
            shape = ["--batch-size", "4", "--group-size", "4"] if name == "grpo" else ["--batch-size", "16"]
            reward_model = ["--reward-model", str(work / "reward-1")]
            commands[name] = (f"training.{name}", [*online, *reward_model, *shape])
        module, arguments = commands[name]
        sides: dict[str, dict[str, Any]] = {}
        runs: list[tuple[str, int, list[str]]] = [("1", 1, []), (str(args.processes), args.processes, [])]
        if name in ("grpo", "ppo"):
            runs = [(f"{count} seed {seed}", count, ["--seed", str(seed)]) for seed in args.seeds
                    for count in (1, args.processes)]  # fmt: skip
        for key, count, extra in runs:
            out = work / f"{name}-{key.replace(', ', '-').replace(' ', '-')}"
            log(f"{name}: {key} process{'es' if count > 1 else ''}")
            summary, seconds = launch(module, [*arguments, *extra, "--out", str(out)], count, threads[count])
            sides[key] = {"wall_seconds": round(seconds, 2), "summary": summary, "out": out}
        first = args.seeds[0]
        one = sides.get("1") or sides[f"1 seed {first}"]
        many = sides.get(str(args.processes)) or sides[f"{args.processes} seed {first}"]
        run: dict[str, Any] = {
            "wall_seconds": {"1": one["wall_seconds"], str(args.processes): many["wall_seconds"]},
            "speed_up": ratio(one["wall_seconds"], many["wall_seconds"]),
        }
        if name == "reward":
            losses = [json.loads((side["out"] / "member_0" / "losses.json").read_text()) for side in (one, many)]
            accuracies = (one["summary"]["accuracy"], many["summary"]["accuracy"])
            run["held_out_accuracy"] = {"1": accuracies[0], str(args.processes): accuracies[1]}
            run["largest_relative_loss_gap"] = largest_relative_gap(*losses)
        elif name == "dpo":
            trajectories = [[row["loss/dpo"] for row in rows(side["out"])] for side in (one, many)]
            run["largest_relative_loss_gap"] = largest_relative_gap(*trajectories)
            paces = [one["summary"]["pairs_per_second"], many["summary"]["pairs_per_second"]]
            run["pairs_per_second"] = {"1": paces[0], str(args.processes): paces[1]}
            run["loop_speed_up"] = ratio(paces[1], paces[0])
        else:
            scored = {
                key: evaluate(str(side["out"]), policy, task["held_out"], preset, torch.device(args.device))
                for key, side in sides.items()
            }
            for figure in ("gold", "gold_standard_error", "kl"):
                run[figure] = {key: figures[figure] for key, figures in scored.items()}
            for count in (1, args.processes):
                for figure in ("gold", "kl"):
                    values = [scored[f"{count} seed {seed}"][figure] for seed in args.seeds]
                    run.setdefault(f"{figure}_over_seeds", {})[str(count)] = {
                        "mean": round(statistics.mean(values), 4),
                        "sd": round(statistics.stdev(values), 4) if len(values) > 1 else None,
                    }
            paces = [one["summary"]["episodes_per_second"], many["summary"]["episodes_per_second"]]
            run["episodes_per_second"] = {"1": paces[0], str(args.processes): paces[1]}
            run["loop_speed_up"] = ratio(paces[1], paces[0])
        results["runs"][name] = run
        log(f"{name}: {json.dumps(run)}")
    out = args.out or RESULTS / ("distributed_cuda.json" if args.device == "cuda" else "distributed.json")
    write_results(out, results)
    print_table(results)
    return 0


def print_table(results: dict[str, Any]) -> None:
    n = str(results["processes"])
    print(f"\n| command | wall s, 1 | wall s, {n} | speed-up | agreement of the results |")
    print("|---|---|---|---|---|")
    for name, run in results["runs"].items():
        if name == "reward":
            accuracy = run["held_out_accuracy"]
            agreement = (f"held-out accuracy {accuracy['1']:.3f} vs {accuracy[n]:.3f}; "
                         f"losses within {run['largest_relative_loss_gap']:.1e}")  # fmt: skip
        elif name == "dpo":
            agreement = f"loss trajectory within {run['largest_relative_loss_gap']:.1e}"
        else:
            gold, kl = run["gold_over_seeds"], run["kl_over_seeds"]
            seeds = len(run["gold"]) // 2
            agreement = (
                f"gold over {seeds} seeds {gold['1']['mean']:.3f} ± {gold['1']['sd']:.3f} vs {gold[n]['mean']:.3f} "
                f"± {gold[n]['sd']:.3f}; KL {kl['1']['mean']:.2f} ± {kl['1']['sd']:.2f} vs {kl[n]['mean']:.2f} "
                f"± {kl[n]['sd']:.2f} (mean ± sd between seeds)"
            )
        seconds = run["wall_seconds"]
        print(f"| {name} | {seconds['1']:.1f} | {seconds[n]:.1f} | {run['speed_up']:.2f}x | {agreement} |")


if __name__ == "__main__":
    sys.exit(main())
