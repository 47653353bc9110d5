"""Reward model core: loss, scoring position, learning, resume, ensembles, command line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from tests.tiny_models import WORDS, make_model, make_tokenizer, marker_pairs
from training.reward import (
    Encoded,
    Pair,
    RewardConfig,
    bradley_terry_loss,
    load_pairs,
    metrics,
    pad,
    scores,
    split_by_prompt,
    train,
    train_member,
)

ROOT = Path(__file__).resolve().parents[2]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_loss_and_margin_match_hand_computed_values():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    expected = (-math.log(1 / (1 + math.exp(-1))) - math.log(1 / (1 + math.exp(1)))) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)
    margin = torch.tensor([0.5, 0.5])
    expected_margin = (-math.log(1 / (1 + math.exp(-0.5))) - math.log(1 / (1 + math.exp(1.5)))) / 2
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(expected_margin, abs=1e-6)
    centered = bradley_terry_loss(chosen, rejected, None, center=0.1).item()
    assert centered == pytest.approx(expected + 0.1 * 1.0, abs=1e-6)  # (1+0)^2 and (0+1)^2 average to 1


@pytest.mark.parametrize("pad_equals_eos", [False, True])
def test_score_is_read_at_the_last_real_token_whatever_the_padding(pad_equals_eos):
    tokenizer = make_tokenizer(pad_equals_eos)
    model = make_model(len(tokenizer), tokenizer.pad_token_id).eval()
    short = tokenizer("question w1 answer <eos>")["input_ids"]
    long = tokenizer("question w2 w3 w4 w5 w6 answer <eos>")["input_ids"]
    with torch.no_grad():
        alone = [
            scores(model, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long)).item()
            for seq in (short, long)
        ]
        for side in ("left", "right"):
            ids, mask = pad([short, long], tokenizer.pad_token_id, side)
            padded = scores(model, ids, mask).tolist()
            assert padded == pytest.approx(alone, abs=1e-5), side


def test_split_is_by_prompt_never_by_pair():
    pairs = [Pair(prompt=f"p{i % 40}", chosen=f"a{i}", rejected=f"b{i}") for i in range(400)]
    train_pairs, held_out = split_by_prompt(pairs, 0.25)
    assert held_out and {p.prompt for p in train_pairs}.isdisjoint({p.prompt for p in held_out})


def test_ties_are_left_out_and_conversational_rows_read(tmp_path):
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b", "label": "a"},
        {"prompt": "q", "chosen": "c", "rejected": "d", "label": "tie"},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "e"}],
         "rejected": [{"role": "assistant", "content": "f"}]},
    ]  # fmt: skip
    pairs = load_pairs(write_rows(tmp_path / "p.jsonl", rows))
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "b"), ("e", "f")]


def tiny_config(**overrides) -> RewardConfig:
    values = {"max_length": 32, "learning_rate": 3e-3, "epochs": 3, "batch_size": 16, "eval_fraction": 0.2,
              "checkpoint_every": 2, "seed": 1}  # fmt: skip
    return RewardConfig(**{**values, **overrides})


@pytest.mark.statistical
def test_tiny_model_learns_a_marker_preference(tiny_backbone, tmp_path, seed_offset, figures):
    pairs = load_pairs(write_rows(tmp_path / "train.jsonl", marker_pairs(600, seed=seed_offset)))
    config = tiny_config(backbone=tiny_backbone, seed=1 + seed_offset)
    summary = train(pairs, config, tmp_path / "rm", device=torch.device("cpu"))
    assert summary["held_out_pairs"] > 50
    # Seen 1.00 on seed offsets 0-4, 1 and 2 threads; the loss fell by 0.52 each time.
    assert figures("reward.marker.held_out_accuracy", summary["accuracy"]) >= 0.95, summary
    losses = json.loads((tmp_path / "rm" / "member_0" / "losses.json").read_text())
    assert figures("reward.marker.loss_drop", np.mean(losses[:10]) - np.mean(losses[-10:])) > 0
    assert (tmp_path / "rm" / "config.json").exists() and (tmp_path / "rm" / "metrics.json").exists()


def test_resumed_run_continues_exactly_like_an_uninterrupted_one(tmp_path):
    tokenizer = make_tokenizer()
    pairs = [Pair(**{k: v for k, v in row.items() if k != "comparison_id"}) for row in marker_pairs(160)]
    config = tiny_config(epochs=1, checkpoint_every=2)
    data = Encoded(pairs, tokenizer, config)
    device = torch.device("cpu")

    whole = train_member(make_model(len(tokenizer), tokenizer.pad_token_id), data, config, seed=3, device=device)
    stopped_dir = tmp_path / "run"
    stopped_dir.mkdir()
    train_member(make_model(len(tokenizer), tokenizer.pad_token_id), data, config, seed=3, device=device,
                 checkpoint_dir=stopped_dir, stop_after=4)  # fmt: skip
    fresh = make_model(len(tokenizer), tokenizer.pad_token_id, seed=99)  # different weights: the checkpoint must win
    resumed = train_member(fresh, data, config, seed=3, device=device, checkpoint_dir=stopped_dir)
    assert resumed.losses[4] == whole.losses[4]
    assert resumed.losses == whole.losses


@pytest.mark.statistical
def test_ensemble_spread_is_larger_out_of_distribution(tiny_backbone, tmp_path, seed_offset, figures):
    pairs = load_pairs(write_rows(tmp_path / "train.jsonl", marker_pairs(300, seed=seed_offset)))
    out = tmp_path / "ensemble"
    config = tiny_config(backbone=tiny_backbone, ensemble_size=3, seed=1 + 10 * seed_offset)
    train(pairs, config, out, device=torch.device("cpu"))
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    members = sorted(out.glob("member_*"))
    tokenizer = AutoTokenizer.from_pretrained(members[0])
    config = tiny_config()
    in_distribution = Encoded(pairs[:100], tokenizer, config)
    # Out of distribution: words that never occur in the training pairs.
    unseen = [
        Pair(prompt="user assistant", chosen="answer : user " * (i % 5 + 1), rejected=": assistant " * (i % 4 + 2))
        for i in range(20)
    ]
    out_of_distribution = Encoded(unseen, tokenizer, config)

    def spread(data):
        gaps = []
        for member in members:
            model = AutoModelForSequenceClassification.from_pretrained(member).eval()
            ids, mask, _ = data.batch(list(range(len(data.pairs))), torch.device("cpu"))
            with torch.no_grad():
                rewards = scores(model, ids, mask)
            gaps.append((rewards[: len(data.pairs)] - rewards[len(data.pairs) :]).numpy())
        return float(np.std(gaps, axis=0).mean())

    # Seen 4.3 to 35 (out of distribution / in distribution) on seed offsets 0-4, 1 and 2 threads.
    assert figures("reward.ensemble.spread_ratio", spread(out_of_distribution) / spread(in_distribution)) > 1
    assert sum(1 for _ in (out / "uncertainty.jsonl").open()) > 0


def test_metrics_by_hand():
    tokenizer = make_tokenizer()
    pairs = [
        Pair(prompt="q", chosen="w1", rejected="w2 w3", agreement=1.0),
        Pair(prompt="q", chosen="w4", rejected="w5"),
    ]
    data = Encoded(pairs, tokenizer, tiny_config())
    result = metrics(np.array([[2.0, 0.0], [0.0, 1.0]]), data)
    assert result["accuracy"] == 0.5
    assert result["accuracy_by_agreement"] == {"unanimous": 1.0}
    # Confidences sigmoid(2)=0.881 (right) and sigmoid(1)=0.731 (wrong) fall in different bins.
    expected_ece = 0.5 * abs(1 - 1 / (1 + math.exp(-2))) + 0.5 * abs(0 - 1 / (1 + math.exp(-1)))
    assert result["ece"] == pytest.approx(expected_ece)


def test_command_line_trains_and_evaluates(tiny_backbone, tmp_path):
    data = write_rows(tmp_path / "prefs.jsonl", marker_pairs(200))
    out = tmp_path / "cli"
    trained = subprocess.run(
        [sys.executable, "-m", "training.reward", "--data", str(data), "--out", str(out), "--backbone", tiny_backbone,
         "--max-length", "32", "--learning-rate", "3e-3", "--epochs", "2", "--batch-size", "16"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "loss" in trained.stderr  # the progress bar
    evaluated = subprocess.run(
        [sys.executable, "-m", "training.reward", "--evaluate", str(out), "--data", str(data)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert {"accuracy", "ece", "length_spearman"} <= set(result)
    assert result["pairs"] == 200


def test_too_few_pairs_or_no_held_out_prompt_is_a_clear_error(tiny_backbone, tmp_path):
    few = load_pairs(write_rows(tmp_path / "few.jsonl", marker_pairs(30)))
    with pytest.raises(ValueError, match=r"training pairs after holding out \d+: at least 50 are needed"):
        train(few, tiny_config(backbone=tiny_backbone), tmp_path / "few")
    one_prompt = [Pair(prompt="the same question", chosen=f"banana w{i}", rejected=f"w{i}") for i in range(80)]
    with pytest.raises(ValueError, match="no held-out prompt among 80 pairs"):
        train(one_prompt, tiny_config(backbone=tiny_backbone, eval_fraction=0.0), tmp_path / "one")
    assert not (tmp_path / "few").exists()  # refused before anything is written
    done = subprocess.run(
        [sys.executable, "-m", "training.reward", "--data", str(tmp_path / "few.jsonl"), "--out", str(tmp_path / "cli"),
         "--backbone", tiny_backbone],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "at least 50 are needed" in done.stderr and "Traceback" not in done.stderr


def test_encoding_a_batch_gives_each_row_its_own_ids():
    """encode_all tokenizes a batch in one call: every row as if encoded alone, with or without a
    chat template, truncated or not, and with the appended EOS of an untemplated text."""
    from training.reward import encode, encode_all

    tokenizer = make_tokenizer()
    rows = [(" ".join(WORDS[: 3 * i]) or "question", f"banana w{i}") for i in range(8)]
    rows.append(([{"role": "user", "content": "question w1"}, {"role": "assistant", "content": "w2"},
                  {"role": "user", "content": "w3 w4"}], "banana"))  # fmt: skip
    for template in (None, "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"):
        tokenizer.chat_template = template
        batched = encode_all(tokenizer, rows, max_length=10)
        alone = [encode(tokenizer, prompt, answer, max_length=10) for prompt, answer in rows]
        assert batched == alone
        assert [len(ids) for ids in batched[:3]] == ([4, 6, 9] if template is None else [7, 9, 10])
        assert all(len(ids) == 10 for ids in batched[3:8])  # cut from the left
        assert tokenizer.decode(batched[7][-2:]) == ("w7 <eos>" if template is None else "banana w7")
        assert all((ids[-1] == tokenizer.eos_token_id) == (template is None) for ids in batched)
    assert encode_all(tokenizer, [], max_length=10) == []


def test_an_encoder_reads_the_roles_and_where_the_answer_begins():
    """Without a chat template a dialogue's turns keep their roles, and an encoder with [SEP] reads
    prompt and answer as a text pair: blank lines between them would be whitespace to it."""
    from training.reward import encode

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":", "user", "assistant", *WORDS[:20]]
    tokenizer = transformers.BertTokenizerFast(vocab={word: index for index, word in enumerate(words)})
    dialogue = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"},
                {"role": "user", "content": "w4"}]  # fmt: skip
    assert tokenizer.decode(encode(tokenizer, dialogue, "w5 w6", 64)) == (
        "[CLS] user : w1 w2 assistant : w3 user : w4 [SEP] w5 w6 [SEP]"
    )
    assert tokenizer.decode(encode(tokenizer, "w1 w2", "w5", 64)) == "[CLS] w1 w2 [SEP] w5 [SEP]"  # a lone turn
    assert tokenizer.decode(encode(tokenizer, dialogue, "w5 w6", 6)) == "[CLS] w4 [SEP] w5 w6 [SEP]"  # cut left
    word_level = make_tokenizer()  # no separator: a blank line between prompt and answer, then EOS
    text = "User: w1 w2\n\nAssistant: w3\n\nUser: w4\n\nw5"
    assert encode(word_level, dialogue, "w5", 64) == [*word_level(text)["input_ids"], word_level.eos_token_id]


def test_truncation_keeps_the_answer_and_a_leading_special_token():
    from training.reward import encode

    tokenizer = make_tokenizer()
    tokenizer.bos_token = "<unk>"  # stands in for an encoder's [CLS]
    long_prompt = " ".join(WORDS[:100])
    ids = encode(tokenizer, long_prompt, "banana answer", max_length=8)
    assert len(ids) == 8
    assert tokenizer.decode(ids[-3:]) == "banana answer <eos>"
    ids_with_cls = encode(tokenizer, "<unk> " + long_prompt, "banana", max_length=8)
    assert ids_with_cls[0] == tokenizer.convert_tokens_to_ids("<unk>") and len(ids_with_cls) == 8
