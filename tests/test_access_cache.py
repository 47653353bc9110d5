"""The access cache (annotation/access_cache.py): a labeling request reads no token, group or project
from the database once they are cached, and every change to them takes effect on the next request."""

import time

import pytest
from django.contrib.auth.models import Group
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from rest_framework.authtoken.models import Token

from annotation import access_cache
from annotation.api import ClaimAPI, VoteAPI, assignment_answer, vote_answer
from annotation.auth import token_revoke
from annotation.models import LABELERS_GROUP, Assignment, Vote
from annotation.services import project_access_set
from tests.factories import api_client_for, make_project

pytestmark = pytest.mark.django_db

# What a claim and a vote still send once the cache is warm: their own statements (annotation/sql.py),
# in one transaction each; nothing about the token, the user's groups or the project.
CLAIM_QUERIES = ["BEGIN", "UPDATE annotation_assignment", "SELECT c.id", "INSERT INTO annotation_assignment",
                 "SELECT a.", "COMMIT"]  # fmt: skip
VOTE_QUERIES = ["BEGIN", "SELECT a.id", "SELECT id, assignment_id FROM annotation_vote", "INSERT INTO annotation_vote",
                "UPDATE annotation_comparison", "UPDATE annotation_assignment", "COMMIT"]  # fmt: skip


def claim(client, project):
    return client.post(f"/api/v1/projects/{project.slug}/assignments/")


def vote(client, assignment_id, query="", key="k1"):
    return client.post(
        f"/api/v1/assignments/{assignment_id}/vote/{query}",
        {"choice": "left", "strength": 2},
        format="json",
        HTTP_IDEMPOTENCY_KEY=key,
    )


def statements(captured) -> list[str]:
    """The statements sent, a test's savepoints named as the transaction they stand for."""
    sent = [" ".join(query["sql"].split()) for query in captured.captured_queries]
    names = {"RELEASE SAVEPOINT": "COMMIT", "SAVEPOINT": "BEGIN"}
    return [next((name for prefix, name in names.items() if s.startswith(prefix)), s) for s in sent]


def starts_as(sent: list[str], expected: list[str]) -> bool:
    return len(sent) == len(expected) and all(s.startswith(e) for s, e in zip(sent, expected, strict=True))


def test_warm_claim_and_vote_read_no_token_group_or_project(alice):
    project = make_project(pairs=5)
    client = api_client_for(alice)
    first = claim(client, project)  # fills the cache
    assert first.status_code == 201
    assert vote(client, first.json()["assignment"], key="warm").status_code == 201

    with CaptureQueriesContext(connection) as captured:
        claimed = claim(client, project)
    assert claimed.status_code == 201
    assert starts_as(statements(captured), CLAIM_QUERIES), statements(captured)

    with CaptureQueriesContext(connection) as captured:
        voted = vote(client, claimed.json()["assignment"])
    assert voted.status_code == 201
    assert starts_as(statements(captured), VOTE_QUERIES), statements(captured)

    with CaptureQueriesContext(connection) as captured:
        claimed = claim(client, project)
        voted = vote(client, claimed.json()["assignment"], query="?next=1", key="k2")
    assert voted.status_code == 201 and voted.json()["next"] is not None
    sent = statements(captured)
    assert starts_as(sent, CLAIM_QUERIES + VOTE_QUERIES + CLAIM_QUERIES), " | ".join(s[:30] for s in sent)


def test_claim_query_count_with_the_cache_off_is_the_old_one(alice, django_assert_num_queries):
    project = make_project(pairs=5)
    client = api_client_for(alice)
    assert claim(client, project).status_code == 201
    other = make_project(pairs=1)
    with override_settings(FLYWHEEL_AUTH_CACHE_SECONDS=0):
        # token + user, groups, project, then the claim's own: the cache is what saves the first three.
        with django_assert_num_queries(len(CLAIM_QUERIES) + 3):
            assert claim(client, other).status_code == 201


def test_a_revoked_token_is_refused_on_the_next_request(alice, bob):
    project = make_project(pairs=5)
    client, bobs_client = api_client_for(alice), api_client_for(bob)
    assert claim(client, project).status_code == 201
    assert claim(bobs_client, project).status_code == 201
    token_revoke(user=alice)
    assert claim(client, project).status_code == 401
    assert claim(bobs_client, project).status_code == 201
    # A token deleted in bulk, as the admin's delete action does, too.
    Token.objects.filter(user=bob).delete()
    assert claim(bobs_client, project).status_code == 401


def test_a_cached_token_still_expires(alice):
    project = make_project(pairs=5)
    client = api_client_for(alice)
    assert claim(client, project).status_code == 201
    with override_settings(FLYWHEEL_TOKEN_LIFETIME_HOURS=0):
        response = claim(client, project)
    assert response.status_code == 401 and "expired" in response.json()["detail"]


