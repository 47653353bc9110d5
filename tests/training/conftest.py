"""Tiny randomly initialised models built here, so the training tests need no download."""

import random

import pytest
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


def make_model(vocab_size: int, pad_token_id: int, seed: int = 0) -> transformers.PreTrainedModel:
    transformers.set_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, num_labels=1, pad_token_id=pad_token_id,
    )  # fmt: skip
    return transformers.AutoModelForSequenceClassification.from_config(config)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    """A saved tiny decoder + tokenizer: what --backbone takes as a local path."""
    path = tmp_path_factory.mktemp("tiny-backbone")
    tokenizer = make_tokenizer()
    make_model(len(tokenizer), tokenizer.pad_token_id).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


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


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> str:
    """A saved tiny causal LM + tokenizer: what --policy takes as a local path."""
    path = tmp_path_factory.mktemp("tiny-policy")
    tokenizer = make_policy_tokenizer()
    transformers.set_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def banana_answer(rng: random.Random, count: int) -> str:
    words = [f"w{rng.randrange(20)}" for _ in range(rng.randint(3, 10))]
    for _ in range(count):
        words.insert(rng.randint(0, len(words)), "banana")
    return " ".join(words)


@pytest.fixture(scope="session")
def banana_reward_model(tmp_path_factory, tiny_backbone) -> str:
    """A deliberately exploitable reward model: trained on pairs where the answer with more
    bananas (0 to 8) won, so more is always better to it, spam included."""
    from training import reward

    rng = random.Random(0)
    pairs = []
    for index in range(800):
        low, high = sorted(rng.sample(range(9), 2))
        pairs.append(
            reward.Pair(prompt=f"question w{index % 20}", chosen=banana_answer(rng, high),
                        rejected=banana_answer(rng, low))
        )  # fmt: skip
    out = tmp_path_factory.mktemp("banana-rm")
    config = reward.RewardConfig(backbone=tiny_backbone, max_length=32, learning_rate=3e-3, epochs=2, batch_size=16)
    assert reward.train(pairs, config, out)["accuracy"] > 0.9
    return str(out)
