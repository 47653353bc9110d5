"""Offline preference optimization: DPO, IPO and KTO against TRL's own loss code, log-probs of the
answer only under either padding, the reference scored once (with LoRA: the adapter-off policy),
resume, bad data, a tiny policy learning a marker, and the command line."""

import json
import math
import random
import subprocess
import sys
import types
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from training import dpo, ppo, reward
from training.dpo import DPOConfig, Example, answer_logprobs, collate, load_preferences, tokenize

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
TINY = {"max_length": 64, "batch_size": 4}


def marker_rows(count: int, seed: int, marker: str = "banana") -> list[dict]:
    """Export rows whose chosen answer always holds the marker word, in the tiny policy's words."""
    rng = random.Random(seed)
    filler = lambda: [f"w{rng.randrange(20)}" for _ in range(rng.randint(2, 6))]  # noqa: E731
    rows = []
    for index in range(count):
        good = filler()
        good.insert(rng.randint(0, len(good)), marker)
        rows.append({"prompt": f"question w{index % 20}", "chosen": " ".join(good), "rejected": " ".join(filler())})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def preferences(tmp_path: Path, rows: list[dict]) -> dpo.Preferences:
    return load_preferences(write_rows(tmp_path / "prefs.jsonl", rows))


def metric_rows(out: Path) -> list[dict]:
    """Metrics without the wall-clock figures."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("speed/")} for row in rows]


# ---------------------------------------------------------------------------------------------
# Data


def test_pairs_unpaired_rows_and_both_bad_votes_are_read_and_ties_left_out(tmp_path):
    conversation = [{"role": "user", "content": "question w1"}]
    rows = [
        {"prompt": "question w0", "chosen": "w1", "rejected": "w2", "label": "a"},
        {"prompt": conversation, "chosen": [{"role": "assistant", "content": "w3"}],
         "rejected": [{"role": "assistant", "content": "w4"}], "label": "b"},
        {"prompt": "question w5", "chosen": "w6", "rejected": "w7", "label": "tie"},
        {"prompt": "question w8", "chosen": "w9", "rejected": "w10", "label": "both_bad"},
        {"prompt": "question w11", "completion": "w12", "label": True},
        {"prompt": conversation, "completion": [{"role": "assistant", "content": "w13"}], "label": False},
    ]  # fmt: skip
    loaded = preferences(tmp_path, rows)
    assert [(p.prompt, p.chosen, p.rejected) for p in loaded.pairs] == [
        ("question w0", "w1", "w2"),
        (conversation, "w3", "w4"),
    ]
    assert loaded.examples() == [
        Example("question w0", "w1", True), Example("question w0", "w2", False),
        Example(conversation, "w3", True), Example(conversation, "w4", False),
        Example("question w8", "w9", False), Example("question w8", "w10", False),  # both bad: both undesirable
        Example("question w11", "w12", True), Example(conversation, "w13", False),
    ]  # fmt: skip
    # Parquet holds the same rows (Arrow wants one type per column: the conversational ones here).
    pq.write_table(pa.Table.from_pylist([rows[1]]), tmp_path / "prefs.parquet")
    assert load_preferences(tmp_path / "prefs.parquet").pairs == loaded.pairs[1:]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"prompt": "q", "chosen": "a"', "row 2: not JSON"),
        ({"prompt": "q", "chosen": "a"}, "row 2: missing rejected"),
        ({"prompt": 7, "chosen": "a", "rejected": "b"}, "row 2: 'prompt' must be text or a list"),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "row 2: 'prompt' must be text or a list"),
        ({"prompt": "q", "chosen": {"content": "a"}, "rejected": "b"}, "row 2: 'chosen' must be text or a list"),
        ({"prompt": "q", "completion": "a", "label": "good"}, "row 2: 'label' must be true or false"),
        ({"prompt": "q", "completion": None, "label": True}, "row 2: 'completion' must be text or a list"),
    ],
)
def test_a_bad_data_file_is_named_with_its_row_and_field(tmp_path, bad, message):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(marker_rows(1, seed=0)[0]) + "\n" + (bad if isinstance(bad, str) else json.dumps(bad)))
    with pytest.raises(ValueError, match=f"broken.jsonl {message}"):
        load_preferences(path)


def test_unpaired_rows_alone_train_only_kto(tmp_path):
    loaded = preferences(tmp_path, [{"prompt": "question w1", "completion": "w2", "label": True}] * 4)
    with pytest.raises(ValueError, match="no preference pairs.*4 unpaired.*--loss kto"):
        dpo.train(DPOConfig(policy="unused", **TINY), loaded, tmp_path / "out")
    with pytest.raises(ValueError, match="batch_size 1: KTO needs 2"):
        dpo.train(DPOConfig(policy="unused", loss="kto", max_length=64, batch_size=1), loaded, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Tokens and log-probabilities


def test_answer_log_probs_sum_the_answer_tokens_only_under_left_and_right_padding(tiny_policy):
    model, tokenizer = ppo.load_policy(tiny_policy, CPU)
    sequences = [
        tokenize(tokenizer, "question w1", "w2 w3", 64),
        tokenize(tokenizer, "question w4 w5 w6 w7 w8 w9", "banana", 64),
        tokenize(tokenizer, [{"role": "user", "content": "question w10"}], "w11 w12 w13 w14 w15", 64),
    ]
    assert sequences[0].ids[sequences[0].prompt_length :] == tokenizer("w2 w3 <eos>")["input_ids"]
    with torch.no_grad():
        # By hand: the log-softmax of the unpadded sequence at each answer token, prompt tokens left out.
        by_hand = []
        for sequence in sequences:
            logits = model(input_ids=torch.tensor([sequence.ids])).logits[0].log_softmax(-1)
            by_hand.append(
                sum(logits[t - 1, sequence.ids[t]] for t in range(sequence.prompt_length, len(sequence.ids)))
            )
        widths: list[int] = []
        model.register_forward_hook(lambda _module, _args, out: widths.append(out.logits.shape[1]))
        for side in ("left", "right"):
            batch = collate(sequences, tokenizer.pad_token_id, side, CPU)
            padded = answer_logprobs(model, *batch)
            torch.testing.assert_close(padded, torch.stack(by_hand), atol=1e-5, rtol=0)
            # No logits for the prompt tokens before the batch's first answer token (logits_to_keep).
            first_answer = int(batch[2].argmax(1).min())
            assert widths.pop() == batch[0].shape[1] - first_answer + 1 < batch[0].shape[1]


def test_long_sequences_lose_the_oldest_prompt_tokens_then_the_end_of_the_answer(tiny_policy):
    _, tokenizer = ppo.load_policy(tiny_policy, CPU)
    cut = tokenize(tokenizer, "question w1 w2 w3 w4", "w5 w6", 5)
    assert tokenizer.decode(cut.ids) == "w3 w4 w5 w6 <eos>" and cut.prompt_length == 2
    cut = tokenize(tokenizer, "question w1", "w5 w6 w7 w8 w9 w10", 5)
    assert tokenizer.decode(cut.ids) == "w1 w5 w6 w7 w8" and cut.prompt_length == 1


# ---------------------------------------------------------------------------------------------
# The losses against TRL's: its trainers' own _compute_loss, on a tiny policy with TRL's fused head


def _trl_self(model: torch.nn.Module, **attributes) -> types.SimpleNamespace:
    """The few attributes TRL's `_compute_loss` reads on one process, without building a Trainer
    (which would tokenize a dataset and start accelerate)."""
    accelerator = types.SimpleNamespace(device=CPU, gather=lambda x: x, gather_for_metrics=lambda x: x)
    return types.SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, precompute_ref_logps=True,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        **attributes,
    )  # fmt: skip


@pytest.fixture
def trl_policy(tiny_policy):
    """The tiny policy with TRL's fused LM head, as its DPO and KTO trainers patch it; a call
    without `fused_lm_head` runs the model's own forward, so our code reads the same weights."""
    from trl.trainer.utils import add_fused_lm_head

    model, tokenizer = ppo.load_policy(tiny_policy, CPU)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model, tokenizer


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_dpo_and_ipo_losses_equal_trls(trl_policy, tmp_path, loss):
    from trl.trainer.dpo_trainer import DPOTrainer

    model, tokenizer = trl_policy
    config = DPOConfig(policy="unused", loss=loss, beta=0.3, max_length=64, batch_size=6)
    work = dpo.plan(config, preferences(tmp_path, marker_rows(6, seed=0)), tokenizer)
    step = work.steps[0]
    ids, mask, answer_mask = collate([work.sequences[i] for i in step.sequences], tokenizer.pad_token_id, "right", CPU)
    with torch.no_grad():
        logprobs = answer_logprobs(model, ids, mask, answer_mask)
    # A reference away from the policy, so that the loss is not log 2 (DPO) or 1/(2 beta)^2 (IPO) for every pair.
    reference = logprobs + 5 * torch.randn(len(logprobs), generator=torch.Generator().manual_seed(0))
    logratio = logprobs - reference
    half = len(logratio) // 2
    if loss == "ipo":
        lengths = answer_mask.sum(1)
        per_pair = dpo.ipo_loss(logratio[:half] / lengths[:half], logratio[half:] / lengths[half:], config.beta)
    else:
        per_pair = dpo.dpo_loss(logratio[:half], logratio[half:], config.beta)
    ours = per_pair.mean()

    trl = _trl_self(
        model, beta=config.beta, loss_types=["sigmoid" if loss == "dpo" else "ipo"], loss_weights=[1.0],
        f_divergence_type="reverse_kl", use_weighting=False, ld_alpha=None,
    )  # fmt: skip
    inputs = {"input_ids": ids, "attention_mask": mask, "completion_mask": answer_mask,
              "ref_chosen_logps": reference[:half], "ref_rejected_logps": reference[half:]}  # fmt: skip
    with torch.no_grad():
        theirs = DPOTrainer._compute_loss(trl, model, inputs, return_outputs=False)
    assert abs(ours.item() - theirs.item()) < 1e-6
    assert per_pair.std() > 0.1  # pairs far from and near their reference: not one value repeated
    # The implicit rewards we log are TRL's too.
    margin = (config.beta * (logratio[:half] - logratio[half:])).mean().item()
    assert trl._metrics["eval"]["rewards/margins"][0] == pytest.approx(margin, abs=1e-6)


