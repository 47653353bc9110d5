"""Our PPO (critic included) against TRL's RLOOTrainer, side by side in one run, plus the
generation ceiling: plain `model.generate` of the same model, batch and length.

Every side gets the same thing: the same randomly initialised Llama-shaped policy (built once,
saved, loaded by each side), the same reward model (a `training.reward`-layout directory whose
member shares the policy's shape and tokenizer, so our critic starts from it), the same prompts,
the same completions per step, new-token length, temperature (0.7, top_k 0, top_p 1), KL
coefficient (0.05, so TRL loads a reference too), learning rate, hardware, no gradient
checkpointing, and (on CUDA) fp32 weights with bf16 autocast. TRL scores completions with our own
`training.ppo.RewardModel` through a reward callable, so both sides pay the same scoring code.

The two update recipes are each side's defaults: ours runs 4 epochs x 4 minibatches (16 optimizer
steps) per rollout, as Stiennon et al.; TRL's RLOO one optimizer step per rollout. Episodes per
second is the end-to-end rate of a training step (rollout, scoring, update), warm-up steps
excluded. The models are random, so a completion ends early only where EOS is sampled by chance;
generated tokens are counted up to and with the first EOS on every side.

Each side runs in a subprocess of its own, so its peak memory is its own: peak RSS on CPU
(`resource.getrusage`, which includes the ~0.5 GiB of the imported libraries: `baseline_rss_mib`
shows it), `torch.cuda.max_memory_allocated` on CUDA. Each side runs `--rounds` times (2), in
alternating order, and its fastest run is kept (all runs are in the JSON); on CPU each side uses
one torch thread (`--threads`), since the CPU is shared.

    python bench/ppo_rloo.py                 # CPU: a small Llama, 16 completions x 32 tokens
    python bench/ppo_rloo.py --device cuda   # GPU: SmolLM2-135M shape, bf16, 32 completions x 128 tokens

Writes bench/results/ppo_rloo.json (bench/results/ppo_rloo_cuda.json with --device cuda) and
prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from bench.common import (  # noqa: E402
    parse_training_args,
    peak_memory_mib,
    ratio,
    run_side,
    synchronize,
    training_machine,
    write_results,
)
from training import ppo, reward  # noqa: E402

RESULTS = ROOT / "bench" / "results"


@dataclasses.dataclass(frozen=True)
class Preset:
    shape: dict[str, Any]
    vocab_size: int
    completions: int  # episodes per step, on every side
    group: int  # TRL RLOO completions per prompt (its leave-one-out baseline needs 2 or more)
    new_tokens: int
    prompt_words: tuple[int, int]  # prompt length range, in words (= tokens of the word-level tokenizer)
    steps: int  # timed steps per side
    warmup: int  # steps run first and left out of the figures


SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                "max_position_embeddings": 2048}  # fmt: skip
SMALL_LLAMA = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 4, "tie_word_embeddings": True, "max_position_embeddings": 512}  # fmt: skip
PRESETS = {
    "cpu": Preset(SMALL_LLAMA, vocab_size=1024, completions=16, group=4, new_tokens=32, prompt_words=(12, 20),
                  steps=5, warmup=1),
    "cuda": Preset(SMOLLM2_135M, vocab_size=49152, completions=32, group=4, new_tokens=128, prompt_words=(24, 40),
                   steps=5, warmup=1),
}  # fmt: skip
TEMPERATURE, BETA, LEARNING_RATE, SEED = 0.7, 0.05, 3e-6, 42
SIDES = ("generate", "ours", "ours_lora", "ours_one_update", "trl", "trl_lora")


@dataclasses.dataclass
class Setup:
    device: str
    threads: int  # torch CPU threads of each side
    policy: str
    reward_model: str
    completions: int
    group: int
    new_tokens: int
    steps: int
    warmup: int


# --- one side, in its own process -------------------------------------------------------------


def real_tokens(response: torch.Tensor, eos_token_id: int) -> int:
    """Tokens up to and with each row's first EOS: what our PPO counts as generated."""
    is_eos = response == eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    return int((~after_eos).sum())


