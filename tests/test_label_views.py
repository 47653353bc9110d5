"""The labeling page: htmx and plain-form flows, CSRF, permissions, security headers."""

import re

import pytest
from django.test import Client

from annotation.models import Assignment, Vote
from annotation.services import assignment_claim
from tests.factories import make_project

pytestmark = pytest.mark.django_db


def logged_in(user, **kwargs) -> Client:
    client = Client(**kwargs)
    client.force_login(user)
    return client


def vote_url(html: str) -> str:
    found = re.search(r'action="(/assignments/\d+/vote/)"', html)
    assert found, "the page has no vote form"
    return found.group(1)


def start_labeling(client: Client, project) -> str:
    """What a browser without JavaScript does: open the page, press "Start labeling" (a POST with the
    page's CSRF token), follow the redirect to the page that shows the claimed pair."""
    html = client.get(f"/p/{project.slug}/label/").content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html)
    assert token, "the page has no start form"
    response = client.post(f"/p/{project.slug}/label/", {"csrfmiddlewaretoken": token.group(1)})
    assert response.status_code == 302 and response["Location"] == f"/p/{project.slug}/label/"
    return client.get(response["Location"]).content.decode()


def test_label_page_shows_prompt_and_both_responses(alice, project):
    client = logged_in(alice)
    start_labeling(client, project)
    response = client.get(f"/p/{project.slug}/label/")
    html = response.content.decode()
    assignment = Assignment.objects.get(labeler=alice)
    assert response.status_code == 200
    assert html.index(assignment.left.text) < html.index(assignment.right.text)
    assert assignment.comparison.prompt.text in html
    assert 'Left for you here: <strong id="remaining">5</strong>' in html


def test_a_get_of_the_labeling_page_claims_nothing(alice, project):
    response = logged_in(alice).get(f"/p/{project.slug}/label/")
    html = response.content.decode()
    assert response.status_code == 200
    assert not Assignment.objects.exists()
    # htmx posts the start form as soon as the page loads; without JavaScript, the button does.
    start = re.search(r'<form id="start-form"[^>]*>', html).group(0)
    assert f'method="post" action="/p/{project.slug}/label/"' in start
    assert f'hx-post="/p/{project.slug}/label/"' in start and 'hx-trigger="load, submit"' in start
    assert "Start labeling" in html and "vote-form" not in html


def test_a_get_shows_the_lease_the_labeler_holds_without_renewing_it(alice, project):
    held = assignment_claim(project=project, labeler=alice)
    client = logged_in(alice)
    first, second = (client.get(f"/p/{project.slug}/label/").content.decode() for _ in range(2))
    assert vote_url(first) == vote_url(second) == f"/assignments/{held.pk}/vote/"
    assert Assignment.objects.get().expires_at == held.expires_at
    assert "start-form" not in first


def test_htmx_post_claims_and_swaps_in_the_pair(alice, project):
    response = logged_in(alice).post(f"/p/{project.slug}/label/", HTTP_HX_REQUEST="true")
    fragment = response.content.decode()
    assert response.status_code == 200
    assert fragment.lstrip().startswith('<section id="pair"') and "<html" not in fragment
    assert vote_url(fragment) == f"/assignments/{Assignment.objects.get(labeler=alice).pk}/vote/"


def test_start_labeling_needs_the_csrf_token(alice, project):
    response = logged_in(alice, enforce_csrf_checks=True).post(f"/p/{project.slug}/label/")
    assert response.status_code == 403
    assert not Assignment.objects.exists()


def test_plain_form_vote_redirects_to_the_next_pair(alice, project):
    client = logged_in(alice)
    html = start_labeling(client, project)
    response = client.post(vote_url(html), {"choice": "tie", "strength": "2", "rationale": " same ", "flags": "unsure"})
    assert response.status_code == 302 and response["Location"] == f"/p/{project.slug}/label/"
    vote = Vote.objects.get()
    assert (vote.choice, vote.strength, vote.rationale, vote.flags) == ("tie", 2, "same", ["unsure"])
    next_page = client.get(response["Location"]).content.decode()
    assert "Vote saved." in next_page and vote_url(next_page) != vote_url(html)