def test_kto_loss_equals_trls(trl_policy, tmp_path):
    from trl.trainer.kto_trainer import KTOTrainer

    model, tokenizer = trl_policy
    rows = marker_rows(4, seed=1) + [{"prompt": "question w3", "completion": "w4 w5", "label": True}]
    config = DPOConfig(policy="unused", loss="kto", beta=0.2, desirable_weight=1.3, undesirable_weight=0.7, **TINY)
    work = dpo.plan(config, preferences(tmp_path, rows), tokenizer)
    step = work.steps[0]
    desirable = torch.tensor([work.desirable[i] for i in step.sequences])
    assert desirable.any() and not desirable.all()
    pad = tokenizer.pad_token_id
    ids, mask, answer_mask = collate([work.sequences[i] for i in step.sequences], pad, "right", CPU)
    kl_ids, kl_mask, kl_answer_mask = collate([work.sequences[i] for i in step.mismatched], pad, "right", CPU)
    with torch.no_grad():
        logprobs = answer_logprobs(model, ids, mask, answer_mask)
        kl_logprobs = answer_logprobs(model, kl_ids, kl_mask, kl_answer_mask)
    noise = torch.Generator().manual_seed(0)
    reference = logprobs + torch.randn(len(logprobs), generator=noise)
    kl_reference = kl_logprobs - 0.4 + 0.1 * torch.randn(len(kl_logprobs), generator=noise)  # z0 near 0.4, not floored
    z0 = dpo.kl_reference_point(kl_logprobs - kl_reference)
    ours = dpo.kto_loss(logprobs - reference, desirable, z0, config.beta, 1.3, 0.7).mean()

    trl = _trl_self(model, beta=config.beta, loss_type="kto", calculate_KL=True, desirable_weight=1.3,
                    undesirable_weight=0.7)  # fmt: skip
    trl._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trl)
    inputs = {"input_ids": ids, "attention_mask": mask, "completion_mask": answer_mask, "KL_input_ids": kl_ids,
              "KL_attention_mask": kl_mask, "KL_completion_mask": kl_answer_mask, "label": desirable,
              "ref_logps": reference, "ref_KL_logps": kl_reference}  # fmt: skip
    with torch.no_grad():
        theirs = KTOTrainer._compute_loss(trl, model, inputs, return_outputs=False)
    assert abs(ours.item() - theirs.item()) < 1e-6
    assert trl._metrics["eval"]["kl"][0] == pytest.approx(z0.item(), abs=1e-6) and z0.item() > 0.2


