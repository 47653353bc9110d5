"""A burst of votes triggers exactly one agreement recomputation, run by a real Celery worker that
consumes from Redis and writes to PostgreSQL."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from django.db import connection
from django.test import override_settings

from annotation.models import AgreementSnapshot
from annotation.services import assignment_claim, labeler_create, vote_submit
from config.celery import app
from tests.conftest import PASSWORD, make_project

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def celery_worker():
    redis.Redis.from_url(REDIS_URL).flushdb()
    database = connection.settings_dict
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings_test",
        "DATABASE_URL": f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}",
        "REDIS_URL": REDIS_URL,
    }
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "--pool",
            "solo",
            "--queues",
            "default",
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "INFO",
        ],  # fmt: skip
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    previous = dict(app.conf)
    app.conf.update(broker_url=REDIS_URL, task_always_eager=False)
    try:
        yield worker
    finally:
        app.conf.update(broker_url=previous["broker_url"], task_always_eager=previous["task_always_eager"])
        worker.terminate()
        output, _ = worker.communicate(timeout=30)
        print(output[-3000:])


@pytest.mark.django_db(transaction=True)
@override_settings(CELERY_TASK_ALWAYS_EAGER=False, FLYWHEEL_AGREEMENT_DEBOUNCE_SECONDS=2)
def test_a_burst_of_votes_is_recomputed_once_by_the_worker(celery_worker):
    project = make_project(pairs=5, overlap=2)
    labelers = [labeler_create(username=f"l{i}", password=PASSWORD) for i in range(2)]
    for labeler in labelers:
        while (assignment := assignment_claim(project=project, labeler=labeler)) is not None:
            vote_submit(assignment_id=assignment.pk, labeler=labeler, choice="left")

    deadline = time.monotonic() + 60
    while not AgreementSnapshot.objects.filter(project=project).exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # room for a second (wrong) recomputation to show up
    snapshots = list(AgreementSnapshot.objects.filter(project=project, round=None))
    assert len(snapshots) == 1, f"{len(snapshots)} recomputations for one burst"
    assert snapshots[0].figures["votes"] == 10
