"""The HTTP contract of the labeling API: token auth, claim, vote, idempotency, permissions."""

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone
from rest_framework.exceptions import NotAcceptable, ValidationError
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BrowsableAPIRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.test import APIClient, APIRequestFactory

from annotation.api import VoteAPI, vote_input
from annotation.models import Assignment, Vote
from annotation.negotiation import ContentNegotiation
from tests.factories import PASSWORD, api_client_for, make_project

pytestmark = pytest.mark.django_db


def claim(client, project):
    return client.post(f"/api/v1/projects/{project.slug}/assignments/")


def test_token_login_then_claim(alice, project):
    client = APIClient()
    response = client.post("/api/v1/auth/token/", {"username": "alice", "password": PASSWORD}, format="json")
    assert response.status_code == 200
    client.credentials(HTTP_AUTHORIZATION=f"Token {response.json()['token']}")
    assert claim(client, project).status_code == 201


def test_token_refused_for_a_wrong_password(alice):
    response = APIClient().post("/api/v1/auth/token/", {"username": "alice", "password": "nope"}, format="json")
    assert response.status_code == 400


def test_claim_returns_the_pair_in_screen_order(alice, project):
    body = claim(api_client_for(alice), project).json()
    assignment = Assignment.objects.get(pk=body["assignment"])
    assert body["left"]["text"] == assignment.left.text
    assert body["right"]["text"] == assignment.right.text
    assert body["prompt"] == assignment.comparison.prompt.text
    assert body["expires_at"]


def test_claim_returns_chat_messages_for_a_conversation(alice):
    from annotation.importing import PairRecord
    from annotation.services import pairs_import

    project = make_project(pairs=0)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a color."},
    ]
    pairs_import(project=project, records=[PairRecord(line=1, prompt=messages, response_a="Red", response_b="Blue")])
    assert claim(api_client_for(alice), project).json()["prompt"] == messages


def test_claim_204_when_nothing_is_left(alice):
    project = make_project(pairs=1)
    client = api_client_for(alice)
    assignment = claim(client, project).json()["assignment"]
    client.post(f"/api/v1/assignments/{assignment}/vote/", {"choice": "left"}, format="json")
    response = claim(client, project)
    assert response.status_code == 204


def test_vote_201_then_same_key_returns_the_same_vote(alice, project):
    client = api_client_for(alice)
    assignment = claim(client, project).json()["assignment"]
    url = f"/api/v1/assignments/{assignment}/vote/"
    body = {"choice": "right", "strength": 2, "rationale": "more accurate"}
    first = client.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="abc")
    second = client.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="abc")
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["vote"] == second.json()["vote"]
    vote = Vote.objects.get()
    assert (vote.strength, vote.rationale, vote.idempotency_key) == (2, "more accurate", "abc")