def test_kto_reference_point_is_floored_at_zero_and_passes_no_gradient():
    logratio = torch.tensor([-1.0, -2.0], requires_grad=True)
    assert dpo.kl_reference_point(logratio).item() == 0.0
    z0 = dpo.kl_reference_point(logratio + 3)
    assert z0.item() == pytest.approx(1.5) and not z0.requires_grad


def test_kto_mismatched_pairs_rotate_the_batchs_answers_by_one(tiny_policy, tmp_path):
    _, tokenizer = ppo.load_policy(tiny_policy, CPU)
    work = dpo.plan(DPOConfig(loss="kto", epochs=2, **TINY), preferences(tmp_path, marker_rows(6, seed=2)), tokenizer)
    assert len(work.steps) == 6  # 12 examples, 4 a batch, 2 epochs
    for step in work.steps:
        for k, (example, mismatched) in enumerate(zip(step.sequences, step.mismatched, strict=True)):
            answer = lambda index: work.sequences[index].ids[work.sequences[index].prompt_length :]  # noqa: E731
            prompt = lambda index: work.sequences[index].ids[: work.sequences[index].prompt_length]  # noqa: E731
            assert prompt(mismatched) == prompt(example)
            assert answer(mismatched) == answer(step.sequences[k - 1])


# ---------------------------------------------------------------------------------------------
# Reference, resume


