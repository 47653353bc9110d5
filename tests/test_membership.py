"""Members-only projects: who sees them and who may label in them, over the API, the pages and
the project_access command."""

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from annotation.models import Assignment
from annotation.services import labeler_create, project_access_set
from tests.factories import PASSWORD, api_client_for, make_project

pytestmark = pytest.mark.django_db

SECRET_NAME = "Secret Launch Evaluation"


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def open_project(db):
    return make_project()


@pytest.fixture
def closed_project(db, alice):
    """Members-only, with alice as its one member; bob is a labeler but not a member."""
    project = make_project()
    project.name = SECRET_NAME
    project.save(update_fields=["name"])
    project_access_set(project=project, members_only=True, add=["alice"])
    return project


@pytest.fixture
def users(alice, bob, admin_user):
    return {"member": alice, "non-member": bob, "admin": admin_user}


# Who may claim and label: everyone in an open project; in a members-only one, members and admins.
MATRIX = [
    ("open", "member", True),
    ("open", "non-member", True),
    ("open", "admin", True),
    ("closed", "member", True),
    ("closed", "non-member", False),
    ("closed", "admin", True),
]


@pytest.fixture
def projects(open_project, closed_project):
    return {"open": open_project, "closed": closed_project}


@pytest.mark.parametrize(("kind", "who", "allowed"), MATRIX)
def test_api_claim_follows_membership(projects, users, kind, who, allowed):
    project, user = projects[kind], users[who]
    response = api_client_for(user).post(f"/api/v1/projects/{project.slug}/assignments/")
    assert response.status_code == (201 if allowed else 404)
    assert Assignment.objects.filter(labeler=user).exists() == allowed
    assert SECRET_NAME not in response.content.decode()


@pytest.mark.parametrize(("kind", "who", "allowed"), MATRIX)
def test_labeling_page_follows_membership(projects, users, kind, who, allowed):
    project, user = projects[kind], users[who]
    client = logged_in(user)
    page = client.get(f"/p/{project.slug}/label/")
    claim = client.post(f"/p/{project.slug}/label/", HTTP_HX_REQUEST="true")
    assert (page.status_code, claim.status_code) == ((200, 200) if allowed else (404, 404))
    assert Assignment.objects.filter(labeler=user).exists() == allowed
    if not allowed:
        assert SECRET_NAME not in page.content.decode() + claim.content.decode()


@pytest.mark.parametrize(("kind", "who", "allowed"), MATRIX)
def test_home_lists_a_project_only_to_those_who_may_label_it(projects, users, kind, who, allowed):
    project = projects[kind]
    html = logged_in(users[who]).get("/").content.decode()
    assert (f"/p/{project.slug}/label/" in html) == allowed
    assert (project.name in html) == allowed


def test_admins_see_which_projects_are_members_only(open_project, closed_project, admin_user):
    html = logged_in(admin_user).get("/").content.decode()
    assert html.count("members only") == 1
    assert html.index(closed_project.slug) < html.index("members only")


def test_non_member_cannot_read_votes_of_a_members_only_project(closed_project, bob, admin_user):
    assert api_client_for(bob).get(f"/api/v1/projects/{closed_project.slug}/votes/").status_code == 404
    assert api_client_for(admin_user).get(f"/api/v1/projects/{closed_project.slug}/votes/").status_code == 200


def test_a_removed_member_can_no_longer_vote_on_a_pair_they_hold(closed_project, alice):
    client = api_client_for(alice)
    assignment = client.post(f"/api/v1/projects/{closed_project.slug}/assignments/").json()["assignment"]
    project_access_set(project=closed_project, remove=["alice"])
    response = client.post(f"/api/v1/assignments/{assignment}/vote/", {"choice": "left"}, format="json")
    assert response.status_code == 404
    page = logged_in(alice).post(f"/assignments/{assignment}/vote/", {"choice": "left"})
    assert page.status_code == 404


def test_closing_a_project_drops_the_leases_of_those_who_can_no_longer_see_it(open_project, alice, bob, admin_user):
    for user in (alice, bob, admin_user):
        assert api_client_for(user).post(f"/api/v1/projects/{open_project.slug}/assignments/").status_code == 201
    project_access_set(project=open_project, members_only=True, add=["alice"])
    holders = set(Assignment.objects.filter(status=Assignment.Status.OPEN).values_list("labeler__username", flat=True))
    assert holders == {"alice", "admin"}