def run_ours(
    setup: Setup, prompts: list[str], device: torch.device, lora: bool, one_update: bool = False
) -> dict[str, Any]:
    """`one_update`: a diagnostic, 1 epoch of 1 minibatch (one optimizer step per rollout, as TRL's RLOO)."""
    config = ppo.PPOConfig(
        policy=setup.policy, reward_model=setup.reward_model, steps=setup.warmup + setup.steps,
        batch_size=setup.completions, max_new_tokens=setup.new_tokens, temperature=TEMPERATURE, beta=BETA,
        learning_rate=LEARNING_RATE, lora=lora, checkpoint_every=10**6, seed=SEED,
    )  # fmt: skip
    if one_update:
        config = dataclasses.replace(config, ppo_epochs=1, minibatches=1)
    with tempfile.TemporaryDirectory() as out:
        ppo.train(config, prompts, Path(out), device=device)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    timed = rows[setup.warmup :]
    generation = sum(r["timing/generation_s"] for r in timed)
    scoring = sum(r["timing/scoring_s"] for r in timed)
    update = sum(r["timing/update_s"] for r in timed)
    total = generation + scoring + update
    tokens = sum(r["timing/generated_tokens_per_second"] * r["timing/generation_s"] for r in timed)
    return {
        "steps_timed": len(timed),
        "step_seconds": round(total / len(timed), 3),
        "episodes_per_second": round(setup.completions * len(timed) / total, 3),
        "generated_tokens_per_second": round(tokens / generation, 1),
        "generated_tokens_per_second_end_to_end": round(tokens / total, 1),
        "mean_response_length": round(tokens / (setup.completions * len(timed)), 2),
        "split_seconds_per_step": {
            "generation": round(generation / len(timed), 3),
            "scoring": round(scoring / len(timed), 3),
            "update": round(update / len(timed), 3),
        },
        "split_fraction": {
            "generation": round(generation / total, 3),
            "scoring": round(scoring / total, 3),
            "update": round(update / total, 3),
        },
        "optimizer_steps_per_rollout": config.ppo_epochs * config.minibatches,
    }


def run_generate(setup: Setup, prompts: list[str], device: torch.device) -> dict[str, Any]:
    """The ceiling: `model.generate` alone, on the batch shape our PPO samples, the policy held as
    our PPO holds it (fp32 weights, bf16 autocast on CUDA). On CUDA also with bf16 weights."""
    model, tokenizer = ppo.load_policy(setup.policy, device)
    sampler = random.Random(SEED)
    batches = [
        [ppo.prompt_ids(tokenizer, prompts[sampler.randrange(len(prompts))], 256) for _ in range(setup.completions)]
        for _ in range(setup.warmup + setup.steps)
    ]

    def measure() -> tuple[float, int, int]:
        seconds, tokens, positions = 0.0, 0, 0
        for index, batch in enumerate(batches):
            query, query_mask = reward.pad(batch, tokenizer.pad_token_id, "left")
            query, query_mask = query.to(device), query_mask.to(device)
            synchronize(device)
            began = time.perf_counter()
            with torch.no_grad(), reward.autocast_for(device):
                out = model.generate(  # type: ignore[operator]  # PreTrainedModel lacks it; a causal LM has it
                    input_ids=query, attention_mask=query_mask, do_sample=True, temperature=TEMPERATURE, top_k=0,
                    top_p=1.0, max_new_tokens=setup.new_tokens, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, use_cache=True,
                )  # fmt: skip
            synchronize(device)
            if index >= setup.warmup:
                seconds += time.perf_counter() - began
                tokens += real_tokens(out[:, query.shape[1] :], tokenizer.eos_token_id)
                positions += out[:, query.shape[1] :].numel()
        return seconds, tokens, positions

    torch.manual_seed(SEED)
    seconds, tokens, positions = measure()
    result: dict[str, Any] = {
        "generated_tokens_per_second": round(tokens / seconds, 1),
        "positions_per_second": round(positions / seconds, 1),
        "seconds_per_batch": round(seconds / setup.steps, 3),
    }
    if device.type == "cuda":
        model.bfloat16()
        torch.manual_seed(SEED)
        seconds, tokens, _ = measure()
        result["bf16_weights_generated_tokens_per_second"] = round(tokens / seconds, 1)
    return result