@pytest.mark.parametrize("lora", [False, True])
def test_reference_log_probs_scored_once_equal_a_resident_references(tiny_policy, tmp_path, lora):
    """Scored in one pass before training, batched by length; a resident reference scores each
    batch as training composes it. With LoRA the reference is the policy with its adapters off."""
    config = DPOConfig(policy=tiny_policy, learning_rate=1e-2, lora=lora, lora_rank=4, checkpoint_every=2, **TINY)
    data = preferences(tmp_path, marker_rows(12, seed=3))
    assert dpo.train(config, data, tmp_path / "out", stop_after=2) == {"stopped_at": 2}
    state = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)
    resident, tokenizer = ppo.load_policy(tiny_policy, CPU)
    work = dpo.plan(config, data, tokenizer)
    with torch.no_grad():
        for step in work.steps:
            batch = collate([work.sequences[i] for i in step.sequences], tokenizer.pad_token_id, "left", CPU)
            torch.testing.assert_close(state["reference"][step.sequences], answer_logprobs(resident, *batch))
    first = metric_rows(tmp_path / "out")[0]  # policy == reference at the first step
    assert first["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    if lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(resident, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
        policy.load_state_dict(state["model"])
        everything = collate(work.sequences, tokenizer.pad_token_id, "left", CPU)
        with torch.no_grad():
            adapted = answer_logprobs(policy, *everything)
            with policy.disable_adapter():
                adapter_off = answer_logprobs(policy, *everything)
        torch.testing.assert_close(state["reference"], adapter_off)
        assert (adapted - adapter_off).abs().max() > 1e-3  # two steps moved the adapters: not a vacuous match


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tiny_policy, tmp_path, loss):
    config = DPOConfig(policy=tiny_policy, loss=loss, epochs=2, learning_rate=1e-3, checkpoint_every=2, **TINY)
    data = preferences(tmp_path, marker_rows(10, seed=4))
    dpo.train(config, data, tmp_path / "straight")
    assert dpo.train(config, data, tmp_path / "resumed", stop_after=3) == {"stopped_at": 3}
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()
    dpo.train(config, data, tmp_path / "resumed")
    assert metric_rows(tmp_path / "resumed") == metric_rows(tmp_path / "straight")
    straight = AutoModelForCausalLM.from_pretrained(tmp_path / "straight").state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed").state_dict()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists()
    done = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert dpo.train(config, data, tmp_path / "resumed") == done  # a redelivered run finds the work done


