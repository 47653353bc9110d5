"""The four command lines under torchrun, 2 processes on the CPU (gloo), against one process with
the same global batch and seed: the reward model's losses and held-out accuracy (DDP and FSDP),
DPO's and KTO's loss trajectories (uneven shares and an empty one included), a checkpoint written
by one process resumed by two sharding the policy with FSDP, and GRPO's (DDP) and PPO's (FSDP:
policy, critic and reference sharded, generation kept in step) gold score and KL."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.tiny_models import marker_pairs
from tests.training.test_dpo import marker_rows, metric_rows, write_rows
from tests.training.test_ppo import PROMPTS, gold
from training import dpo, ppo

ROOT = Path(__file__).resolve().parents[2]


def launch(module: str, *args: str, processes: int) -> dict:
    """`python -m module args` (under torchrun with `processes` > 1), one thread a process: its
    summary, the only line it printed (the other ranks print nothing)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else []
    command = [sys.executable, *launcher, "-m", module, *args]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    return json.loads(lines[0])


def test_a_reward_model_trained_by_two_processes_equals_one_processes(tiny_backbone, tmp_path):
    """Batches of 7 pairs split 4 + 3 (and the last, 2 pairs, 1 + 1): the weighted shares make the
    gradient the whole batch's, so the losses agree to float rounding (seen: 1e-6 relative)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in marker_pairs(300)))
    flags = ["--data", str(data), "--backbone", tiny_backbone, "--epochs", "2", "--batch-size", "7",
             "--learning-rate", "1e-3", "--max-length", "32"]  # fmt: skip
    one = launch("training.reward", *flags, "--out", str(tmp_path / "one"), processes=1)
    two = launch("training.reward", *flags, "--out", str(tmp_path / "two"), processes=2)
    sharded = launch("training.reward", *flags, "--fsdp", "--out", str(tmp_path / "sharded"), processes=2)
    for run in (two, sharded):
        assert abs(one["accuracy"] - run["accuracy"]) <= 0.02 and run["accuracy"] > 0.9
    losses = {n: json.loads((tmp_path / n / "member_0" / "losses.json").read_text()) for n in ("one", "two", "sharded")}
    assert len(losses["one"]) == len(losses["two"]) == len(losses["sharded"]) > 30
    for run in ("two", "sharded"):
        assert max(abs(a - b) / abs(a) for a, b in zip(losses["one"], losses[run], strict=True)) < 0.02
    assert losses["two"][-1] < losses["two"][0] / 2
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "one" / "config.json").read_text())["world_size"] == 1


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_dpo_and_kto_trained_by_two_processes_follow_one_processes_losses(tiny_policy, tmp_path, loss):
    """50 pairs in batches of 7: shares 4 + 3, and a last batch of one pair that leaves rank 1 with
    nothing (it runs one example at weight 0). KTO's reference point is the mean over both ranks'
    mismatched examples. Seen: losses equal to 4e-7 relative."""
    data = write_rows(tmp_path / "prefs.jsonl", marker_rows(50, seed=7))
    flags = ["--policy", tiny_policy, "--data", str(data), "--loss", loss, "--epochs", "2", "--batch-size", "7",
             "--learning-rate", "1e-3", "--max-length", "64"]  # fmt: skip
    launch("training.dpo", *flags, "--out", str(tmp_path / "one"), processes=1)
    launch("training.dpo", *flags, "--out", str(tmp_path / "two"), processes=2)
    one, two = metric_rows(tmp_path / "one"), metric_rows(tmp_path / "two")
    assert len(one) == len(two) == (16 if loss == "dpo" else 30)
    key = f"loss/{loss}"
    assert max(abs(a[key] - b[key]) / abs(a[key]) for a, b in zip(one, two, strict=True)) < 1e-3

    # Step 1's policy is the reference: DPO's implicit rewards are rounding noise (1e-8) whose sign
    # decides its accuracy, so accuracy is compared where the margin is more than noise.
    def noise(row: dict) -> bool:
        return row["rewards/margin"] is not None and abs(row["rewards/margin"]) < 1e-4

    learned = [(a, b) for a, b in zip(one, two, strict=True) if not noise(a) and not noise(b)]
    assert len(learned) >= len(one) - 2 and (loss == "kto" or noise(one[0]))
    assert max(abs(a["rewards/accuracy"] - b["rewards/accuracy"]) for a, b in learned) < 1e-3
    assert two[-1][key] < two[0][key]
    assert json.loads((tmp_path / "two" / "dpo_config.json").read_text())["world_size"] == 2


def test_a_checkpoint_written_by_one_process_resumes_with_two_sharding_the_policy(tiny_policy, tmp_path):
    """DPO's batches are planned for the global batch, and its checkpoints hold whole weights and
    optimizer state (gathered from the shards under FSDP): a run stopped after 10 steps by one
    process and finished by two with --fsdp takes the steps an uninterrupted run takes, to float
    rounding, and saves the same policy."""
    data = write_rows(tmp_path / "prefs.jsonl", marker_rows(48, seed=8))
    config = dpo.DPOConfig(policy=tiny_policy, epochs=2, batch_size=4, learning_rate=1e-3, max_length=64,
                           checkpoint_every=5)  # fmt: skip
    dpo.train(config, dpo.load_preferences(data), tmp_path / "whole")
    assert dpo.train(config, dpo.load_preferences(data), tmp_path / "resumed", stop_after=10) == {"stopped_at": 10}
    flags = ["--policy", tiny_policy, "--data", str(data), "--epochs", "2", "--batch-size", "4",
             "--learning-rate", "1e-3", "--max-length", "64", "--checkpoint-every", "5"]  # fmt: skip
    launch("training.dpo", *flags, "--fsdp", "--out", str(tmp_path / "resumed"), processes=2)
    whole, resumed = metric_rows(tmp_path / "whole"), metric_rows(tmp_path / "resumed")
    assert [row["step"] for row in resumed] == list(range(1, 25))
    assert max(abs(a["loss/dpo"] - b["loss/dpo"]) for a, b in zip(whole, resumed, strict=True)) < 1e-5
    weights = [load_file(tmp_path / run / "model.safetensors") for run in ("whole", "resumed")]
    assert weights[0].keys() == weights[1].keys()
    assert max(float((weights[0][name] - weights[1][name]).abs().max()) for name in weights[0]) < 1e-5


HELD_OUT = [f"question w{i} w{i + 1}" for i in range(20)] * 3


def mean_gold(policy: str) -> float:
    answers = ppo.generate(policy, HELD_OUT, max_new_tokens=12, temperature=1.0, seed=1)
    return sum(map(gold, answers)) / len(answers)


ONLINE = {
    "grpo": ["--steps", "15", "--batch-size", "4", "--group-size", "4", "--learning-rate", "5e-3"],
    "ppo": ["--steps", "30", "--batch-size", "8", "--minibatches", "2", "--learning-rate", "1e-3"],
}
SHARDED = {"grpo": [], "ppo": ["--fsdp"]}  # the two processes' runs: DDP for GRPO, FSDP for PPO
# Runs of each kind pooled: one GRPO run is steady, one PPO run is not (alone, a PPO run's gold
# gain spans 0.04 to 0.91 and its KL 0.24 to 10 over the reward models of seed offsets 0-4).
SEEDS = {"grpo": 1, "ppo": 3}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.statistical
@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_online_runs_on_two_processes_reach_one_processes_gold_and_kl(
    tiny_policy, banana_reward_model, tmp_path, seed_offset, figures, algorithm
):
    """Each rank samples its share of the prompts (GRPO: whole groups) from its own generator, so
    the answers differ from one process's and only the outcome can match: the gold score of the
    trained policies and the KL they took, over a few seeds. PPO whitens its advantages over both
    ranks' tokens."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in PROMPTS))
    flags = ["--policy", tiny_policy, "--reward-model", banana_reward_model, "--prompts", str(prompts),
             "--max-new-tokens", "12", "--beta", "0.3", *ONLINE[algorithm]]  # fmt: skip
    before = mean_gold(tiny_policy)
    gold, kl = {"one": [], "two": []}, {"one": [], "two": []}
    for seed in range(100 * seed_offset, 100 * seed_offset + SEEDS[algorithm]):
        for run, processes, extra in (("one", 1, []), ("two", 2, SHARDED[algorithm])):
            out = tmp_path / f"{run}-{seed}"
            kl[run].append(launch(f"training.{algorithm}", *flags, *extra, "--seed", str(seed), "--out", str(out),
                                  processes=processes)["kl"])  # fmt: skip
            gold[run].append(mean_gold(str(out)))
    gain = figures(f"distributed.{algorithm}.gold_gain_two_processes", mean(gold["two"]) - before)
    gap = figures(f"distributed.{algorithm}.gold_gap", mean(gold["two"]) - mean(gold["one"]))
    kl_ratio = figures(f"distributed.{algorithm}.kl_ratio", mean(kl["two"]) / mean(kl["one"]))
    # Seen (gold 0.40 before): GRPO on seeds 0-3 gains 0.63 to 0.74 with two processes, gaps -0.05
    # to 0.00, KL ratios 0.63 to 1.30; PPO on the reward models of seed offsets 0-4, pooled over
    # seeds 0-2, gains 0.20 to 0.76, gaps -0.17 to +0.29, KL ratios 0.61 to 1.68. The gap is
    # bounded below only: what could go wrong in the distributed update (a rank's gradient lost or
    # weighted wrong) slows learning, and the KL ratio bounds the rest. The run itself fails if
    # the ranks' weights drifted apart (World.check_in_step).
    assert gain > 0.1
    assert gap > -0.4
    assert 0.33 < kl_ratio < 3.0
    config = json.loads((tmp_path / f"two-{100 * seed_offset}" / f"{algorithm}_config.json").read_text())
    assert config["world_size"] == 2


def test_the_lean_ppo_recipe_keeps_two_processes_in_step(tiny_policy, banana_reward_model, tmp_path):
    """--shared-critic with one update a rollout under DDP: the value head sits inside the wrapped
    module, so its gradient is averaged with the policy's, and the run's end checks that both
    ranks hold the same weights, the head's included (World.check_in_step raises otherwise)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in PROMPTS))
    summary = launch(
        "training.ppo", "--policy", tiny_policy, "--reward-model", banana_reward_model, "--prompts", str(prompts),
        "--max-new-tokens", "8", "--steps", "3", "--batch-size", "8", "--learning-rate", "1e-3", "--shared-critic",
        "--ppo-epochs", "1", "--minibatches", "1", "--out", str(tmp_path / "lean"), processes=2,
    )  # fmt: skip
    assert summary["steps"] == 3
    config = json.loads((tmp_path / "lean" / "ppo_config.json").read_text())
    assert config["world_size"] == 2 and config["shared_critic"]