def test_htmx_vote_swaps_in_the_next_pair_fragment(alice, project):
    client = logged_in(alice)
    html = start_labeling(client, project)
    response = client.post(vote_url(html), {"choice": "left", "time_spent_ms": "4321"}, HTTP_HX_REQUEST="true")
    fragment = response.content.decode()
    assert response.status_code == 200
    assert "HX-Request" in response["Vary"]
    assert fragment.lstrip().startswith('<section id="pair"') and "<html" not in fragment
    assert "Vote saved." in fragment and vote_url(fragment) != vote_url(html)
    assert Vote.objects.get().time_spent_ms == 4321


def test_vote_without_choice_shows_an_error_and_keeps_the_pair(alice, project):
    client = logged_in(alice)
    html = start_labeling(client, project)
    response = client.post(vote_url(html), {"strength": "1"})
    assert response.status_code == 400
    assert "Pick left, right, tie or both bad first." in response.content.decode()
    assert Vote.objects.count() == 0


def test_browser_vote_without_csrf_token_is_refused(alice, project):
    client = logged_in(alice, enforce_csrf_checks=True)
    html = start_labeling(client, project)
    assert client.post(vote_url(html), {"choice": "left"}).status_code == 403
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html).group(1)
    assert client.post(vote_url(html), {"choice": "left", "csrfmiddlewaretoken": token}).status_code == 302
    assert Vote.objects.count() == 1


def test_htmx_requests_carry_the_csrf_token_in_a_header(alice, project):
    client = logged_in(alice, enforce_csrf_checks=True)
    html = start_labeling(client, project)
    header = re.search(
        r"hx-headers='\{&quot;X-CSRFToken&quot;: &quot;([^&]+)&quot;\}'|hx-headers='\{\"X-CSRFToken\": \"([^\"]+)\"\}'",
        html,
    )
    token = header.group(1) or header.group(2)
    response = client.post(vote_url(html), {"choice": "left"}, HTTP_HX_REQUEST="true", HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 200 and Vote.objects.count() == 1


def test_skip_moves_on(alice, project):
    client = logged_in(alice)
    html = start_labeling(client, project)
    skip_url = re.search(r'action="(/assignments/\d+/skip/)"', html).group(1)
    client.post(skip_url)
    assert Assignment.objects.get(labeler=alice, status=Assignment.Status.SKIPPED)
    assert vote_url(client.get(f"/p/{project.slug}/label/").content.decode()) != vote_url(html)


def test_labeler_cannot_vote_on_or_skip_another_labelers_assignment(alice, bob, project):
    html = start_labeling(logged_in(alice), project)
    other = logged_in(bob)
    assert other.post(vote_url(html), {"choice": "left"}).status_code == 404
    assert other.post(vote_url(html).replace("vote", "skip")).status_code == 404
    assert Vote.objects.count() == 0
    assert not Assignment.objects.filter(status=Assignment.Status.SKIPPED).exists()


def test_outsider_is_refused_and_anonymous_sent_to_login(charlie, project):
    assert logged_in(charlie).get(f"/p/{project.slug}/label/").status_code == 403
    response = Client().get(f"/p/{project.slug}/label/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_done_message_when_nothing_is_left(alice):
    project = make_project(pairs=0)
    assert "Nothing left for you" in logged_in(alice).get(f"/p/{project.slug}/label/").content.decode()


def test_pages_forbid_inline_script_and_foreign_resources(alice, project):
    response = logged_in(alice).get(f"/p/{project.slug}/label/")
    policy = response["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert "img-src 'self'" in policy and "default-src 'self'" in policy
    html = response.content.decode()
    assert re.findall(r"<script(?![^>]*\bsrc=\"/static/)", html) == []
    assert "cdn" not in html.lower()


def test_labelers_cannot_open_the_admin_where_votes_are_listed(alice, admin_user, project):
    response = logged_in(alice).get("/admin/annotation/vote/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    assert logged_in(admin_user).get("/admin/annotation/vote/").status_code == 200
