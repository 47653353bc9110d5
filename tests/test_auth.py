"""Login throttling (django-axes) on the page and the token endpoint, token revocation and expiry,
password reset only with mail, and the schema behind a login."""

import importlib
from datetime import timedelta

import pytest
from django.test import Client, override_settings
from django.urls import clear_url_caches
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

import config.urls
from tests.factories import PASSWORD, api_client_for, make_project

pytestmark = pytest.mark.django_db

LIMIT = 5  # FLYWHEEL_LOGIN_FAILURE_LIMIT's default, which the test settings keep


def page_login(username, password, address="10.0.0.1"):
    return Client().post("/accounts/login/", {"username": username, "password": password}, REMOTE_ADDR=address)


def token_request(username, password, address="10.0.0.1"):
    return APIClient().post(
        "/api/v1/auth/token/", {"username": username, "password": password}, format="json", REMOTE_ADDR=address
    )


def claim(client):
    return client.post(f"/api/v1/projects/{make_project(pairs=1).slug}/assignments/")


def test_login_page_locks_out_a_user_after_the_failure_limit(alice):
    for _ in range(LIMIT - 1):
        assert page_login("alice", "wrong").status_code == 200
    response = page_login("alice", "wrong")
    assert response.status_code == 429
    assert "Too many failed logins" in response.content.decode()
    # Locked out even with the right password, and from another address: the lock is on the username.
    assert page_login("alice", PASSWORD, address="10.0.0.2").status_code == 429


def test_login_page_locks_out_an_address_guessing_many_usernames(alice, bob):
    for number in range(LIMIT):
        page_login(f"nobody{number}", "wrong", address="10.0.0.9")
    assert page_login("bob", PASSWORD, address="10.0.0.9").status_code == 429
    assert page_login("bob", PASSWORD, address="10.0.0.10").status_code == 302


def test_login_page_success_under_the_limit_still_logs_in(alice):
    for _ in range(LIMIT - 1):
        page_login("alice", "wrong")
    response = page_login("alice", PASSWORD)
    assert response.status_code == 302 and response["Location"] == "/"


def test_token_endpoint_locks_out_a_user_with_a_json_429(alice):
    for _ in range(LIMIT - 1):
        assert token_request("alice", "wrong").status_code == 400
    response = token_request("alice", "wrong")
    assert response.status_code == 429
    body = response.json()
    assert "Too many failed logins" in body["detail"]
    assert body["retry_after_seconds"] == 15 * 60 == int(response["Retry-After"])
    assert token_request("alice", PASSWORD, address="10.0.0.2").status_code == 429


def test_token_endpoint_locks_out_an_address(alice, bob):
    for number in range(LIMIT):
        token_request(f"nobody{number}", "wrong", address="10.0.0.9")
    assert token_request("bob", PASSWORD, address="10.0.0.9").status_code == 429
    assert token_request("bob", PASSWORD, address="10.0.0.10").status_code == 200


def test_a_username_longer_than_any_account_is_a_400_naming_the_field(alice):
    response = token_request("a" * 300, "wrong")
    assert response.status_code == 400
    assert response.json() == {"username": ["Ensure this field has no more than 150 characters."]}


def test_token_endpoint_success_under_the_limit(alice):
    for _ in range(LIMIT - 1):
        token_request("alice", "wrong")
    assert token_request("alice", PASSWORD).json()["token"]


def test_delete_revokes_the_callers_token(alice, bob):
    client, bobs_client = api_client_for(alice), api_client_for(bob)
    assert client.delete("/api/v1/auth/token/").status_code == 204
    assert claim(client).status_code == 401
    assert claim(bobs_client).status_code == 201
    assert APIClient().delete("/api/v1/auth/token/").status_code == 401


@override_settings(FLYWHEEL_TOKEN_LIFETIME_HOURS=24)
def test_a_token_older_than_its_lifetime_is_refused_and_a_new_login_renews_it(alice):
    client = api_client_for(alice)
    Token.objects.filter(user=alice).update(created=timezone.now() - timedelta(hours=24, minutes=1))
    assert claim(client).status_code == 401
    fresh = token_request("alice", PASSWORD).json()["token"]
    assert fresh != client._credentials["HTTP_AUTHORIZATION"].split()[1]
    client.credentials(HTTP_AUTHORIZATION=f"Token {fresh}")
    assert claim(client).status_code == 201


def test_changing_the_password_revokes_tokens(alice):
    client = api_client_for(alice)
    browser = Client()
    browser.force_login(alice)
    response = browser.post(
        "/accounts/password_change/",
        {"old_password": PASSWORD, "new_password1": "another-long-password", "new_password2": "another-long-password"},
    )
    assert response.status_code == 302
    assert claim(client).status_code == 401


def test_set_password_anywhere_revokes_tokens(alice):
    client = api_client_for(alice)
    alice.set_password("another-long-password")
    alice.save()
    assert claim(client).status_code == 401


@pytest.mark.parametrize(
    "path", ["/accounts/password_reset/", "/accounts/password_reset/done/", "/accounts/reset/done/"]
)
def test_password_reset_pages_are_off_without_mail(client, path):
    assert client.get(path).status_code == 404


@pytest.fixture
def urls_with_mail(settings):
    """config.urls rebuilt as it is at start-up with EMAIL_HOST set, and rebuilt back afterwards."""
    settings.EMAIL_HOST = "smtp.example.org"
    importlib.reload(config.urls)
    clear_url_caches()
    yield
    settings.EMAIL_HOST = ""
    importlib.reload(config.urls)
    clear_url_caches()


def test_password_reset_pages_are_served_when_mail_is_configured(client, urls_with_mail):
    assert client.get("/accounts/password_reset/").status_code == 200


def test_login_logout_and_password_change_pages_remain(client, alice):
    assert client.get("/accounts/login/").status_code == 200
    client.force_login(alice)
    assert client.get("/accounts/password_change/").status_code == 200
    assert client.post("/accounts/logout/").status_code == 302


def test_schema_needs_a_login(alice):
    assert APIClient().get("/api/schema/").status_code == 401
    assert api_client_for(alice).get("/api/schema/").status_code == 200
    browser = Client()
    browser.force_login(alice)
    assert browser.get("/api/schema/").status_code == 200