@pytest.mark.django_db(transaction=True)
def test_same_key_sent_concurrently_gives_one_row(alice):
    project = make_project(pairs=1)
    assignment = claim(api_client_for(alice), project).json()["assignment"]
    statuses: list[int] = []
    vote_ids: set[int] = set()
    barrier = threading.Barrier(10)

    def send() -> None:
        try:
            client = api_client_for(alice)
            barrier.wait()
            response = client.post(
                f"/api/v1/assignments/{assignment}/vote/",
                {"choice": "left"},
                format="json",
                HTTP_IDEMPOTENCY_KEY="same",
            )
            statuses.append(response.status_code)
            vote_ids.add(response.json()["vote"])
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200] * 9 + [201]
    assert len(vote_ids) == 1
    assert Vote.objects.count() == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"choice": "middle"}, "choice"),
        ({}, "choice"),
        ({"choice": "left", "strength": 0}, "strength"),
        ({"choice": "left", "strength": "lots"}, "strength"),
        ({"choice": "left", "flags": ["weird"]}, "flags"),
        ({"choice": "left", "time_spent_ms": -5}, "time_spent_ms"),
    ],
)
def test_bad_vote_is_400_naming_the_field(alice, project, body, field):
    client = api_client_for(alice)
    assignment = claim(client, project).json()["assignment"]
    response = client.post(f"/api/v1/assignments/{assignment}/vote/", body, format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert Vote.objects.count() == 0


def test_409_when_the_lease_is_gone_and_the_comparison_is_full(alice, bob):
    project = make_project(pairs=1, overlap=1)
    alices = claim(api_client_for(alice), project).json()["assignment"]
    Assignment.objects.filter(pk=alices).update(expires_at=timezone.now() - timedelta(seconds=1))
    bobs = claim(api_client_for(bob), project).json()["assignment"]
    response = api_client_for(alice).post(f"/api/v1/assignments/{alices}/vote/", {"choice": "left"}, format="json")
    assert response.status_code == 409
    assert "expired" in response.json()["detail"]
    assert (
        api_client_for(bob).post(f"/api/v1/assignments/{bobs}/vote/", {"choice": "left"}, format="json").status_code
        == 201
    )


def test_late_vote_accepted_when_there_is_room(alice):
    project = make_project(pairs=1, overlap=2)
    assignment = claim(api_client_for(alice), project).json()["assignment"]
    Assignment.objects.filter(pk=assignment).update(expires_at=timezone.now() - timedelta(seconds=1))
    response = api_client_for(alice).post(f"/api/v1/assignments/{assignment}/vote/", {"choice": "tie"}, format="json")
    assert response.status_code == 201


def test_labeler_cannot_vote_on_another_labelers_assignment(alice, bob, project):
    assignment = claim(api_client_for(alice), project).json()["assignment"]
    response = api_client_for(bob).post(f"/api/v1/assignments/{assignment}/vote/", {"choice": "left"}, format="json")
    assert response.status_code == 404
    assert Vote.objects.count() == 0


def test_outsider_and_anonymous_get_nothing(charlie, alice, project):
    assignment = claim(api_client_for(alice), project).json()["assignment"]
    outsider = api_client_for(charlie)
    assert claim(outsider, project).status_code == 403
    assert (
        outsider.post(f"/api/v1/assignments/{assignment}/vote/", {"choice": "left"}, format="json").status_code == 403
    )
    assert claim(APIClient(), project).status_code == 401
    assert Vote.objects.count() == 0


def test_unknown_project_is_404(alice):
    assert api_client_for(alice).post("/api/v1/projects/nope/assignments/").status_code == 404


def test_openapi_schema_lists_the_endpoints(alice):
    response = api_client_for(alice).get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert {
        "/api/v1/auth/token/",
        "/api/v1/projects/{slug}/assignments/",
        "/api/v1/assignments/{assignment_id}/vote/",
    } <= set(paths)


@pytest.mark.django_db
def test_an_api_url_that_matches_no_route_answers_json_404(alice):
    response = api_client_for(alice).post("/api/v1/assignments/false/vote/", {"choice": "left"}, format="json")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not found."}
    assert "text/html" in Client().get("/no-such-page/").headers["Content-Type"]


def vote_and_next(client, assignment: int, **headers):
    return client.post(f"/api/v1/assignments/{assignment}/vote/?next=1", {"choice": "left"}, format="json", **headers)


def test_vote_with_next_answers_the_vote_and_a_real_claim(alice, project):
    client = api_client_for(alice)
    first = claim(client, project).json()
    response = vote_and_next(client, first["assignment"])
    assert response.status_code == 201
    body = response.json()
    assert body["vote"] == Vote.objects.get().pk
    following = body["next"]
    assert set(following) == set(first)  # the claim's shape
    leased = Assignment.objects.get(pk=following["assignment"])
    assert (leased.labeler, leased.status) == (alice, Assignment.Status.OPEN)
    assert leased.expires_at > timezone.now()
    assert leased.comparison_id != Assignment.objects.get(pk=first["assignment"]).comparison_id
    assert (following["left"]["text"], following["right"]["text"]) == (leased.left.text, leased.right.text)
    # The lease it handed out is the one a plain claim now renews.
    assert claim(client, project).json()["assignment"] == following["assignment"]


def test_vote_with_next_is_null_when_nothing_is_left(alice):
    project = make_project(pairs=2)
    client = api_client_for(alice)
    second = vote_and_next(client, claim(client, project).json()["assignment"]).json()["next"]
    response = vote_and_next(client, second["assignment"])
    assert response.status_code == 201
    assert response.json()["next"] is None
    assert claim(client, project).status_code == 204


def test_vote_with_next_replayed_returns_the_same_vote_and_lease(alice, project):
    client = api_client_for(alice)
    assignment = claim(client, project).json()["assignment"]
    first = vote_and_next(client, assignment, HTTP_IDEMPOTENCY_KEY="k1")
    replay = vote_and_next(client, assignment, HTTP_IDEMPOTENCY_KEY="k1")
    assert (first.status_code, replay.status_code) == (201, 200)
    assert replay.json()["vote"] == first.json()["vote"]
    assert replay.json()["next"]["assignment"] == first.json()["next"]["assignment"]
    assert Vote.objects.count() == 1
    assert Assignment.objects.filter(labeler=alice, status=Assignment.Status.OPEN).count() == 1


def test_vote_without_next_answers_only_the_vote(alice, project):
    client = api_client_for(alice)
    assignment = claim(client, project).json()["assignment"]
    response = client.post(f"/api/v1/assignments/{assignment}/vote/?next=0", {"choice": "left"}, format="json")
    assert response.status_code == 201
    assert "next" not in response.json()
    assert not Assignment.objects.filter(labeler=alice, status=Assignment.Status.OPEN).exists()


def test_vote_with_next_refused_claims_nothing(alice, bob):
    project = make_project(pairs=2, overlap=1)
    alices = claim(api_client_for(alice), project).json()["assignment"]
    Assignment.objects.filter(pk=alices).update(expires_at=timezone.now() - timedelta(seconds=1))
    bobs = claim(api_client_for(bob), project).json()["assignment"]
    api_client_for(bob).post(f"/api/v1/assignments/{bobs}/vote/", {"choice": "left"}, format="json")

    response = vote_and_next(api_client_for(alice), alices)
    assert response.status_code == 409
    assert set(response.json()) == {"detail"}
    assert not Assignment.objects.filter(labeler=alice, expires_at__gt=timezone.now()).exists()


def test_vote_with_a_bad_next_is_400_and_casts_nothing(alice, project):
    client = api_client_for(alice)
    assignment = claim(client, project).json()["assignment"]
    response = client.post(f"/api/v1/assignments/{assignment}/vote/?next=maybe", {"choice": "left"}, format="json")
    assert response.status_code == 400
    assert "next" in response.json()
    assert Vote.objects.count() == 0


def test_vote_with_next_claims_nothing_in_a_project_the_labeler_can_no_longer_see(alice):
    from annotation.services import project_access_set

    project = make_project(pairs=3)
    project_access_set(project=project, members_only=True, add=["alice"])
    client = api_client_for(alice)
    assignment = claim(client, project).json()["assignment"]
    client.post(f"/api/v1/assignments/{assignment}/vote/", {"choice": "left"}, format="json", HTTP_IDEMPOTENCY_KEY="k")
    project_access_set(project=project, remove=["alice"])

    replay = vote_and_next(client, assignment, HTTP_IDEMPOTENCY_KEY="k")
    assert replay.status_code == 200
    assert replay.json()["next"] is None
    assert not Assignment.objects.filter(labeler=alice, status=Assignment.Status.OPEN).exists()


@pytest.mark.parametrize(
    "body",
    [
        {"choice": "left"},
        {"choice": "both_bad", "strength": 3},
        {"choice": "tie", "strength": 1},
        {"choice": "right", "strength": True},
        {"choice": "right", "strength": "2"},
        {"choice": "right", "strength": 2.0},
        {"choice": "left", "strength": 4},
        {"choice": "Left"},
        {"choice": "left", "rationale": "  why  ", "flags": ["unsure"]},
    ],
)
def test_the_vote_inputs_shortcut_answers_as_the_serializer(body):
    serializer = VoteAPI.InputSerializer(data=body)
    if serializer.is_valid():
        assert vote_input(body) == serializer.validated_data
    else:
        with pytest.raises(ValidationError) as refused:
            vote_input(body)
        assert refused.value.detail == serializer.errors


@pytest.mark.parametrize(
    "accept",
    [None, "*/*", "application/json", "application/json; indent=4", "text/html", "text/html, */*;q=0.1", "", "*/*, x"],
)
@pytest.mark.parametrize("renderers", [[JSONRenderer], [BrowsableAPIRenderer, JSONRenderer], [BrowsableAPIRenderer]])
def test_the_content_negotiations_shortcut_answers_as_drfs(accept, renderers):
    headers = {} if accept is None else {"HTTP_ACCEPT": accept}
    request = Request(APIRequestFactory().get("/api/v1/", **headers))
    instances = [renderer() for renderer in renderers]

    def answer(negotiation):
        try:
            renderer, media_type = negotiation().select_renderer(request, instances)
        except NotAcceptable:
            return "406"
        return type(renderer), media_type

    assert answer(ContentNegotiation) == answer(DefaultContentNegotiation)


def test_a_claim_that_accepts_only_html_is_406_and_claims_nothing(alice, project):
    response = api_client_for(alice).post(f"/api/v1/projects/{project.slug}/assignments/", HTTP_ACCEPT="text/html")
    assert response.status_code == 406
    assert not Assignment.objects.filter(labeler=alice).exists()
    assert claim(api_client_for(alice), project).status_code == 201


def test_the_labeling_statements_are_prepared_on_a_persistent_connection(alice):
    """DB_PREPARE_THRESHOLD (5): from its fifth run on a connection, PostgreSQL runs a statement
    prepared, without parsing and planning it again."""
    project = make_project(pairs=8)
    client = api_client_for(alice)
    for _ in range(6):
        assignment = claim(client, project).json()["assignment"]
        assert (
            client.post(f"/api/v1/assignments/{assignment}/vote/", {"choice": "left"}, format="json").status_code == 201
        )
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [row[0] for row in cursor.fetchall()]
    for statement in (
        "INSERT INTO annotation_vote",
        "UPDATE annotation_comparison SET vote_count",
        "FOR UPDATE OF c SKIP LOCKED",
    ):
        assert any(statement in text for text in prepared), (statement, prepared)