def test_opening_a_project_lets_every_labeler_in_again(closed_project, bob):
    project_access_set(project=closed_project, members_only=False)
    assert api_client_for(bob).post(f"/api/v1/projects/{closed_project.slug}/assignments/").status_code == 201


def test_command_makes_a_project_members_only_and_prints_the_state(open_project, alice, bob, capsys):
    labeler_create(username="carol", password=PASSWORD)
    call_command("project_access", open_project.slug, "--members-only", "--add", "alice", "bob", "carol")
    call_command("project_access", open_project.slug, "--remove", "bob")
    output = capsys.readouterr().out
    open_project.refresh_from_db()
    assert open_project.members_only
    assert sorted(open_project.members.values_list("username", flat=True)) == ["alice", "carol"]
    assert output.splitlines()[-1] == f"{open_project.slug}: members-only; members: alice, carol"


def test_command_opens_a_project(closed_project, capsys):
    call_command("project_access", closed_project.slug, "--open")
    closed_project.refresh_from_db()
    assert not closed_project.members_only
    assert capsys.readouterr().out.strip() == f"{closed_project.slug}: open to every labeler; members: alice"


def test_command_refuses_an_unknown_project():
    with pytest.raises(CommandError, match="No project 'nope'"):
        call_command("project_access", "nope", "--members-only")


def test_command_refuses_unknown_users_and_changes_nothing(open_project, alice):
    with pytest.raises(CommandError, match="no such user: ghost, zed"):
        call_command("project_access", open_project.slug, "--members-only", "--add", "alice", "zed", "ghost")
    open_project.refresh_from_db()
    assert not open_project.members_only and not open_project.members.exists()


def test_command_refuses_members_only_and_open_together(open_project):
    with pytest.raises(CommandError):
        call_command("project_access", open_project.slug, "--members-only", "--open")


def test_dashboard_form_sets_access_and_members(open_project, admin_user, alice, bob):
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    html = client.get(f"/projects/{open_project.slug}/dashboard/").content.decode()
    assert f'action="/projects/{open_project.slug}/access/"' in html
    token = client.cookies["csrftoken"].value
    url = f"/projects/{open_project.slug}/access/"
    assert client.post(url, {"access": "members_only", "add": "alice, bob"}).status_code == 403  # no CSRF token
    response = client.post(url, {"access": "members_only", "add": "alice, bob", "csrfmiddlewaretoken": token})
    assert response.status_code == 302
    client.post(url, {"remove": "bob", "csrfmiddlewaretoken": token})
    open_project.refresh_from_db()
    assert open_project.members_only
    assert list(open_project.members.values_list("username", flat=True)) == ["alice"]
    assert "alice" in client.get(f"/projects/{open_project.slug}/dashboard/").content.decode()


def test_dashboard_form_names_an_unknown_user(open_project, admin_user):
    client = logged_in(admin_user)
    response = client.post(f"/projects/{open_project.slug}/access/", {"add": "ghost"}, follow=True)
    assert "no such user: ghost" in response.content.decode()
    assert not open_project.members.exists()


def test_labelers_cannot_change_access(open_project, alice):
    response = logged_in(alice).post(f"/projects/{open_project.slug}/access/", {"access": "members_only"})
    assert response.status_code == 403
    open_project.refresh_from_db()
    assert not open_project.members_only


def test_admin_sets_access_in_the_django_admin(open_project, admin_user, alice, bob):
    client = logged_in(admin_user)
    url = f"/admin/annotation/project/{open_project.pk}/change/"
    assert 'class="selectfilter"' in client.get(url).content.decode()  # members picked in a two-box filter
    fields = {
        "slug": open_project.slug,
        "name": open_project.name,
        "guidelines": "",
        "overlap": open_project.overlap,
        "lease_seconds": open_project.lease_seconds,
        "gold_rate": open_project.gold_rate,
        "gold_min_accuracy": "",
        "constitution": "",
        "constitution_mode": "all",
        "ai_votes": "count",
    }
    response = client.post(url, {**fields, "members_only": "on", "members": [alice.pk]})
    assert response.status_code == 302
    open_project.refresh_from_db()
    assert open_project.members_only and list(open_project.members.all()) == [alice]
    assert api_client_for(bob).post(f"/api/v1/projects/{open_project.slug}/assignments/").status_code == 404
    assert "column-members_only" in client.get("/admin/annotation/project/").content.decode()
