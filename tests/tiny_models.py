"""Tiny randomly initialised models and the data they learn from, built here so that the training
tests need no download."""

import random

import tokenizers
import transformers

WORDS = [f"w{i}" for i in range(200)] + ["banana", "question", "answer", "user", "assistant", ":"]


def make_tokenizer(pad_equals_eos: bool = False) -> transformers.PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(["<pad>", "<unk>", "<eos>", *WORDS])}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<eos>" if pad_equals_eos else "<pad>",
        unk_token="<unk>",
        eos_token="<eos>",
    )


def make_model(
    vocab_size: int, pad_token_id: int, seed: int = 0, max_positions: int = 128
) -> transformers.PreTrainedModel:
    transformers.set_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=max_positions, pad_token_id=pad_token_id,
    )  # fmt: skip
    config.num_labels = 1  # a PretrainedConfig property, not a LlamaConfig argument in the stubs
    return transformers.AutoModelForSequenceClassification.from_config(config)


def marker_pairs(count: int, seed: int = 0, marker: str = "banana") -> list[dict]:
    """Export rows where the answer containing the marker word is always the chosen one."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        filler = lambda: " ".join(rng.choice(WORDS[:200]) for _ in range(rng.randint(3, 8)))  # noqa: E731
        good = filler().split()
        good.insert(rng.randint(0, len(good)), marker)
        rows.append({"prompt": f"question w{index % 200}", "chosen": " ".join(good), "rejected": filler(),
                     "comparison_id": index})  # fmt: skip
    return rows


POLICY_WORDS = [f"w{i}" for i in range(20)] + ["banana", "question"]


def make_policy_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A smaller vocabulary than the reward model's, so that a random policy says the marker word
    often enough to learn from, and so that scoring must decode and re-encode."""
    vocab = {token: index for index, token in enumerate(["<pad>", "<unk>", "<eos>", *POLICY_WORDS])}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )


def banana_answer(rng: random.Random, count: int) -> str:
    words = [f"w{rng.randrange(20)}" for _ in range(rng.randint(3, 10))]
    for _ in range(count):
        words.insert(rng.randint(0, len(words)), "banana")
    return " ".join(words)
