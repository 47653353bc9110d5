"""Shared fixtures: named users (alice and bob label, admin administers, charlie is an outsider),
small projects built through the same services the product uses, and tiny saved models (built on
first use, once per session)."""

import os
import random

import pytest
from django.contrib.auth import get_user_model
from django.db import connection

from annotation.services import labeler_create
from tests.factories import PASSWORD, make_project


def pytest_addoption(parser):
    group = parser.getgroup("statistical tests", "check the margins of the statistical tests on other seeds")
    group.addoption("--seed-offset", type=int, default=0, help="Add N to every seed of the statistical tests (CI: 0).")
    group.addoption("--torch-threads", type=int, default=0, help="torch.set_num_threads(N), workers included.")


def pytest_configure(config):
    threads = config.getoption("--torch-threads")
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the subprocesses: CLIs and Celery workers
        import torch

        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def seed_offset(pytestconfig) -> int:
    """Added to the seeds of the statistical tests (data, sampling, order, fresh heads); CI runs them
    at 0, and `--seed-offset N` shows how they fare elsewhere."""
    return pytestconfig.getoption("--seed-offset")


@pytest.fixture(scope="session")
def figures(pytestconfig):
    """record(name, value): a statistical test's measured figure, printed at the end of the run
    next to the seed offset, to read its margin from."""
    recorded = pytestconfig.stash.setdefault(_FIGURES, [])

    def record(name: str, value: float) -> float:
        recorded.append((name, value))
        return value

    return record


_FIGURES = pytest.StashKey[list]()


def pytest_terminal_summary(terminalreporter, config):
    recorded = config.stash.get(_FIGURES, [])
    if recorded:
        offset, threads = config.getoption("--seed-offset"), config.getoption("--torch-threads") or "default"
        terminalreporter.section(f"statistical figures (seed offset {offset}, torch threads {threads})")
        for name, value in recorded:
            terminalreporter.write_line(f"FIGURE {offset} {threads} {name} {value:.4f}")


@pytest.fixture(autouse=True, scope="session")
def _celery_configured_before_any_override():
    """Celery copies its settings from Django's on first use; make that happen with the real
    settings, not inside some test's override_settings."""
    from config.celery import app

    assert app.conf.task_always_eager is not None


@pytest.fixture(autouse=True)
def _empty_cache():
    """Each test starts with an empty cache: the access cache (annotation/access_cache.py) keys projects
    by slug and id, which the next test's rolled-back database may hand out again."""
    from django.core.cache import cache

    cache.clear()


@pytest.fixture(autouse=True, scope="session")
def _require_postgresql(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        if connection.vendor != "postgresql":
            pytest.exit("The test suite runs on PostgreSQL: set DATABASE_URL=postgres://...", returncode=2)


@pytest.fixture
def alice(db):
    return labeler_create(username="alice", password=PASSWORD)


@pytest.fixture
def bob(db):
    return labeler_create(username="bob", password=PASSWORD)


@pytest.fixture
def admin_user(db):
    return labeler_create(username="admin", password=PASSWORD, admin=True)


@pytest.fixture
def charlie(db):
    """Logged in fine, but in no group: sees nothing."""
    user = get_user_model().objects.create(username="charlie")
    user.set_password(PASSWORD)
    user.save()
    return user


@pytest.fixture
def project(db):
    return make_project()


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    """A saved tiny decoder + tokenizer: what --backbone takes as a local path."""
    from tests.tiny_models import make_model, make_tokenizer

    path = tmp_path_factory.mktemp("tiny-backbone")
    tokenizer = make_tokenizer()
    make_model(len(tokenizer), tokenizer.pad_token_id).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> str:
    """A saved tiny causal LM + tokenizer: what --policy takes as a local path. Its weights, like the
    backbone's, are the same on every machine and seed offset: the models under test, as a pretrained
    model would be; what the seeds vary is the data, sampling, order and fresh heads."""
    import transformers

    from tests.tiny_models import make_policy_tokenizer

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


@pytest.fixture(scope="session")
def banana_reward_model(tmp_path_factory, tiny_backbone, seed_offset, figures) -> str:
    """A deliberately exploitable reward model: trained on pairs where the answer with more
    bananas (0 to 8) won, so more is always better to it, spam included."""
    from tests.tiny_models import banana_answer
    from training import reward

    rng = random.Random(seed_offset)
    pairs = []
    for index in range(800):
        low, high = sorted(rng.sample(range(9), 2))
        pairs.append(
            reward.Pair(prompt=f"question w{index % 20}", chosen=banana_answer(rng, high),
                        rejected=banana_answer(rng, low))
        )  # fmt: skip
    out = tmp_path_factory.mktemp("banana-rm")
    config = reward.RewardConfig(
        backbone=tiny_backbone, max_length=32, learning_rate=3e-3, epochs=2, batch_size=16, seed=42 + seed_offset
    )
    # Seen 0.958 to 0.983 on seed offsets 0-4 with 1 and 2 threads.
    assert figures("banana_rm.held_out_accuracy", reward.train(pairs, config, out)["accuracy"]) > 0.9
    return str(out)
