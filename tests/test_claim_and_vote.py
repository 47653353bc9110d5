"""assignment_claim and vote_submit: overlap, leases with a controlled clock, idempotency."""

from datetime import timedelta

import pytest
from django.utils import timezone

from annotation.models import Assignment, Comparison, Vote
from annotation.services import (
    AlreadyVoted,
    IdempotencyKeyReused,
    InvalidVote,
    LeaseGone,
    assignment_claim,
    assignment_skip,
    labeler_create,
    vote_submit,
)
from tests.factories import PASSWORD, make_project

pytestmark = pytest.mark.django_db


def test_vote_stores_the_winning_response_not_the_screen_side(alice):
    project = make_project(pairs=1)
    assignment = assignment_claim(project=project, labeler=alice)
    vote, created = vote_submit(assignment_id=assignment.pk, labeler=alice, choice="left", strength=3)
    comparison = assignment.comparison
    assert created
    assert vote.winner_id == assignment.left.pk
    assert vote.shown_left_id == assignment.left.pk
    assert vote.choice == ("a" if assignment.left_is_a else "b")
    assert (vote.strength, vote.time_spent_ms >= 0) == (3, True)
    comparison.refresh_from_db()
    assert comparison.vote_count == 1


def test_tie_and_both_bad_have_no_winner(alice, bob):
    project = make_project(pairs=1)
    for labeler, choice in [(alice, "tie"), (bob, "both_bad")]:
        assignment = assignment_claim(project=project, labeler=labeler)
        vote, _ = vote_submit(assignment_id=assignment.pk, labeler=labeler, choice=choice)
        assert (vote.choice, vote.winner_id) == (choice, None)


def test_left_right_order_is_randomized_per_assignment(db):
    project = make_project(pairs=1, overlap=60)
    sides = {
        assignment_claim(project=project, labeler=labeler_create(username=f"l{i}", password=PASSWORD)).left_is_a
        for i in range(60)
    }
    assert sides == {True, False}


def test_partially_labeled_comparisons_come_first(alice, bob):
    project = make_project(pairs=4)
    first = assignment_claim(project=project, labeler=alice)
    vote_submit(assignment_id=first.pk, labeler=alice, choice="left")
    assert assignment_claim(project=project, labeler=bob).comparison_id == first.comparison_id


def test_claim_returns_the_labelers_live_lease_instead_of_a_second_one(alice):
    project = make_project(pairs=3)
    first = assignment_claim(project=project, labeler=alice)
    again = assignment_claim(project=project, labeler=alice)
    assert again.pk == first.pk
    assert Assignment.objects.filter(labeler=alice).count() == 1


def test_overlap_never_exceeded_and_no_labeler_twice(db):
    project = make_project(pairs=2, overlap=2)
    labelers = [labeler_create(username=f"l{i}", password=PASSWORD) for i in range(5)]
    for labeler in labelers:
        while (assignment := assignment_claim(project=project, labeler=labeler)) is not None:
            vote_submit(assignment_id=assignment.pk, labeler=labeler, choice="right")
    counts = sorted(Comparison.objects.filter(project=project).values_list("vote_count", flat=True))
    assert counts == [2, 2]
    assert Vote.objects.filter(comparison__project=project).count() == 4
    # Only the first two labelers found work; the rest were told nothing is left.
    assert set(Vote.objects.values_list("labeler__username", flat=True)) == {"l0", "l1"}


def test_a_live_lease_holds_a_place(alice, bob):
    project = make_project(pairs=1, overlap=1)
    assert assignment_claim(project=project, labeler=alice) is not None
    assert assignment_claim(project=project, labeler=bob) is None


def test_expired_lease_frees_the_comparison(alice, bob):
    project = make_project(pairs=1, overlap=1, lease_seconds=60)
    start = timezone.now()
    assignment_claim(project=project, labeler=alice, now=start)
    assert assignment_claim(project=project, labeler=bob, now=start + timedelta(seconds=59)) is None
    assert assignment_claim(project=project, labeler=bob, now=start + timedelta(seconds=61)) is not None


