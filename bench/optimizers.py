"""Our six policy optimizers side by side on one task with a hidden gold preference (ppo, grpo,
rloo online against a learned reward model; dpo, ipo, kto offline on the labeled pairs), and each
of ours against TRL 1.16's counterpart (DPOTrainer sigmoid and ipo, KTOTrainer, GRPOTrainer,
RLOOTrainer).

The task. A small Llama-shaped policy with a word-level tokenizer (w0..wN, "banana", "question")
gets a short supervised warm start on answers holding the marker word 0 to 3 times, so that it
answers with varied marker counts. Prompts read "question w3 w7". The hidden gold is the
simulated labelers' `annotation.simulation.preference("marker:banana")`: the marker count
(standard library only, imported as is). Labels: pairs of such answers to the training prompts,
each judged once by a simulated labeler with the agreement noise (`simulation.judge`, T = 0.6:
about 84% right on a one-marker gap). Everyone gets the same warm-started policy (also the KL
reference) and the same labels:

- online (ppo, grpo, rloo; TRL GRPO, RLOO): against one reward model trained once with
  `training.reward` on those labels (same shape and tokenizer as the policy, so PPO's critic
  starts from it). Its training time is reported apart and charged to no method. TRL's trainers
  score through a callable around our `training.ppo.RewardModel`, so both sides pay the same
  scoring;
- offline (dpo, ipo, kto; TRL DPO sigmoid, DPO ipo, KTO): on the pairs directly (KTO: each
  pair's chosen answer desirable, its rejected one not; TRL's rows are shuffled once, as its
  sequential sampler takes them in order).

The budget is the same number of training steps for every method, each step 16 episodes (online:
4 prompts x 4 samples, or 16 prompts for PPO) or 8 labeled pairs (offline; KTO: 16 answers), so
offline methods make one pass over the labels. Each method's update recipe is its own default
(PPO 4 epochs x 4 minibatches per rollout with a critic model started from the reward model, the
others one optimizer step per batch) and one learning rate serves all (the preset's). PPO runs a
second time as ppo-lean (--shared-critic --ppo-epochs 1 --minibatches 1: a value head on the
policy, one optimizer step per rollout), and both face the PPO target. Sampling at temperature 1
(top_k 0, top_p 1) everywhere.

Figures. Gold of a policy: the mean gold of answers sampled (fixed seed, temperature 1) to
held-out prompts, several per prompt, with its standard error; KL: the mean over those answers of
the summed log pi - log ref. Wall seconds: the whole training call in its process (models loaded,
data tokenized, trained, saved). Gold gained per wall-second: (gold after - gold before) / wall
seconds. Throughput: pairs/s (DPO, IPO, KTO) or episodes/s (GRPO, RLOO, PPO) over the training
steps after `warmup` steps; our offline trainers score the reference once up front, and its share
of that pass is added to their step time, as TRL's reference forward is in every step. Peak
memory: each side runs in a process of its own (peak RSS on CPU, which includes the imported
libraries: `baseline_rss_mib` shows them; `torch.cuda.max_memory_allocated` on CUDA), one torch
thread per side on CPU. One run per side; the gold figures are one training seed each, so a
difference within two standard errors of the evaluation is called equal.

    python bench/optimizers.py                 # CPU: a small Llama, 50 steps per method
    python bench/optimizers.py --device cuda   # GPU: SmolLM2-135M shape, bf16 autocast, 512 tokens

Writes bench/results/optimizers.json (bench/results/optimizers_cuda.json with --device cuda) and
prints the tables and whether each target is met.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from annotation import simulation  # noqa: E402  (standard library only: no Django settings needed)
from bench.common import (  # noqa: E402
    log,
    parse_training_args,
    peak_memory_mib,
    ratio,
    run_side,
    synchronize,
    training_machine,
    write_results,
)
from training import dpo, grpo, ppo, reward  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GOLD = "marker:banana"
MARKER = "banana"
MARKER_COUNTS = (0, 1, 2, 3)  # in the warm start's answers and the labeled pairs
SEED = 42
TEMPERATURE = 1.0
EPISODES, GROUP = 16, 4  # online: episodes per step; GRPO/RLOO: 4 prompts x 4 samples
PAIRS_PER_STEP = 8  # offline; KTO: 16 answers
# PPO twice: its default recipe, and a lean one (a value head on the policy instead of a critic
# model, one update per rollout, whose forward pass is also the scoring pass).
PPO_RECIPES: dict[str, dict[str, Any]] = {
    "ppo": {}, "ppo-lean": {"shared_critic": True, "ppo_epochs": 1, "minibatches": 1},
}  # fmt: skip
BETAS = {"ppo": 0.05, "grpo": 0.04, "rloo": 0.05, "dpo": 0.1, "ipo": 0.1, "kto": 0.1}  # each trainer's default
BETAS |= {recipe: BETAS["ppo"] for recipe in PPO_RECIPES}  # one trainer, one beta
OURS = ("ppo", "ppo-lean", "grpo", "rloo", "dpo", "ipo", "kto")
PAIRED = ("dpo", "ipo", "kto", "grpo", "rloo")  # ours against TRL's counterpart
ONLINE = ("ppo", "ppo-lean", "grpo", "rloo")
# Interleaved, so that a neighbour's load on the shared machine falls on both sides of a pair alike.
SIDES = ("ours_dpo", "trl_dpo", "ours_ipo", "trl_ipo", "ours_kto", "trl_kto", "ours_grpo", "trl_grpo",
         "ours_rloo", "trl_rloo", "ours_ppo", "ours_ppo-lean")  # fmt: skip
THROUGHPUT_TARGET, PPO_OVER_RLOO_TARGET = 1.5, 2.0


@dataclasses.dataclass(frozen=True)
class Preset:
    shape: dict[str, Any]
    filler_words: int  # w0 .. w{n-1}
    prompt_words: tuple[int, int]  # words after "question"
    answer_words: tuple[int, int]  # filler words of an answer, before its markers
    max_new_tokens: int
    max_length: int  # tokens per sequence, offline and for the reward model
    training_prompts: int
    held_out_prompts: int
    samples_per_prompt: int  # answers per held-out prompt in the gold estimate
    pairs: int  # labeled pairs; the steps are pairs / PAIRS_PER_STEP
    learning_rate: float  # every method's
    warm_start_steps: int
    warm_start_learning_rate: float
    reward_learning_rate: float
    warmup: int  # steps left out of the throughput figures


SMALL_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 2, "tie_word_embeddings": True, "max_position_embeddings": 128}  # fmt: skip
SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                "max_position_embeddings": 2048}  # fmt: skip
PRESETS = {
    "cpu": Preset(SMALL_LLAMA, filler_words=20, prompt_words=(2, 2), answer_words=(3, 10), max_new_tokens=12,
                  max_length=32, training_prompts=200, held_out_prompts=64, samples_per_prompt=4, pairs=400,
                  learning_rate=1e-3, warm_start_steps=300, warm_start_learning_rate=3e-3, reward_learning_rate=3e-3,
                  warmup=2),
    "cuda": Preset(SMOLLM2_135M, filler_words=49147, prompt_words=(24, 40), answer_words=(120, 250),
                   max_new_tokens=256, max_length=512, training_prompts=400, held_out_prompts=128,
                   samples_per_prompt=2, pairs=800, learning_rate=1e-5, warm_start_steps=300,
                   warm_start_learning_rate=3e-4, reward_learning_rate=1e-5, warmup=2),
}  # fmt: skip


@dataclasses.dataclass
class Setup:
    device: str
    threads: int  # torch CPU threads of each side
    policy: str  # the warm-started policy, also the reference
    reward_model: str
    work: str  # each side saves its trained policy in work/<side>
    steps: int
    warmup: int
    learning_rate: float
    max_new_tokens: int
    max_length: int
    seed: int  # every side's training seed (the task, warm start and evaluation keep SEED)


# --- one side, in its own process -------------------------------------------------------------


def metric_rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_ours_online(method: str, setup: Setup, prompts: list[str], device: torch.device, out: Path) -> dict[str, Any]:
    common: dict[str, Any] = dict(
        policy=setup.policy, reward_model=setup.reward_model, steps=setup.steps, max_new_tokens=setup.max_new_tokens,
        temperature=TEMPERATURE, learning_rate=setup.learning_rate, beta=BETAS[method],
        reward_max_length=setup.max_length, checkpoint_every=10**6, seed=setup.seed,
    )  # fmt: skip
    began = time.perf_counter()
    if method in PPO_RECIPES:
        config = ppo.PPOConfig(**common, batch_size=EPISODES, **PPO_RECIPES[method])
        ppo.train(config, prompts, out, device=device)
        updates = config.ppo_epochs * config.minibatches
    else:
        grpo_config = grpo.GRPOConfig(**common, estimator=method, batch_size=EPISODES // GROUP, group_size=GROUP)
        grpo.train(grpo_config, prompts, out, device=device)
        updates = grpo_config.epochs * grpo_config.minibatches
    seconds = time.perf_counter() - began
    timed = metric_rows(out)[setup.warmup :]
    split = {part: sum(r[f"timing/{part}_s"] for r in timed) for part in ("generation", "scoring", "update")}
    total = sum(split.values())
    return {
        "train_seconds": round(seconds, 2),
        "episodes_per_second": round(EPISODES * len(timed) / total, 2),
        "step_seconds": round(total / len(timed), 4),
        "split_seconds_per_step": {part: round(value / len(timed), 4) for part, value in split.items()},
        "optimizer_steps_per_step": updates,
    }


def run_ours_offline(
    loss: str, setup: Setup, pairs: list[dict[str, str]], device: torch.device, out: Path
) -> dict[str, Any]:
    batch = 2 * PAIRS_PER_STEP if loss == "kto" else PAIRS_PER_STEP
    config = dpo.DPOConfig(
        policy=setup.policy, loss=loss, beta=BETAS[loss], epochs=1, learning_rate=setup.learning_rate, batch_size=batch,
        max_length=setup.max_length, checkpoint_every=10**6, seed=setup.seed,
    )  # fmt: skip
    preferences = dpo.Preferences([reward.Pair(p["prompt"], p["chosen"], p["rejected"]) for p in pairs], [])
    reference_seconds = time_calls(dpo, "reference_logprobs", device)
    began = time.perf_counter()
    dpo.train(config, preferences, out, device=device)
    seconds = time.perf_counter() - began
    rows = metric_rows(out)
    timed = rows[setup.warmup :]
    # The items of a KTO step are answers, two to a labeled pair.
    step_seconds = [row["speed/pairs_per_second"] ** -1 * batch for row in timed]
    reference_share = sum(reference_seconds) * len(timed) / len(rows)
    total = sum(step_seconds) + reference_share
    return {
        "train_seconds": round(seconds, 2),
        "pairs_per_second": round(PAIRS_PER_STEP * len(timed) / total, 2),
        "step_seconds": round(total / len(timed), 4),
        "reference_pass_seconds": round(sum(reference_seconds), 4),
        "optimizer_steps_per_step": 1,
    }


def time_calls(owner: Any, name: str, device: torch.device) -> list[float]:
    """Replace owner.name by a wrapper that appends each call's wall time to the list returned."""
    method, seconds = getattr(owner, name), []

    def timed(*args: Any, **kwargs: Any) -> Any:
        synchronize(device)
        began = time.perf_counter()
        result = method(*args, **kwargs)
        synchronize(device)
        seconds.append(time.perf_counter() - began)
        return result

    setattr(owner, name, timed)
    return seconds


