"""Who may call what: admins everything; labelers only labeling and their own votes; outsiders nothing."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from rest_framework.test import APIClient

from tests.factories import api_client_for, label_all, make_project

pytestmark = pytest.mark.django_db

PAIR = b'{"prompt": "Say hi", "response_a": "Hi!", "response_b": "Hello."}\n'


def calls(project) -> dict[str, tuple[str, str, dict]]:
    return {
        "claim": ("post", f"/api/v1/projects/{project.slug}/assignments/", {}),
        "export": ("get", f"/api/v1/projects/{project.slug}/export/", {}),
        "agreement": ("get", f"/api/v1/projects/{project.slug}/agreement/", {}),
        "import": ("post", f"/api/v1/projects/{project.slug}/import/", {"file": SimpleUploadedFile("p.jsonl", PAIR)}),
        "own votes": ("get", f"/api/v1/projects/{project.slug}/votes/", {}),
        "bob's votes": ("get", f"/api/v1/projects/{project.slug}/votes/", {"labeler": "bob"}),
    }


EXPECTED = {
    "admin": {"claim": 201, "export": 200, "agreement": 200, "import": 201, "own votes": 200, "bob's votes": 200},
    "alice": {"claim": 201, "export": 403, "agreement": 403, "import": 403, "own votes": 200, "bob's votes": 403},
    "charlie": {"claim": 403, "export": 403, "agreement": 403, "import": 403, "own votes": 403, "bob's votes": 403},
    "anonymous": {"claim": 401, "export": 401, "agreement": 401, "import": 401, "own votes": 401, "bob's votes": 401},
}


@pytest.mark.parametrize("who", EXPECTED)
def test_permission_matrix(who, project, alice, bob, admin_user, charlie):
    users = {"admin": admin_user, "alice": alice, "charlie": charlie}
    client = api_client_for(users[who]) if who in users else APIClient()
    for name, (method, url, data) in calls(project).items():
        response = getattr(client, method)(url, data, **({"format": "multipart"} if name == "import" else {}))
        assert response.status_code == EXPECTED[who][name], (who, name, response.status_code)


def test_the_openapi_schema_is_valid_and_complete(tmp_path):
    out = tmp_path / "schema.yml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    text = out.read_text()
    for path in ("/agreement/", "/export/", "/import/", "/votes/", "/assignments/", "/auth/token/"):
        assert path in text


def test_votes_api_pages_by_vote_id(admin_user, alice):
    project = make_project(pairs=5, overlap=1)
    label_all(project, [alice], lambda labeler, comparison: "a")
    client = api_client_for(admin_user)
    first = client.get(f"/api/v1/projects/{project.slug}/votes/", {"labeler": "alice", "limit": 3}).json()
    assert len(first["results"]) == 3 and first["next"] == first["results"][-1]["vote"]
    rest = client.get(f"/api/v1/projects/{project.slug}/votes/", {"labeler": "alice", "after": first["next"]}).json()
    assert len(rest["results"]) == 2 and rest["next"] is None
    missing = client.get(f"/api/v1/projects/{project.slug}/votes/", {"labeler": "nobody"})
    assert missing.status_code == 404
