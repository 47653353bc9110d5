"""The exported dataset is what Hugging Face `datasets` and TRL's RewardTrainer consume directly."""

from typing import TYPE_CHECKING

import pytest
from django.core.management import call_command

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