class StepTimes(transformers.TrainerCallback):
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        synchronize(self.device)
        self.began = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - self.began)


def trl_arguments(setup: Setup, device: torch.device, output_dir: str) -> dict[str, Any]:
    """What every TRL side is given: our steps, learning rate, clipping, precision and logging."""
    return dict(
        output_dir=output_dir, learning_rate=setup.learning_rate, max_steps=setup.steps, max_grad_norm=1.0,
        weight_decay=0.0, gradient_checkpointing=False, bf16=device.type == "cuda", use_cpu=device.type == "cpu",
        model_init_kwargs={"dtype": "float32"}, report_to="none", save_strategy="no", logging_steps=1, seed=setup.seed,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip


def run_trl_offline(
    loss: str, setup: Setup, pairs: list[dict[str, str]], device: torch.device, out: Path
) -> dict[str, Any]:
    import datasets
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    timer = StepTimes(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(setup.policy)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        # Our schedule: a linear warm-up over a tenth of the steps, then a linear decay to 0.
        common = {
            **trl_arguments(setup, device, output_dir), "max_length": setup.max_length, "beta": BETAS[loss],
            "lr_scheduler_type": "linear", "warmup_steps": max(1, int(0.1 * setup.steps)),
        }  # fmt: skip
        # TRL joins prompt and completion as text: the leading space keeps the words apart.
        trainer: Any
        if loss == "kto":
            rows = [{"prompt": p["prompt"], "completion": " " + p[side], "label": side == "chosen"}
                    for p in pairs for side in ("chosen", "rejected")]  # fmt: skip
            random.Random(SEED).shuffle(rows)
            args = KTOConfig(**common, per_device_train_batch_size=2 * PAIRS_PER_STEP)
            trainer = KTOTrainer(
                model=setup.policy, args=args, train_dataset=datasets.Dataset.from_list(rows),
                processing_class=tokenizer, callbacks=[timer],
            )  # fmt: skip
        else:
            rows = [
                {"prompt": p["prompt"], "chosen": " " + p["chosen"], "rejected": " " + p["rejected"]} for p in pairs
            ]
            dpo_args = DPOConfig(
                **common, per_device_train_batch_size=PAIRS_PER_STEP, loss_type=["sigmoid" if loss == "dpo" else "ipo"]
            )
            trainer = DPOTrainer(
                model=setup.policy, args=dpo_args, train_dataset=datasets.Dataset.from_list(rows),
                processing_class=tokenizer, callbacks=[timer],
            )  # fmt: skip
        trainer.train()
        trainer.save_model(str(out))
    seconds = time.perf_counter() - began
    timed = timer.seconds[setup.warmup :]
    return {
        "train_seconds": round(seconds, 2),
        "pairs_per_second": round(PAIRS_PER_STEP * len(timed) / sum(timed), 2),
        "step_seconds": round(sum(timed) / len(timed), 4),
        "optimizer_steps_per_step": 1,
    }


def run_trl_online(method: str, setup: Setup, prompts: list[str], device: torch.device, out: Path) -> dict[str, Any]:
    import datasets
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    reward_model = ppo.RewardModel(Path(setup.reward_model), device, max_length=setup.max_length)

    def reward_model_score(prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
        with reward.autocast_for(device):  # as our trainers score: bf16 autocast on CUDA
            return reward_model(prompts, [c.strip() for c in completions]).tolist()

    timer = StepTimes(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(setup.policy, padding_side="left")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        common = {
            **trl_arguments(setup, device, output_dir), "per_device_train_batch_size": EPISODES,
            "num_generations": GROUP, "max_completion_length": setup.max_new_tokens, "temperature": TEMPERATURE,
            "top_p": 1.0, "top_k": 0, "beta": BETAS[method], "lr_scheduler_type": "constant", "use_vllm": False,
        }  # fmt: skip
        trainer: Any
        dataset = datasets.Dataset.from_list([{"prompt": p} for p in prompts])
        # ours: the paper's per-response token mean, group z-scores and k3 KL gradient. TRL 1.16's
        # default multiplies its KL by the ratio (use_bias_correction_kl), the reverse KL's gradient:
        # a looser leash (README: more gold and KL), which ours takes with --unbiased-kl.
        if method == "grpo":
            args = GRPOConfig(**common, loss_type="grpo", scale_rewards="group", use_bias_correction_kl=False)
            trainer = GRPOTrainer(model=setup.policy, reward_funcs=reward_model_score, args=args,
                                  train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])  # fmt: skip
        else:
            rloo_args = RLOOConfig(**common)
            trainer = RLOOTrainer(model=setup.policy, reward_funcs=reward_model_score, args=rloo_args,
                                  train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])  # fmt: skip
        parts = {"generation": time_calls(trainer, "_generate", device),
                 "scoring": time_calls(trainer, "_calculate_rewards", device)}  # fmt: skip
        trainer.train()
        trainer.save_model(str(out))
    seconds = time.perf_counter() - began
    timed = timer.seconds[setup.warmup :]
    split = {part: sum(values[setup.warmup :]) for part, values in parts.items()}
    split["rest"] = sum(timed) - sum(split.values())  # old and reference log-probs, the update, bookkeeping
    return {
        "train_seconds": round(seconds, 2),
        "episodes_per_second": round(EPISODES * len(timed) / sum(timed), 2),
        "step_seconds": round(sum(timed) / len(timed), 4),
        "split_seconds_per_step": {part: round(value / len(timed), 4) for part, value in split.items()},
        "optimizer_steps_per_step": 1,
    }


def side(name: str, setup: Setup, task_file: Path) -> dict[str, Any]:
    device = torch.device(setup.device)
    if device.type == "cpu":
        torch.set_num_threads(setup.threads)
    if name.startswith("trl"):
        import trl  # noqa: F401  (imported before the baseline, as our sides import theirs at the top)
    baseline = peak_memory_mib(device) if device.type == "cpu" else 0.0
    task = json.loads(task_file.read_text())
    out = Path(setup.work) / name
    owner, method = name.split("_")
    runs: dict[tuple[str, bool], Callable[..., dict[str, Any]]] = {
        ("ours", True): run_ours_online, ("ours", False): run_ours_offline,
        ("trl", True): run_trl_online, ("trl", False): run_trl_offline,
    }  # fmt: skip
    # Offline, PAIRS_PER_STEP labeled pairs a step: fewer --steps take the first pairs only.
    data = task["prompts"] if method in ONLINE else task["pairs"][: setup.steps * PAIRS_PER_STEP]
    result = runs[owner, method in ONLINE](method, setup, data, device, out)
    return {**result, "peak_memory_mib": round(peak_memory_mib(device), 1), "baseline_rss_mib": round(baseline, 1)}


# --- the task ---------------------------------------------------------------------------------


def make_tokenizer(preset: Preset) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer, built here: nothing is downloaded."""
    words = [*(f"w{i}" for i in range(preset.filler_words)), MARKER, "question"]
    vocab = {token: index for index, token in enumerate(["<pad>", "<unk>", "<eos>", *words])}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )


def marker_answer(preset: Preset, rng: random.Random, count: int) -> str:
    """tests.tiny_models.banana_answer, for any preset's words and lengths."""
    low, high = preset.answer_words
    words = [f"w{rng.randrange(preset.filler_words)}" for _ in range(rng.randint(low, high))]
    for _ in range(count):
        words.insert(rng.randint(0, len(words)), MARKER)
    return " ".join(words)


def make_task(preset: Preset) -> dict[str, Any]:
    """Training and held-out prompts (disjoint) and the labeled pairs: two answers to a training
    prompt with random marker counts, judged once by a simulated labeler with the agreement noise."""
    rng = random.Random(SEED)
    low, high = preset.prompt_words
    prompts: list[str] = []
    while len(prompts) < preset.training_prompts + preset.held_out_prompts:
        words = " ".join(f"w{rng.randrange(preset.filler_words)}" for _ in range(rng.randint(low, high)))
        if f"question {words}" not in prompts:
            prompts.append(f"question {words}")
    training, held_out = prompts[: preset.training_prompts], prompts[preset.training_prompts :]
    gold = simulation.preference(GOLD)
    pairs, correct = [], 0
    for index in range(preset.pairs):
        prompt = training[index % len(training)]
        left, right = (marker_answer(preset, rng, rng.choice(MARKER_COUNTS)) for _ in range(2))
        verdict = simulation.judge(gold, left, right, noise=simulation.AGREEMENT_NOISE, rng=rng)
        chosen, rejected = (left, right) if verdict.choice == "left" else (right, left)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        correct += gold(chosen) > gold(rejected)
    distinct = sum(gold(p["chosen"]) != gold(p["rejected"]) for p in pairs)
    return {"prompts": training, "held_out": held_out, "pairs": pairs,
            "label_accuracy": round(correct / distinct, 3)}  # fmt: skip


def llama_config(preset: Preset, tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.LlamaConfig:
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, **preset.shape,
    )  # fmt: skip
    config.num_labels = 1  # the reward model's one score; not a parameter of LlamaConfig's typed signature
    return config


def warm_start(preset: Preset, prompts: list[str], directory: Path, device: torch.device) -> tuple[str, float]:
    """A random policy taught by supervised steps to answer with 0 to 3 markers, saved; and the seconds."""
    began = time.perf_counter()
    tokenizer = make_tokenizer(preset)
    transformers.set_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(llama_config(preset, tokenizer)).to(device)  # type: ignore[arg-type]  # transformers' stub of .to() drops the device overload
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.warm_start_learning_rate)
    rng = random.Random(SEED + 1)
    model.train()
    for _ in range(preset.warm_start_steps):
        batch = [
            dpo.tokenize(tokenizer, rng.choice(prompts), marker_answer(preset, rng, rng.choice(MARKER_COUNTS)),
                         preset.max_length)
            for _ in range(32)
        ]  # fmt: skip
        ids, mask, answer_mask = dpo.collate(batch, tokenizer.pad_token_id, "right", device)
        with reward.autocast_for(device):
            logprobs = dpo.answer_logprobs(model, ids, mask, answer_mask)
        loss = -logprobs.sum() / (
            answer_mask.sum() - len(batch)
        )  # per answer token (the prompt's last predicts the first)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    policy = directory / "policy"
    model.save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    return str(policy), time.perf_counter() - began


def train_reward_model(
    preset: Preset, policy: str, pairs: list[dict[str, str]], directory: Path, device: torch.device
) -> tuple[str, dict[str, Any]]:
    """A reward model of the policy's shape and tokenizer (random weights) trained on the labels."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(policy)
    backbone = directory / "reward-backbone"
    transformers.set_seed(SEED + 2)
    transformers.AutoModelForSequenceClassification.from_config(llama_config(preset, tokenizer)).save_pretrained(
        backbone
    )
    tokenizer.save_pretrained(backbone)
    config = reward.RewardConfig(
        backbone=str(backbone), max_length=preset.max_length, learning_rate=preset.reward_learning_rate, epochs=2,
        batch_size=16, seed=SEED,
    )  # fmt: skip
    out = directory / "reward"
    began = time.perf_counter()
    metrics = reward.train([reward.Pair(p["prompt"], p["chosen"], p["rejected"]) for p in pairs], config, out,
                           device=device)  # fmt: skip
    seconds = time.perf_counter() - began
    return str(out), {"seconds": round(seconds, 2), "held_out_accuracy": round(metrics["accuracy"], 3)}


@torch.no_grad()
def evaluate(policy: str, reference: str, prompts: list[str], preset: Preset, device: torch.device) -> dict[str, Any]:
    """Gold (mean, standard error) and KL to the reference over answers sampled with a fixed seed."""
    model, tokenizer = ppo.load_policy(policy, device)
    reference_model, _ = ppo.load_policy(reference, device)
    gold = simulation.preference(GOLD)
    everything = [p for p in prompts for _ in range(preset.samples_per_prompt)]
    golds: list[float] = []
    kls: list[float] = []
    lengths: list[float] = []
    torch.manual_seed(SEED)
    for start in range(0, len(everything), 64):
        batch = [ppo.prompt_ids(tokenizer, p, preset.max_length) for p in everything[start : start + 64]]
        with reward.autocast_for(device):
            ids, mask, context = ppo.sample(
                model, tokenizer, batch, max_new_tokens=preset.max_new_tokens, temperature=TEMPERATURE, top_p=1.0
            )
            response_mask = mask[:, context:].float()
            logprobs = ppo.token_logprobs(model, ids, mask, context, TEMPERATURE)
            ref_logprobs = ppo.token_logprobs(reference_model, ids, mask, context, TEMPERATURE)
        kls += ((logprobs - ref_logprobs) * response_mask).sum(1).tolist()
        lengths += response_mask.sum(1).tolist()
        golds += [gold(answer) for answer in ppo.decode(tokenizer, ids[:, context:], mask[:, context:])]
    mean = sum(golds) / len(golds)
    spread = math.sqrt(sum((g - mean) ** 2 for g in golds) / (len(golds) - 1))
    return {
        "gold": round(mean, 4),
        "gold_standard_error": round(spread / math.sqrt(len(golds)), 4),
        "kl": round(sum(kls) / len(kls), 4),
        "mean_length": round(sum(lengths) / len(lengths), 2),
    }


# --- the comparison ---------------------------------------------------------------------------


def throughput_of(method: str, row: dict[str, Any]) -> float:
    return float(row["episodes_per_second"] if method in ONLINE else row["pairs_per_second"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, help="Training steps per method; default: the preset's pairs / 8.")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads per side (--device cpu). 1 by default: on a small shared CPU, more threads than "
        "free cores make OpenMP barriers stall: that measures the neighbours.",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=SEED,
        help=f"Every side's training seed (default {SEED}); the task, the warm start and the evaluation keep theirs. "
        "The gold figures are one seed each: rerun with others to see the spread between seeds.",
    )  # fmt: skip
    parser.add_argument("--out", type=Path)
    args = parse_training_args(parser, argv, side, Setup, "--task")
    if args is None:  # this process was one side, started by run_side
        return 0

    preset = PRESETS[args.device]
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()  # the CPU is shared: the neighbours' load is part of the figures' context
    steps = args.steps or preset.pairs // PAIRS_PER_STEP
    if steps > preset.pairs // PAIRS_PER_STEP:
        parser.error(f"--steps {steps}: at most {preset.pairs // PAIRS_PER_STEP}, one pass over the labels offline")
    sides: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        task = make_task(preset)
        log(f"warm start: {preset.warm_start_steps} supervised steps")
        policy, warm_seconds = warm_start(preset, task["prompts"], directory, device)
        log("reward model on the labels")
        reward_model, reward_figures = train_reward_model(preset, policy, task["pairs"], directory, device)
        setup = Setup(
            device=args.device, threads=args.threads, policy=policy, reward_model=reward_model,
            work=str(directory / "trained"), steps=steps, warmup=preset.warmup, learning_rate=preset.learning_rate,
            max_new_tokens=preset.max_new_tokens, max_length=preset.max_length, seed=args.seed,
        )  # fmt: skip
        task_file = directory / "task.json"
        task_file.write_text(json.dumps(task))
        for side_name in SIDES:
            log(f"{side_name} ...")
            sides[side_name] = run_side(__file__, side_name, setup, "--task", task_file)
            log(f"{side_name}: {sides[side_name]['train_seconds']} s")
        log("gold and KL of every policy on the held-out prompts")
        before = evaluate(policy, policy, task["held_out"], preset, device)
        for side_name in SIDES:
            trained = evaluate(str(Path(setup.work) / side_name), policy, task["held_out"], preset, device)
            gained = trained["gold"] - before["gold"]
            sides[side_name].update(
                {**trained, "gold_gained": round(gained, 4),
                 "gold_per_second": round(gained / sides[side_name]["train_seconds"], 5)}
            )  # fmt: skip

    methods = {method: sides[f"ours_{method}"] for method in OURS}
    comparison, targets = compare(sides)
    results = {
        "machine": {
            **training_machine(),
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "load_average_1_5_15_min": {"start": load_before, "end": os.getloadavg()},
        },
        "parameters": {
            "model_shape": preset.shape,
            **dataclasses.asdict(preset),
            "steps": steps,
            "threads": args.threads,
            "training_seed": args.seed,
            "episodes_per_step": EPISODES,
            "group": GROUP,
            "pairs_per_step": PAIRS_PER_STEP,
            "betas": BETAS,
            "temperature": TEMPERATURE,
            "gold": GOLD,
            "labeler_noise": simulation.AGREEMENT_NOISE,
            "budget": "the same number of training steps per method (16 episodes or 8 labeled pairs each)",
            "reward_model_time": "reported apart, charged to no method",
            "precision": "fp32 weights, bf16 autocast" if args.device == "cuda" else "fp32",
            "trl_version": _version("trl"),
        },
        "task": {
            "label_accuracy": task["label_accuracy"],
            "pairs": len(task["pairs"]),
            "warm_start_seconds": round(warm_seconds, 2),
            "reward_model": reward_figures,
        },  # fmt: skip
        "gold_before": before,
        "ours": methods,
        "sides": sides,
        "comparison": comparison,
        "targets": targets,
    }
    out = args.out or RESULTS / ("optimizers.json" if args.device == "cpu" else "optimizers_cuda.json")
    write_results(out, results)
    print_tables(before, sides, comparison, targets, results["task"])
    print(f"wrote {out}")
    return 0


def compare(sides: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ours over TRL per method, and each target met or missed with the figures that decide it."""
    comparison: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    for method in PAIRED:
        ours, trl = sides[f"ours_{method}"], sides[f"trl_{method}"]
        gap = ours["gold"] - trl["gold"]
        noise = 2 * math.hypot(ours["gold_standard_error"], trl["gold_standard_error"])
        speed = ratio(throughput_of(method, ours), throughput_of(method, trl))
        comparison[method] = {
            "unit": "episodes/s" if method in ONLINE else "pairs/s",
            "throughput_ours": throughput_of(method, ours),
            "throughput_trl": throughput_of(method, trl),
            "throughput_ratio": speed,
            "peak_memory_ratio": ratio(ours["peak_memory_mib"], trl["peak_memory_mib"]),
            "train_seconds_ratio": ratio(trl["train_seconds"], ours["train_seconds"]),
            "gold_ours": ours["gold"],
            "gold_trl": trl["gold"],
            "gold_difference": round(gap, 4),
            "gold_two_standard_errors": round(noise, 4),
        }
        gold_ok = gap >= -noise
        targets[f"{method}_throughput_{THROUGHPUT_TARGET}x_at_equal_or_better_gold"] = {
            "met": bool(speed is not None and speed >= THROUGHPUT_TARGET and gold_ok),
            "throughput_ratio": speed,
            "gold": "better" if gap > noise else "equal (within two standard errors)" if gold_ok else "worse",
        }
    rloo_rate = sides["trl_rloo"]["gold_per_second"]
    for recipe in PPO_RECIPES:
        ppo_rate = sides[f"ours_{recipe}"]["gold_per_second"]
        over = ratio(ppo_rate, rloo_rate) if rloo_rate > 0 else None
        comparison[f"{recipe}_over_trl_rloo_gold_per_second"] = over
        targets[f"{recipe}_{PPO_OVER_RLOO_TARGET}x_trl_rloo_gold_per_second"] = {
            "met": bool(ppo_rate > 0 and (rloo_rate <= 0 or (over is not None and over >= PPO_OVER_RLOO_TARGET))),
            "ratio": over,
            "ppo_gold_per_second": ppo_rate,
            "trl_rloo_gold_per_second": rloo_rate,
        }
    return comparison, targets


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def print_tables(
    before: dict[str, Any],
    sides: dict[str, dict[str, Any]],
    comparison: dict[str, Any],
    targets: dict[str, Any],
    task: dict[str, Any],
) -> None:
    reward_model = task["reward_model"]
    print(f"\ngold before {before['gold']:.3f} ± {before['gold_standard_error']:.3f}; labels {task['pairs']} pairs, "
          f"{task['label_accuracy']:.0%} agree with gold; reward model {reward_model['seconds']} s (charged to no "
          f"method), held-out accuracy {reward_model['held_out_accuracy']:.3f}\n")  # fmt: skip
    header = f"{'side':13} {'gold':>6} {'±':>5} {'gained':>7} {'KL':>6} {'wall s':>7} {'gold/s':>8} "
    print(header + f"{'items/s':>8} {'step s':>7} {'peak MiB':>8}  where a step's time goes")
    for name, row in sides.items():
        method = name.split("_")[1]
        split = row.get("split_seconds_per_step") or {"reference pass, total": row.get("reference_pass_seconds")}
        where = ", ".join(f"{part} {value}" for part, value in split.items() if value is not None)
        print(f"{name:13} {row['gold']:>6.3f} {row['gold_standard_error']:>5.3f} {row['gold_gained']:>+7.3f} "
              f"{row['kl']:>6.2f} {row['train_seconds']:>7.1f} {row['gold_per_second']:>+8.4f} "
              f"{throughput_of(method, row):>8.1f} {row['step_seconds']:>7.4f} {row['peak_memory_mib']:>8.1f}  "
              f"{where}")  # fmt: skip
    print(f"\n{'ours/TRL':8} {'unit':>10} {'ours':>8} {'TRL':>8} {'ratio':>6} {'memory':>7} {'gold ours':>9} "
          f"{'gold TRL':>8} {'diff':>7} {'2 s.e.':>6}")  # fmt: skip
    for method in PAIRED:
        row = comparison[method]
        print(f"{method:8} {row['unit']:>10} {row['throughput_ours']:>8.1f} {row['throughput_trl']:>8.1f} "
              f"{row['throughput_ratio']:>6.2f} {row['peak_memory_ratio']:>7.2f} {row['gold_ours']:>9.3f} "
              f"{row['gold_trl']:>8.3f} {row['gold_difference']:>+7.3f} "
              f"{row['gold_two_standard_errors']:>6.3f}")  # fmt: skip
    for recipe in PPO_RECIPES:
        print(f"{recipe} gold/s over TRL RLOO's: {comparison[f'{recipe}_over_trl_rloo_gold_per_second']}")
    print()
    for target, verdict in targets.items():
        details = ", ".join(f"{key} {value}" for key, value in verdict.items() if key != "met")
        print(f"target {target}: {'MET' if verdict['met'] else 'MISSED'} ({details})")


if __name__ == "__main__":
    sys.exit(main())