def run_trl(setup: Setup, prompts: list[str], device: torch.device, lora: bool) -> dict[str, Any]:
    import datasets
    from trl import RLOOConfig, RLOOTrainer

    reward_model = ppo.RewardModel(Path(setup.reward_model), device, max_length=512)

    def reward_model_score(prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
        with reward.autocast_for(device):  # as our PPO scores: bf16 autocast on CUDA
            return reward_model(prompts, [c.strip() for c in completions]).tolist()

    class StepTimes(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.logs: list[dict[str, float]] = []
            self.parts: dict[str, list[float]] = {"generation": [], "scoring": []}

        def wrap(self, owner: Any, name: str, part: str) -> None:
            """Replace owner.name by a wrapper adding its wall time to self.parts[part]."""
            method = getattr(owner, name)

            def timed(*args: Any, **kwargs: Any) -> Any:
                synchronize(device)
                began = time.perf_counter()
                result = method(*args, **kwargs)
                synchronize(device)
                self.parts[part].append(time.perf_counter() - began)
                return result

            setattr(owner, name, timed)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            synchronize(device)
            self.began = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            synchronize(device)
            self.seconds.append(time.perf_counter() - self.began)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **_: Any) -> None:
            self.logs.append(dict(logs or {}))

    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM")  # as training.ppo
    timer = StepTimes()
    tokenizer = transformers.AutoTokenizer.from_pretrained(setup.policy, padding_side="left")
    with tempfile.TemporaryDirectory() as output_dir:
        args = RLOOConfig(
            output_dir=output_dir, per_device_train_batch_size=setup.completions, num_generations=setup.group,
            max_completion_length=setup.new_tokens, temperature=TEMPERATURE, top_p=1.0, top_k=0, beta=BETA,
            learning_rate=LEARNING_RATE, max_steps=setup.warmup + setup.steps, gradient_checkpointing=False,
            bf16=device.type == "cuda", use_cpu=device.type == "cpu", model_init_kwargs={"dtype": "float32"},
            report_to="none", save_strategy="no", logging_steps=1, seed=SEED, disable_tqdm=True, use_vllm=False,
        )  # fmt: skip
        trainer = RLOOTrainer(
            model=setup.policy, reward_funcs=reward_model_score, args=args,
            train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tokenizer,
            peft_config=peft_config, callbacks=[timer],
        )  # fmt: skip
        # TRL times its phases only for wandb/trackio: wrap its generation and reward calls instead.
        timer.wrap(trainer, "_generate", "generation")
        timer.wrap(trainer, "_calculate_rewards", "scoring")
        trainer.train()
    timed = timer.seconds[setup.warmup :]
    lengths = [log["completions/mean_length"] for log in timer.logs if "completions/mean_length" in log]
    mean_length = sum(lengths[setup.warmup :]) / len(lengths[setup.warmup :]) if lengths else float("nan")
    generation, scoring = (sum(timer.parts[part][setup.warmup :]) for part in ("generation", "scoring"))
    split = {"generation": generation, "scoring": scoring, "rest": sum(timed) - generation - scoring}
    tokens = setup.completions * mean_length * len(timed)
    return {
        "steps_timed": len(timed),
        "step_seconds": round(sum(timed) / len(timed), 3),
        "episodes_per_second": round(setup.completions * len(timed) / sum(timed), 3),
        "generated_tokens_per_second": round(tokens / generation, 1),
        "generated_tokens_per_second_end_to_end": round(tokens / sum(timed), 1),
        "mean_response_length": round(mean_length, 2),
        # scoring: the reward callable alone; rest: old and reference log-probs, the update, bookkeeping.
        "split_seconds_per_step": {part: round(value / len(timed), 3) for part, value in split.items()},
        "optimizer_steps_per_rollout": 1,
        "gradient_checkpointing": False,
    }


def side(name: str, setup: Setup, prompts_file: Path) -> dict[str, Any]:
    device = torch.device(setup.device)
    if device.type == "cpu":
        torch.set_num_threads(setup.threads)
    if name.startswith("trl"):
        import trl  # noqa: F401  (imported before the baseline, as the other sides import theirs at the top)
    baseline = peak_memory_mib(device) if device.type == "cpu" else 0.0
    prompts = json.loads(prompts_file.read_text())
    if name == "generate":
        result = run_generate(setup, prompts, device)
    elif name.startswith("ours"):
        result = run_ours(setup, prompts, device, lora=name.endswith("lora"), one_update=name == "ours_one_update")
    else:
        result = run_trl(setup, prompts, device, lora=name.endswith("lora"))
    return {**result, "peak_memory_mib": round(peak_memory_mib(device), 1), "baseline_rss_mib": round(baseline, 1)}


# --- the comparison ---------------------------------------------------------------------------


def make_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer of the given size, built here: nothing is downloaded."""
    specials = ["<pad>", "<unk>", "<eos>"]
    vocab = {token: index for index, token in enumerate([*specials, *(f"w{i}" for i in range(vocab_size - 3))])}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )


def build_models(preset: Preset, directory: Path) -> tuple[str, str]:
    """The shared policy and a reward model of the same shape and tokenizer, both random."""
    tokenizer = make_tokenizer(preset.vocab_size)
    config = transformers.LlamaConfig(
        vocab_size=preset.vocab_size, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, **preset.shape,
    )  # fmt: skip
    config.num_labels = 1  # the reward member's one score; not a parameter of LlamaConfig's typed signature
    policy, member = directory / "policy", directory / "reward" / "member_0"
    transformers.set_seed(SEED)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    transformers.set_seed(SEED + 1)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(member)
    tokenizer.save_pretrained(member)
    return str(policy), str(member.parent)


def make_prompts(preset: Preset, count: int = 64) -> list[str]:
    rng = random.Random(SEED)
    low, high = preset.prompt_words
    words = preset.vocab_size - 3
    return [" ".join(f"w{rng.randrange(words)}" for _ in range(rng.randint(low, high))) for _ in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, help="Timed steps per side (after the warm-up). Default per device.")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads per side (--device cpu). 1 by default: on a small shared CPU, more threads than "
        "free cores make OpenMP barriers stall (steps 20 to 50 times slower): that measures the neighbours.",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2, help="Runs of each side, in alternating order; best kept.")
    parser.add_argument("--sides", default=",".join(SIDES), help="Comma-separated sides to run.")
    parser.add_argument("--out", type=Path)
    args = parse_training_args(parser, argv, side, Setup, "--prompts")
    if args is None:  # this process was one side, started by run_side
        return 0

    preset = PRESETS[args.device]
    names = args.sides.split(",")
    sides: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as directory:
        policy, reward_model = build_models(preset, Path(directory))
        setup = Setup(
            device=args.device, threads=args.threads, policy=policy, reward_model=reward_model,
            completions=preset.completions, group=preset.group, new_tokens=preset.new_tokens,
            steps=args.steps or preset.steps, warmup=preset.warmup,
        )  # fmt: skip
        prompts = make_prompts(preset)
        prompts_file = Path(directory) / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        # Rounds in alternating order, the best run of each side kept: a neighbour's load on a shared
        # machine slows a run, never speeds it up, so the fastest run is the closest to the code's own speed.
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for round_ in range(args.rounds):
            for name in names if round_ % 2 == 0 else reversed(names):
                print(f"round {round_ + 1}: {name} ...", file=sys.stderr, flush=True)
                runs[name].append(run_side(__file__, name, setup, "--prompts", prompts_file))
        for name, side_runs in runs.items():
            speed = "generated_tokens_per_second" if name == "generate" else "episodes_per_second"
            sides[name] = {**max(side_runs, key=lambda r: r[speed]), f"all_runs_{speed}": [r[speed] for r in side_runs]}

    comparison: dict[str, Any] = {}
    for ours_name, trl_name in (("ours", "trl"), ("ours_lora", "trl_lora")):
        if ours_name in sides and trl_name in sides:
            ours, trl = sides[ours_name], sides[trl_name]
            comparison[f"{ours_name}_over_{trl_name}"] = {
                "episodes_per_second": ratio(ours["episodes_per_second"], trl["episodes_per_second"]),
                "peak_memory": ratio(ours["peak_memory_mib"], trl["peak_memory_mib"]),
            }
    if "generate" in sides:
        ceiling = sides["generate"]["generated_tokens_per_second"]
        for name in ("ours", "ours_lora", "ours_one_update", "trl", "trl_lora"):
            if name in sides:
                comparison[f"{name}_generation_efficiency"] = ratio(sides[name]["generated_tokens_per_second"], ceiling)
    results = {
        "machine": {**training_machine(), "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"},
        "parameters": {
            **{k: v for k, v in dataclasses.asdict(setup).items() if k not in ("policy", "reward_model")},
            "model_shape": {**preset.shape, "vocab_size": preset.vocab_size},
            "prompt_words": preset.prompt_words,
            "temperature": TEMPERATURE,
            "beta": BETA,
            "learning_rate": LEARNING_RATE,
            "precision": "fp32 weights, bf16 autocast" if args.device == "cuda" else "fp32",
            "trl_version": _version("trl"),
        },
        "rounds": args.rounds,
        "sides": sides,
        "comparison": comparison,
    }
    out = args.out or RESULTS / ("ppo_rloo.json" if args.device == "cpu" else "ppo_rloo_cuda.json")
    write_results(out, results)
    print_table(sides, comparison)
    print(f"wrote {out}")
    return 0


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def print_table(sides: dict[str, dict[str, Any]], comparison: dict[str, Any]) -> None:
    print(f"{'side':10} {'episodes/s':>10} {'gen tok/s':>10} {'step s':>8} {'gen s':>7} {'score s':>7} "
          f"{'update s':>8} {'peak MiB':>9}")  # fmt: skip
    for name, row in sides.items():
        split = row.get("split_seconds_per_step", {})
        cells = [row.get("episodes_per_second"), row.get("generated_tokens_per_second"), row.get("step_seconds"),
                 split.get("generation"), split.get("scoring"), split.get("update", split.get("rest"))]  # fmt: skip
        widths = (10, 10, 8, 7, 7, 8)
        pairs = zip(cells, widths, strict=True)
        shown = [f"{c:>{w}.3f}" if isinstance(c, float | int) else f"{'-':>{w}}" for c, w in pairs]
        print(f"{name:10} {' '.join(shown)} {row['peak_memory_mib']:>9.1f}")
    for key, value in comparison.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    sys.exit(main())
