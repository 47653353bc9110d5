"""Reward model defaults and validation: a preset per packaged backbone and a rule for the others
(flags given win, config.json says why), a validation split apart from the held-out prompts, the
best validated checkpoint kept, early stopping, validation and held-out figures reported apart."""

import argparse
import json
from pathlib import Path

import pytest
import torch
import transformers

from tests.tiny_models import make_model, make_tokenizer, marker_pairs
from training import cli, reward
from training.reward import (
    Encoded,
    Pair,
    RewardConfig,
    resolve_defaults,
    split_by_prompt,
    split_validation,
    train,
    train_member,
    validation_steps,
)

CPU = torch.device("cpu")


def pairs(count: int, seed: int = 0, marker: str = "banana") -> list[Pair]:
    return [
        Pair(prompt=row["prompt"], chosen=row["chosen"], rejected=row["rejected"])
        for row in marker_pairs(count, seed=seed, marker=marker)
    ]


def test_each_packaged_backbone_gets_its_preset():
    minilm, why = resolve_defaults(RewardConfig(backbone="minilm-l6"))
    assert (minilm.learning_rate, minilm.max_length, minilm.batch_size, minilm.epochs) == (5e-5, 256, 16, 2)
    assert why["learning_rate"] == "minilm-l6 preset: encoder, 22.7M parameters"
    smollm2, why = resolve_defaults(RewardConfig(backbone="smollm2-135m"))
    assert (smollm2.learning_rate, smollm2.max_length, smollm2.batch_size, smollm2.epochs) == (1e-5, 512, 16, 1)
    assert set(why) == {"learning_rate", "max_length", "batch_size", "epochs"}


def save_bert_config(path: Path, **shape) -> str:
    """config.json alone, no weights: the rule must not need them."""
    path.mkdir()
    transformers.BertConfig(**shape).save_pretrained(path)
    return str(path)


def test_other_backbones_follow_the_rule_read_from_config_json(tiny_backbone, tmp_path):
    decoder, why = resolve_defaults(RewardConfig(backbone=tiny_backbone))
    # The tiny Llama has 128 positions: the rule's 512 tokens would not fit.
    assert (decoder.learning_rate, decoder.max_length, decoder.epochs) == (1e-5, 128, 1)
    assert why["epochs"].startswith("rule: decoder, 0.0")
    small = save_bert_config(tmp_path / "small", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=200)  # fmt: skip
    encoder, why = resolve_defaults(RewardConfig(backbone=small))
    assert (encoder.learning_rate, encoder.max_length, encoder.epochs) == (5e-5, 200, 2)
    assert why["max_length"].startswith("rule: encoder")
    large = save_bert_config(tmp_path / "large", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             intermediate_size=4096)  # fmt: skip
    encoder, why = resolve_defaults(RewardConfig(backbone=large))
    assert (encoder.learning_rate, encoder.max_length) == (2e-5, 256)
    assert why["learning_rate"] == "rule: encoder, 335M parameters"  # BERT-large's count, from shapes alone


def test_a_backbone_without_a_config_json_here_is_taken_as_a_small_decoder(tmp_path):
    config, why = resolve_defaults(RewardConfig(backbone=str(tmp_path / "nothing-here")))
    assert (config.learning_rate, config.max_length, config.epochs) == (1e-5, 512, 1)
    assert "no config.json" in why["epochs"]


def test_flags_given_win_over_the_preset():
    parser = argparse.ArgumentParser()
    cli.add_config_flags(parser, RewardConfig)
    given = cli.config_from_flags(
        RewardConfig, parser.parse_args(["--backbone", "minilm-l6", "--learning-rate", "1e-4"])
    )
    assert given.learning_rate == 1e-4 and given.epochs is None  # parsed as a float; left out: the preset's
    config, why = resolve_defaults(given)
    assert (config.learning_rate, config.epochs, config.max_length) == (1e-4, 2, 256)
    assert why["learning_rate"] == "given" and why["epochs"].startswith("minilm-l6 preset")


def test_help_lists_the_presets_and_the_rule(capsys):
    with pytest.raises(SystemExit):
        reward.main(["--help"])
    text = capsys.readouterr().out
    assert "minilm-l6 (encoder, 22.7M parameters): learning_rate 5e-05, max_length 256" in text
    assert "smollm2-135m (decoder, 135M parameters)" in text and "Other backbones" in text