def test_late_vote_refused_when_the_comparison_is_full(alice, bob):
    project = make_project(pairs=1, overlap=1, lease_seconds=60)
    start = timezone.now()
    late = assignment_claim(project=project, labeler=alice, now=start)
    bobs = assignment_claim(project=project, labeler=bob, now=start + timedelta(seconds=61))
    with pytest.raises(LeaseGone, match="expired"):
        vote_submit(assignment_id=late.pk, labeler=alice, choice="left", now=start + timedelta(seconds=62))
    # Bob's live lease is honoured; afterwards the comparison is full, and alice stays refused.
    vote_submit(assignment_id=bobs.pk, labeler=bob, choice="left", now=start + timedelta(seconds=63))
    with pytest.raises(LeaseGone):
        vote_submit(assignment_id=late.pk, labeler=alice, choice="left", now=start + timedelta(seconds=64))
    assert Vote.objects.count() == 1


def test_late_vote_accepted_while_there_is_room(alice, bob):
    project = make_project(pairs=1, overlap=2, lease_seconds=60)
    start = timezone.now()
    late = assignment_claim(project=project, labeler=alice, now=start)
    assignment_claim(project=project, labeler=bob, now=start + timedelta(seconds=61))
    vote, created = vote_submit(assignment_id=late.pk, labeler=alice, choice="tie", now=start + timedelta(seconds=62))
    assert created
    assert vote.comparison.vote_count == 1


def test_reclaim_after_expiry_reuses_the_lease_row(alice):
    project = make_project(pairs=1, overlap=1, lease_seconds=60)
    start = timezone.now()
    first = assignment_claim(project=project, labeler=alice, now=start)
    second = assignment_claim(project=project, labeler=alice, now=start + timedelta(seconds=120))
    assert second.pk == first.pk
    assert second.expires_at == start + timedelta(seconds=180)


def test_same_idempotency_key_returns_the_first_vote(alice):
    project = make_project(pairs=2)
    assignment = assignment_claim(project=project, labeler=alice)
    first, created_first = vote_submit(assignment_id=assignment.pk, labeler=alice, choice="left", idempotency_key="k")
    again, created_again = vote_submit(assignment_id=assignment.pk, labeler=alice, choice="right", idempotency_key="k")
    assert (created_first, created_again) == (True, False)
    assert again.pk == first.pk and again.choice == first.choice
    assert Vote.objects.count() == 1


def test_idempotency_key_cannot_be_reused_for_another_assignment(alice):
    project = make_project(pairs=2)
    first = assignment_claim(project=project, labeler=alice)
    vote_submit(assignment_id=first.pk, labeler=alice, choice="left", idempotency_key="k")
    second = assignment_claim(project=project, labeler=alice)
    with pytest.raises(IdempotencyKeyReused):
        vote_submit(assignment_id=second.pk, labeler=alice, choice="left", idempotency_key="k")


def test_second_vote_without_key_is_refused(alice):
    project = make_project(pairs=2)
    assignment = assignment_claim(project=project, labeler=alice)
    vote_submit(assignment_id=assignment.pk, labeler=alice, choice="left")
    with pytest.raises(AlreadyVoted):
        vote_submit(assignment_id=assignment.pk, labeler=alice, choice="left")


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("choice", {"choice": "up"}),
        ("strength", {"choice": "left", "strength": 4}),
        ("flags", {"choice": "left", "flags": ["spicy"]}),
        ("time_spent_ms", {"choice": "left", "time_spent_ms": -1}),
    ],
)
def test_invalid_vote_names_the_field_and_writes_nothing(alice, field, kwargs):
    project = make_project(pairs=1)
    assignment = assignment_claim(project=project, labeler=alice)
    with pytest.raises(InvalidVote) as error:
        vote_submit(assignment_id=assignment.pk, labeler=alice, **kwargs)
    assert error.value.field == field
    assert Vote.objects.count() == 0


def test_someone_elses_assignment_is_not_found(alice, bob):
    project = make_project(pairs=1)
    assignment = assignment_claim(project=project, labeler=alice)
    with pytest.raises(Assignment.DoesNotExist):
        vote_submit(assignment_id=assignment.pk, labeler=bob, choice="left")


def test_skipped_comparison_is_not_offered_again(alice):
    project = make_project(pairs=2)
    first = assignment_claim(project=project, labeler=alice)
    assignment_skip(assignment=first)
    second = assignment_claim(project=project, labeler=alice)
    assert second.comparison_id != first.comparison_id
    vote_submit(assignment_id=second.pk, labeler=alice, choice="left")
    assert assignment_claim(project=project, labeler=alice) is None
