"""Shared fixtures: named users (alice and bob label, admin administers, charlie is an outsider)
and small projects built through the same services the product uses."""

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from django.contrib.auth import get_user_model
from django.db import connection
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from annotation.importing import PairRecord
from annotation.models import Project
from annotation.services import labeler_create, pairs_import, project_get_or_create

PASSWORD = "correct-horse-battery"
_slugs = itertools.count()


@pytest.fixture(autouse=True, scope="session")
def _celery_configured_before_any_override():
    """Celery copies its settings from Django's on first use; make that happen with the real
    settings, not inside some test's override_settings."""
    from config.celery import app

    assert app.conf.task_always_eager is not None


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


def make_records(count: int, *, tag: str = "") -> list[PairRecord]:
    return [
        PairRecord(
            line=index + 1,
            prompt=f"Question {tag}{index}: how do I boil an egg?",
            response_a=f"Answer A{tag}{index}: put it in boiling water for 8 minutes.",
            response_b=f"Answer B{tag}{index}: eggs cannot be boiled.",
            source_a="model-a",
            source_b="model-b",
        )
        for index in range(count)
    ]


def make_project(*, pairs: int = 5, overlap: int = 3, lease_seconds: int = 600) -> Project:
    project = project_get_or_create(slug=f"project-{next(_slugs)}", overlap=overlap)
    project.lease_seconds = lease_seconds
    project.save(update_fields=["lease_seconds"])
    pairs_import(project=project, records=make_records(pairs, tag=project.slug))
    return project


@pytest.fixture
def project(db):
    return make_project()


def api_client_for(user) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@dataclass
class Worker:
    process: subprocess.Popen
    output: str = field(default="")


def _switch_broker(app, **conf: object) -> None:
    """Celery builds its connection pool once, from the broker URL of that moment: a test that
    switches brokers needs a new pool, or its tasks go to the old broker."""
    app.conf.update(**conf)
    app._pool = None  # dropped, not closed: kombu's producer registry may still hold the old one
    app.amqp._producer_pool = None


@contextmanager
def celery_worker(queues: str, **env: str) -> Iterator[Worker]:
    """A real Celery worker in its own process, consuming `queues` from Redis and writing to the
    test database; while it runs, this process enqueues to the same Redis. Its log is in `output`
    once the block ends."""
    redis.Redis.from_url(REDIS_URL).flushdb()
    database = connection.settings_dict
    url = f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"
    from config.celery import app

    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "config", "worker", "--pool", "solo", "--queues", queues,
         "--without-mingle", "--without-gossip", "--loglevel", "INFO"],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings_test", "DATABASE_URL": url,
             "REDIS_URL": REDIS_URL, **env},
    )  # fmt: skip
    previous = {"broker_url": app.conf.broker_url, "task_always_eager": app.conf.task_always_eager}
    _switch_broker(app, broker_url=REDIS_URL, task_always_eager=False)
    worker = Worker(process)
    try:
        yield worker
    finally:
        _switch_broker(app, **previous)
        process.terminate()
        worker.output, _ = process.communicate(timeout=30)