def test_a_deactivated_user_is_refused_on_the_next_request(alice):
    project = make_project(pairs=5)
    client = api_client_for(alice)
    assert claim(client, project).status_code == 201
    alice.is_active = False
    alice.save()
    assert claim(client, project).status_code == 401


def test_leaving_the_labelers_group_takes_effect_on_the_next_request(alice, bob):
    project = make_project(pairs=5)
    client, bobs_client = api_client_for(alice), api_client_for(bob)
    assert claim(client, project).status_code == 201
    assert claim(bobs_client, project).status_code == 201
    labelers = Group.objects.get(name=LABELERS_GROUP)
    alice.groups.remove(labelers)
    assert claim(client, project).status_code == 403
    labelers.user_set.remove(bob)  # from the group's side
    assert claim(bobs_client, project).status_code == 403
    labelers.user_set.add(alice, bob)
    assert claim(client, project).status_code == 201
    labelers.user_set.clear()
    assert claim(bobs_client, project).status_code == 403


def test_membership_changes_take_effect_on_the_next_request(alice, bob):
    project = make_project(pairs=5)
    project_access_set(project=project, members_only=True, add=["alice"])
    client, bobs_client = api_client_for(alice), api_client_for(bob)
    assert claim(client, project).status_code == 201
    assert claim(bobs_client, project).status_code == 404
    project_access_set(project=project, remove=["alice"], add=["bob"])
    assert claim(client, project).status_code == 404
    assert claim(bobs_client, project).status_code == 201
    bob.member_projects.clear()  # from the user's side
    assert claim(bobs_client, project).status_code == 404
    project_access_set(project=project, members_only=False)
    assert claim(bobs_client, project).status_code == 201


def test_a_renamed_slug_stops_finding_the_project(alice):
    project = make_project(pairs=5)
    client = api_client_for(alice)
    old_slug = project.slug
    assert claim(client, project).status_code == 201
    project.slug = old_slug + "-renamed"
    project.save()
    assert client.post(f"/api/v1/projects/{old_slug}/assignments/").status_code == 404
    assert claim(client, project).status_code == 201


@override_settings(FLYWHEEL_AUTH_CACHE_SECONDS=1)
def test_a_change_without_a_signal_is_seen_when_the_entry_runs_out(alice):
    """QuerySet.update() sends no signal (and another process's cache hears none without Redis):
    the lifetime bounds how long the old answer lasts."""
    project = make_project(pairs=5)
    client = api_client_for(alice)
    assert claim(client, project).status_code == 201
    type(alice).objects.filter(pk=alice.pk).update(is_active=False)
    assert claim(client, project).status_code == 201  # within the lifetime: the cached answer
    time.sleep(1.1)
    assert claim(client, project).status_code == 401


def test_the_cached_user_carries_no_password(alice):
    project = make_project(pairs=1)
    client = api_client_for(alice)
    assert claim(client, project).status_code == 201
    user, token, roles = access_cache.token_cached(Token.objects.get(user=alice).key)
    assert user.pk == alice.pk and token.user is user and roles == {LABELERS_GROUP}
    assert user.get_deferred_fields() == {"password"}
    assert user.check_password("correct-horse-battery")  # read from the database when asked for


@override_settings(CACHES={"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                       "LOCATION": "redis://127.0.0.1:1/0",
                                       "OPTIONS": {"socket_connect_timeout": 0.2, "socket_timeout": 0.2}}})  # fmt: skip
def test_a_cache_that_cannot_be_reached_reads_the_database(alice):
    project = make_project(pairs=5)
    client = api_client_for(alice)
    claimed = claim(client, project)
    assert claimed.status_code == 201
    assert vote(client, claimed.json()["assignment"], query="?next=1").status_code == 201
    token_revoke(user=alice)
    assert claim(client, project).status_code == 401


def test_hand_built_answers_equal_their_serializers(alice):
    project = make_project(pairs=2)
    client = api_client_for(alice)
    claimed = claim(client, project).json()
    assignment = Assignment.objects.select_related("comparison__prompt").get(pk=claimed["assignment"])
    assert claimed == assignment_answer(assignment) == ClaimAPI.OutputSerializer(assignment).data
    voted = vote(client, claimed["assignment"]).json()
    stored = Vote.objects.get(pk=voted["vote"])
    assert voted == vote_answer(stored) == VoteAPI.OutputSerializer(stored).data


def test_an_answer_read_before_a_revocation_is_not_cached_after_it(alice):
    """The race of a request that read the token just before it was revoked: its fill comes after
    the revocation's delete, and must not bring the token back for a lifetime."""
    project = make_project(pairs=2)
    client = api_client_for(alice)
    token = Token.objects.select_related("user").get(user=alice)
    token_revoke(user=alice)
    access_cache.token_cache_set(token, {LABELERS_GROUP})  # the late fill
    assert access_cache.token_cached(token.key) is None
    assert claim(client, project).status_code == 401
