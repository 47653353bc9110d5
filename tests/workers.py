"""A real Celery worker in its own process, for the tests where workers matter."""

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
from django.db import connection

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
ROOT = Path(__file__).resolve().parents[1]


def manage(*args: str, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    """`manage.py` in a process of its own, on `env` alone: none of this process's database, Redis or
    Django settings, so an env of {"FLYWHEEL_VAR_DIR": ...} is the embedded default."""
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env={**clean_environment(), **env}, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


def clean_environment() -> dict[str, str]:
    drop = {"DATABASE_URL", "REDIS_URL", "DEBUG", "SECRET_KEY", "DJANGO_SETTINGS_MODULE"}
    return {name: value for name, value in os.environ.items() if name not in drop}


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
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
