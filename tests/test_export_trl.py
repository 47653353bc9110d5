"""The exported dataset is what Hugging Face `datasets` and TRL's RewardTrainer consume directly."""

from typing import TYPE_CHECKING

import pytest
from django.core.management import CommandError, call_command

from annotation.importing import PairRecord
from annotation.services import agreement_refresh, labeler_create, pairs_import
from tests.factories import PASSWORD, label_all, make_project

if TYPE_CHECKING:  # imported where used: collecting the suite should not load transformers
    import transformers

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

pytestmark = pytest.mark.django_db


def tiny_tokenizer(texts: list[str]) -> "transformers.PreTrainedTokenizerFast":
    """A word-level tokenizer trained here, so nothing is fetched from a hub."""
    model = tokenizers.models.WordLevel(unk_token="<unk>")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>"])
    tokenizer.train_from_iterator(texts, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return fast


@pytest.fixture(params=["standard", "conversational"])
def exported(request, tmp_path):
    project = make_project(pairs=0, overlap=2)
    records = [
        PairRecord(line=i, prompt=f"question {i} about cooking pasta", response_a=f"boil water then pasta {i}",
                   response_b=f"nobody knows {i}")
        for i in range(12)
    ]  # fmt: skip
    if request.param == "conversational":
        records = [
            PairRecord(line=r.line, prompt=[{"role": "user", "content": r.prompt}], response_a=r.response_a,
                       response_b=r.response_b)
            for r in records
        ]  # fmt: skip
    pairs_import(project=project, records=records)
    labelers = [labeler_create(username=f"l{i}", password=PASSWORD) for i in range(2)]
    label_all(project, labelers, lambda labeler, comparison: "a")
    agreement_refresh(project_id=project.pk)
    paths = {}
    for file_format in ("jsonl", "parquet"):
        paths[file_format] = tmp_path / f"prefs.{file_format}"
        call_command("export_pairs", project.slug, str(paths[file_format]))
    return paths


@pytest.mark.parametrize("file_format", ["jsonl", "parquet"])
def test_datasets_loads_the_export_and_reward_trainer_runs_two_steps(exported, file_format, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    builder = "json" if file_format == "jsonl" else "parquet"
    dataset = datasets.load_dataset(builder, data_files=str(exported[file_format]), split="train")
    assert dataset.num_rows == 12
    assert {"prompt", "chosen", "rejected"} <= set(dataset.column_names)
    chosen = dataset[0]["chosen"]
    assert (chosen if isinstance(chosen, str) else chosen[0]["content"]).startswith("boil water")

    texts = [
        str(row["prompt"]) + " " + str(row["chosen"]) + " " + str(row["rejected"]) + " user assistant :"
        for row in dataset
    ]
    tokenizer = tiny_tokenizer(texts)
    from tests.tiny_models import make_model

    model = make_model(len(tokenizer), tokenizer.pad_token_id, max_positions=256)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    args = trl.RewardConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, report_to="none",
        logging_steps=1, save_strategy="no", max_length=64, use_cpu=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()
    assert result.global_step == 2
    changed = any(not (a == b).all() for a, b in zip(before, model.parameters(), strict=True))
    assert changed, "two training steps left every parameter as it was"


@pytest.mark.parametrize("conversational", [False, True])
def test_kto_export_is_trls_unpaired_format(conversational, tmp_path, monkeypatch):
    """`--kto` writes what TRL's KTOTrainer reads: its own unpairing of our pairs export, plus two
    undesirable rows for a comparison voted both bad; a tie gives none. training.dpo reads it back
    as the same examples it draws from the pairs export."""
    from trl.data_utils import is_conversational, unpair_preference_dataset

    from training.dpo import load_preferences

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    project = make_project(pairs=0, overlap=1)
    votes = {"q-a": "a", "q-b": "b", "q-bad": "both_bad", "q-tie": "tie"}
    records = [
        PairRecord(line=i, prompt=[{"role": "user", "content": text}] if conversational else text,
                   response_a=f"first {i}", response_b=f"second {i}")
        for i, text in enumerate(votes)
    ]  # fmt: skip
    pairs_import(project=project, records=records)
    choices = list(votes.values())  # by the number in response a: a conversation's prompt has no text
    decide = lambda _, comparison: choices[int(comparison.response_a.text.split()[-1])]  # noqa: E731
    label_all(project, [labeler_create(username="solo", password=PASSWORD)], decide)
    paths = {}
    for name, args in {"kto.jsonl": ["--kto", "--include-ties"], "kto.parquet": ["--kto", "--include-ties"],
                       "pairs.jsonl": [], "all.jsonl": ["--include-ties"]}.items():  # fmt: skip
        paths[name] = tmp_path / name
        call_command("export_pairs", project.slug, str(paths[name]), *args)

    kto = datasets.load_dataset("json", data_files=str(paths["kto.jsonl"]), split="train")
    assert kto.features["label"].dtype == "bool"
    assert (
        kto.to_list() == datasets.load_dataset("parquet", data_files=str(paths["kto.parquet"]), split="train").to_list()
    )
    assert all(is_conversational(row) == conversational for row in kto)
    rows = [(str(row["prompt"]), str(row["completion"]), row["label"]) for row in kto]
    pairs = datasets.load_dataset("json", data_files=str(paths["pairs.jsonl"]), split="train")
    # Our pairs carry the vote as `label` ("a", "b"), which TRL's unpairing copies over its own
    # boolean one: a pairs export fed to KTOTrainer as it is would be mislabeled, hence --kto.
    pairs = pairs.remove_columns("label")
    trl_rows = [(str(row["prompt"]), str(row["completion"]), row["label"]) for row in unpair_preference_dataset(pairs)]
    both_bad = [row for row in rows if "q-bad" in row[0]]
    assert sorted(rows) == sorted(trl_rows + both_bad)
    assert len(both_bad) == 2 and not any(label for _, _, label in both_bad)
    assert not any("q-tie" in row[0] for row in rows)
    examples = lambda name: sorted(map(repr, load_preferences(paths[name]).examples()))  # noqa: E731
    assert examples("kto.jsonl") == examples("all.jsonl")
    with pytest.raises(CommandError, match="--kto and --votes"):
        call_command("export_pairs", project.slug, str(tmp_path / "x.jsonl"), "--kto", "--votes")
