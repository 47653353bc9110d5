"""Many labelers claiming and voting at once on PostgreSQL, each thread on its own connection:
no vote lost, none duplicated, overlap never exceeded."""

import random
import threading
import time
import uuid

import pytest
from django.db import connection
from django.db.models import Count

from annotation.models import Assignment, Comparison, Vote
from annotation.services import LabelingError, assignment_claim, labeler_create, vote_submit
from tests.factories import PASSWORD, make_project

THREADS = 50
TIME_CAP_SECONDS = 120


@pytest.mark.django_db(transaction=True)
def test_fifty_threads_claiming_and_voting_lose_and_duplicate_nothing():
    # A short lease makes late votes (accepted or refused) part of the mix.
    project = make_project(pairs=120, overlap=3, lease_seconds=1)
    labelers = [labeler_create(username=f"worker{i}", password=PASSWORD) for i in range(THREADS)]
    acknowledged: list[int] = []
    refused: list[str] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)
    deadline = time.monotonic() + TIME_CAP_SECONDS

    def work(labeler, seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()
            while time.monotonic() < deadline:
                assignment = assignment_claim(project=project, labeler=labeler)
                if assignment is None:
                    break
                if rng.random() < 0.05:
                    time.sleep(1.1)  # let the lease run out before voting
                key = uuid.uuid4().hex
                choice = rng.choice(["left", "right", "tie", "both_bad"])
                for _attempt in range(2 if rng.random() < 0.2 else 1):  # a retried request
                    try:
                        vote, _ = vote_submit(
                            assignment_id=assignment.pk, labeler=labeler, choice=choice, idempotency_key=key
                        )
                    except LabelingError as error:
                        with lock:
                            refused.append(str(error))
                        break
                    with lock:
                        acknowledged.append(vote.pk)
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            failures.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(labeler, i)) for i, labeler in enumerate(labelers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []
    stored = set(Vote.objects.values_list("pk", flat=True))
    assert set(acknowledged) <= stored, "an acknowledged vote is missing"
    assert len(stored) == len(set(acknowledged)), "a vote was stored that nobody acknowledged"
    # Every thread worked until nothing was left, so every comparison must be exactly full.
    assert len(stored) == 120 * project.overlap
    twice = Vote.objects.values("comparison", "labeler").annotate(n=Count("id")).filter(n__gt=1)
    assert not twice.exists()
    for comparison in Comparison.objects.filter(project=project).annotate(real=Count("votes")):
        assert comparison.real == comparison.vote_count == project.overlap
    assert not Assignment.objects.filter(status=Assignment.Status.VOTED, vote__isnull=True).exists()
    assert all("expired" in message for message in refused)
