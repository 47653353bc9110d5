"""The admin pages: figures, sortable labeler table, review queue and adjudication, upload import."""

import re

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from annotation.models import AggregatedLabel, Comparison
from annotation.services import agreement_refresh, labeler_create
from tests.factories import PASSWORD, label_all, make_project

pytestmark = pytest.mark.django_db


@pytest.fixture
def voted():
    project = make_project(pairs=6, overlap=3)
    labelers = [labeler_create(username=name, password=PASSWORD) for name in ("ann", "ben", "cat")]
    # ann and ben agree on everything; cat disagrees on the even pairs: those are split 2-1.
    label_all(project, labelers, lambda labeler, c: "b" if labeler.username == "cat" and c.pk % 2 == 0 else "a")
    agreement_refresh(project_id=project.pk)
    return project


def as_user(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_dashboard_shows_the_figures_and_the_charts(voted, admin_user):
    html = as_user(admin_user).get(f"/projects/{voted.slug}/dashboard/").content.decode()
    assert "Krippendorff" in html and "Fleiss" in html
    assert re.search(r"<strong>18</strong>", html)  # votes
    assert html.count("<polyline") >= 1 and "Agreement over time" in html
    for name in ("ann", "ben", "cat"):
        assert f"<td>{name}</td>" in html


def test_labeler_table_sorts_by_any_column_and_htmx_gets_only_the_table(voted, admin_user):
    client = as_user(admin_user)
    ascending = client.get(f"/projects/{voted.slug}/dashboard/", {"sort": "agreement", "dir": "asc"}).content.decode()
    names = re.findall(r"<td>(ann|ben|cat)</td>", ascending)
    assert names[0] == "cat"
    fragment = client.get(
        f"/projects/{voted.slug}/dashboard/", {"sort": "username", "dir": "desc"}, HTTP_HX_REQUEST="true"
    )
    text = fragment.content.decode()
    assert text.lstrip().startswith('<section id="labelers"') and "<html" not in text
    assert re.findall(r"<td>(ann|ben|cat)</td>", text) == ["cat", "ben", "ann"]
    assert "HX-Request" in fragment["Vary"]


def test_review_queue_lists_split_pairs_and_adjudication_settles_them(voted, admin_user):
    client = as_user(admin_user)
    html = client.get(f"/projects/{voted.slug}/review/").content.decode()
    split = [c.pk for c in Comparison.objects.filter(project=voted) if c.pk % 2 == 0]
    assert sorted(int(pk) for pk in re.findall(r'id="review-(\d+)"', html)) == sorted(split)
    response = client.post(f"/comparisons/{split[0]}/adjudicate/", {"choice": "tie"}, HTTP_HX_REQUEST="true")
    assert "Final label: tie" in response.content.decode()
    assert AggregatedLabel.objects.get(comparison_id=split[0]).final_choice == "tie"
    assert f'id="review-{split[0]}"' not in client.get(f"/projects/{voted.slug}/review/").content.decode()


def test_upload_import_reports_bad_lines_and_writes_nothing(voted, admin_user):
    client = as_user(admin_user)
    before = Comparison.objects.count()
    bad = SimpleUploadedFile("pairs.jsonl", b'{"prompt": "x", "response_a": "a", "response_b": "b"}\n{oops\n')
    response = client.post(f"/projects/{voted.slug}/import/", {"file": bad}, HTTP_HX_REQUEST="true")
    assert "line 2: invalid JSON" in response.content.decode()
    assert Comparison.objects.count() == before
    good = SimpleUploadedFile("pairs.jsonl", b'{"prompt": "x", "response_a": "a", "response_b": "b"}\n')
    response = client.post(f"/projects/{voted.slug}/import/", {"file": good}, HTTP_HX_REQUEST="true")
    assert "1 comparisons created" in response.content.decode()


def test_admin_pages_are_for_admins_only(voted, alice, charlie):
    comparison = Comparison.objects.filter(project=voted).first()
    for user in (alice, charlie):
        client = as_user(user)
        assert client.get(f"/projects/{voted.slug}/dashboard/").status_code == 403
        assert client.get(f"/projects/{voted.slug}/review/").status_code == 403
        assert client.post(f"/comparisons/{comparison.pk}/adjudicate/", {"choice": "a"}).status_code == 403
        assert client.post(f"/projects/{voted.slug}/import/").status_code == 403
    assert not AggregatedLabel.objects.exclude(adjudicated_choice="").exists()