# ---------------------------------------------------------------------------------------------
# Learning, command line


@pytest.mark.statistical
@pytest.mark.parametrize("loss", dpo.LOSSES)
def test_a_tiny_policy_learns_to_prefer_answers_with_the_marker(tiny_policy, tmp_path, seed_offset, figures, loss):
    """On held-out pairs the trained policy's implicit reward ranks the marker answer first, and
    its probability of opening an answer with the marker rose over the reference's."""
    config = DPOConfig(
        policy=tiny_policy, loss=loss, learning_rate=3e-3, epochs=3, batch_size=8, max_length=64, seed=seed_offset
    )
    dpo.train(config, preferences(tmp_path, marker_rows(48, seed=seed_offset)), tmp_path / "out")
    reference, tokenizer = ppo.load_policy(tiny_policy, CPU)
    trained, _ = ppo.load_policy(str(tmp_path / "out"), CPU)
    held_out = [reward.Pair(r["prompt"], r["chosen"], r["rejected"]) for r in marker_rows(64, seed=1000 + seed_offset)]
    chosen = [tokenize(tokenizer, p.prompt, p.chosen, 64) for p in held_out]
    rejected = [tokenize(tokenizer, p.prompt, p.rejected, 64) for p in held_out]
    opening = [tokenize(tokenizer, p.prompt, "banana", 64) for p in held_out]
    pad, side = tokenizer.pad_token_id, tokenizer.padding_side
    with torch.no_grad():
        logratio = {}
        for name, sequences in (("chosen", chosen), ("rejected", rejected), ("opening", opening)):
            batch = collate(sequences, pad, side, CPU)
            logratio[name] = answer_logprobs(trained, *batch) - answer_logprobs(reference, *batch)
    accuracy = figures(f"dpo.{loss}.held_out_accuracy", (logratio["chosen"] > logratio["rejected"]).float().mean())
    rise = figures(f"dpo.{loss}.marker_opening_logratio", logratio["opening"].mean().item())
    # Seen on seed offsets 0-4 with 1 and 2 threads: accuracy 0.84 to 0.98 (chance: 0.5), the
    # marker's log-ratio 1.33 to 2.28 (IPO lowest, KTO highest).
    assert accuracy > 0.7
    assert rise > 0.5


def test_command_line_trains_and_writes_policy_config_and_metrics(tiny_policy, tmp_path, capsys):
    rows = marker_rows(6, seed=5) + [
        {"prompt": [{"role": "user", "content": "question w1"}], "chosen": "w2", "rejected": "w3", "label": "both_bad"},
        {"prompt": "question w4", "completion": "banana w5", "label": True},
    ]
    data = write_rows(tmp_path / "prefs.jsonl", rows)
    args = [sys.executable, "-m", "training.dpo", "--policy", tiny_policy, "--data", str(data), "--out",
            str(tmp_path / "out"), "--loss", "kto", "--beta", "0.2", "--epochs", "1", "--learning-rate", "1e-3",
            "--batch-size", "4", "--max-length", "32", "--lora", "--lora-rank", "4", "--seed", "3"]  # fmt: skip
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["loss_type"] == "kto" and summary["steps"] == 4  # 15 examples, 4 a batch
    out = tmp_path / "out"
    assert json.loads((out / "dpo_config.json").read_text())["beta"] == 0.2
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "tokenizer.json").exists() and not (out / "adapter_config.json").exists()  # adapters merged
    rows = metric_rows(out)
    assert len(rows) == 4
    expected = {"loss/kto", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "objective/kl"}
    assert expected <= set(rows[0])
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert "4/4" in done.stderr  # the progress bar

    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["speed/pairs_per_second"] > 0

    # A bad file: exit status 2 and the message, as training.reward's command line (in-process: another
    # interpreter start costs seconds).
    data.write_text(json.dumps(marker_rows(1, seed=0)[0]) + "\n" + json.dumps({"prompt": "q", "chosen": 3}) + "\n")
    with pytest.raises(SystemExit) as exited:
        dpo.main(args[3:])
    assert exited.value.code == 2 and "prefs.jsonl row 2: missing rejected" in capsys.readouterr().err