def test_validation_prompts_are_apart_from_held_out_and_training_prompts():
    many = [Pair(prompt=f"p{i % 300}", chosen=f"a{i}", rejected=f"b{i}") for i in range(1200)]
    train_pairs, held_out = split_by_prompt(many, 0.1)
    fit, validation = split_validation(train_pairs, 0.1, 0.2)
    prompts = [{p.prompt for p in side} for side in (fit, validation, held_out)]
    assert all(prompts) and len(set().union(*prompts)) == sum(len(side) for side in prompts) == 300
    assert len(fit) + len(validation) == len(train_pairs)
    # About a fifth of the 270 training prompts (binomial sd about 6.6).
    assert 30 < len(prompts[1]) < 80


def reversed_validation(count: int, seed: int) -> list[Pair]:
    """Validation pairs that prefer what training teaches against: they get worse as the model learns."""
    return [Pair(prompt=p.prompt, chosen=p.rejected, rejected=p.chosen) for p in pairs(count, seed=seed + 100)]


def small_run(seed: int, **options):
    tokenizer = make_tokenizer()
    config = RewardConfig(
        backbone="unused", max_length=32, learning_rate=3e-3, batch_size=16, epochs=3, validations_per_epoch=2,
        **options,
    )  # fmt: skip
    data = Encoded(pairs(160, seed=seed), tokenizer, config)
    validation = Encoded(reversed_validation(48, seed), tokenizer, config)
    model = make_model(len(tokenizer), tokenizer.pad_token_id)
    result = train_member(model, data, config, seed=seed, device=CPU, validation=validation)
    return tokenizer, config, data, result


@pytest.mark.statistical
def test_the_checkpoint_kept_is_the_best_validated_one_not_the_last(seed_offset):
    tokenizer, config, data, result = small_run(seed_offset)
    assert len(result.validations) == 6 and result.steps == 30
    # Reversed validation gets worse as the model learns: an early validation is the best (step 5
    # or 10 of 30 on seed offsets 0-4, 1 and 2 threads), so the last weights are not the ones kept.
    best = max(result.validations, key=lambda row: (row["accuracy"], -row["loss"]))
    assert result.best_step == best["step"] <= 15
    # The weights kept are those of the best step: a run stopped there, same seed and schedule, has them.
    again = make_model(len(tokenizer), tokenizer.pad_token_id)
    stopped = train_member(again, data, config, seed=seed_offset, device=CPU, stop_after=result.best_step).model
    for (name, kept), (_, at_best) in zip(result.model.state_dict().items(), stopped.state_dict().items(), strict=True):
        assert torch.equal(kept, at_best), name


@pytest.mark.statistical
def test_early_stopping_stops_after_patience_validations_without_improvement(seed_offset):
    _, config, data, result = small_run(seed_offset, patience=2)
    steps = sorted(validation_steps(len(data.pairs), config))
    # Two validations after the best without improvement end the run: at step 15 or 20 of 30 (best
    # at 5 or 10) on seed offsets 0-4, 1 and 2 threads.
    assert result.best_step is not None and result.steps == steps[steps.index(result.best_step) + 2] < 30
    assert len(result.validations) == steps.index(result.steps) + 1


@pytest.fixture(scope="module")
def run_dir(tiny_backbone, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("defaults-run")
    rows = [Pair(prompt=p.prompt, chosen=p.chosen, rejected=p.rejected) for p in pairs(300)]
    # learning_rate and max_length given; batch size and epochs from the rule (a tiny decoder).
    train(rows, RewardConfig(backbone=tiny_backbone, learning_rate=3e-3, max_length=32), out, device=CPU)
    return out


def test_config_json_records_the_values_used_and_why(run_dir):
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["learning_rate"], saved["max_length"], saved["batch_size"], saved["epochs"]) == (3e-3, 32, 16, 1)
    assert saved["defaults"]["learning_rate"] == "given" and saved["defaults"]["max_length"] == "given"
    assert saved["defaults"]["epochs"].startswith("rule: decoder")
    assert reward.evaluate(run_dir, pairs(20))["pairs"] == 20  # the reasons do not trouble reading it back


def test_metrics_json_reports_validation_and_held_out_apart(run_dir):
    summary = json.loads((run_dir / "metrics.json").read_text())
    validation = summary["validation"]
    assert summary["held_out_pairs"] > 0 and validation["pairs"] > 0 and summary["train_pairs"] > 0
    assert summary["train_pairs"] + validation["pairs"] + summary["held_out_pairs"] == 300
    assert summary["accuracy"] is not None and validation["accuracy"] is not None
    (member,) = validation["members"]
    assert len(member["validations"]) == 2 and member["validations"][-1]["step"] == member["steps"]
    assert member["best_step"] in {row["step"] for row in member["validations"]}
