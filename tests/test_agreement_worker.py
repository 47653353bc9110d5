"""A burst of votes triggers exactly one agreement recomputation, run by a real Celery worker that
consumes from Redis and writes to PostgreSQL."""

import time

import pytest
from django.test import override_settings

from annotation.models import AgreementSnapshot
from annotation.services import assignment_claim, labeler_create, vote_submit
from tests.factories import PASSWORD, make_project
from tests.workers import celery_worker


@pytest.fixture
def worker():
    with celery_worker("default") as running:
        yield running
    print(running.output[-3000:])


@pytest.mark.django_db(transaction=True)
@override_settings(CELERY_TASK_ALWAYS_EAGER=False, FLYWHEEL_AGREEMENT_DEBOUNCE_SECONDS=2)
def test_a_burst_of_votes_is_recomputed_once_by_the_worker(worker):
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
