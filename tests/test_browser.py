"""A real headless Chromium (Debian's package, driven by Playwright) against the live server."""

import shutil

import pytest
from django.db import connections
from playwright.sync_api import Page, expect, sync_playwright

from annotation.importing import PairRecord
from annotation.models import Vote
from annotation.services import labeler_create, pairs_import, project_get_or_create
from tests.factories import PASSWORD, make_project
from tests.xss_payloads import PAYLOADS

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Reports every Content-Security-Policy violation: there should be none at all, since nothing in
# a sanitized page even tries to run inline script or load a foreign resource.
WATCH_VIOLATIONS = """
window.__violations = [];
document.addEventListener('securitypolicyviolation',
    e => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));
"""


@pytest.fixture
def page(live_server, monkeypatch):
    # Playwright's sync API runs an event loop in this thread; the ORM calls of the test itself
    # are still plain synchronous code.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    if not shutil.which("chromium") and not shutil.which(CHROMIUM):
        pytest.fail("Chromium is not installed: `apt-get install chromium` (make test does it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.add_init_script(WATCH_VIOLATIONS)
        page = context.new_page()
        page.dialogs = []  # type: ignore[attr-defined]  # the test's own record, kept on the page it watches
        page.requests = []  # type: ignore[attr-defined]  # likewise
        page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
        page.on("request", lambda request: page.requests.append(request.url))
        yield page
        browser.close()
        # Inside Playwright's greenlet the ORM used connections of its own; close them here.
        connections.close_all()


def log_in(page: Page, live_server, username: str) -> None:
    page.goto(f"{live_server.url}/accounts/login/")
    # Autofocus lands at the first rendering after "load": on a busy machine, typing can come first.
    page.locator("#id_username").focus()
    page.keyboard.type(username)
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{live_server.url}/")


def current_assignment(page: Page) -> str:
    assignment = page.locator("#pair").get_attribute("data-assignment")
    assert assignment is not None, "no pair on the page"
    return assignment


def test_labeler_labels_five_pairs_with_the_keyboard_alone(page, live_server):
    project = make_project(pairs=6)
    alice = labeler_create(username="alice", password=PASSWORD)
    log_in(page, live_server, "alice")
    page.goto(f"{live_server.url}/p/{project.slug}/label/")
    expect(page.locator("#vote-form")).to_be_visible()  # a GET claims nothing: htmx posts for the first pair

    keys = [("1", "q", "left", 1), ("2", "w", "right", 2), ("3", "e", "tie", 3), ("4", "q", "both_bad", 1),
            ("2", "e", "right", 3)]  # fmt: skip
    seen = []
    for choice_key, strength_key, _, _ in keys:
        before = current_assignment(page)
        seen.append(int(before))
        page.keyboard.press(choice_key)
        page.keyboard.press(strength_key)
        if choice_key == "3":
            page.keyboard.press("r")
            page.keyboard.type("Both say the same thing.")
            page.keyboard.press("Escape")
        page.keyboard.press("Enter")
        expect(page.locator("#pair")).not_to_have_attribute("data-assignment", before)
        assert "Vote saved." in page.locator("#pair .notice").inner_text()

    votes = {vote.assignment_id: vote for vote in Vote.objects.filter(labeler=alice).select_related("assignment")}
    assert sorted(votes) == sorted(seen)
    for assignment_id, (_, _, screen_choice, strength) in zip(seen, keys, strict=True):
        vote = votes[assignment_id]
        shown_right = vote.comparison.response_b_id if vote.assignment.left_is_a else vote.comparison.response_a_id
        expected_winner = {"left": vote.shown_left_id, "right": shown_right}.get(screen_choice)
        assert (vote.winner_id, vote.strength) == (expected_winner, strength)
        assert vote.time_spent_ms > 0
    assert votes[seen[2]].rationale == "Both say the same thing."
    # The page never reloaded: htmx swapped each pair in, so the violation log survived.
    assert page.evaluate("window.__violations") == []


def test_hostile_markdown_runs_nothing_and_fetches_nothing(page, live_server):
    project = project_get_or_create(slug="hostile", overlap=1)
    chunks = [PAYLOADS[i : i + 3] for i in range(0, len(PAYLOADS), 3)]
    records = [
        PairRecord(
            line=index,
            prompt=chunk[0],
            response_a=chunk[1 % len(chunk)] + f"\n\npair {index} a",
            response_b=chunk[2 % len(chunk)] + f"\n\npair {index} b",
        )
        for index, chunk in enumerate(chunks)
    ]
    pairs_import(project=project, records=records)
    labeler_create(username="bob", password=PASSWORD)
    log_in(page, live_server, "bob")

    page.goto(f"{live_server.url}/p/hostile/label/")
    expect(page.locator("#vote-form")).to_be_visible()  # a GET claims nothing: htmx posts for the first pair
    for _ in records:
        before = current_assignment(page)
        page.locator("#response-left").hover()
        page.locator("#response-right").hover()
        assert page.evaluate("window.__xss") is None
        page.keyboard.press("3")
        page.keyboard.press("Enter")
        expect(page.locator("#pair")).not_to_have_attribute("data-assignment", before)
    assert "Nothing left for you" in page.locator("#pair").inner_text()

    assert page.evaluate("window.__xss") is None
    assert page.dialogs == []
    assert page.evaluate("window.__violations") == []
    foreign = [url for url in page.requests if not url.startswith(live_server.url)]
    assert foreign == []
    allowed_paths = ("/static/", "/p/hostile/label/", "/assignments/", "/accounts/login/", "/favicon")
    assert [url for url in page.requests if not url.removeprefix(live_server.url).startswith(allowed_paths)] == [
        f"{live_server.url}/"
    ]
    assert Vote.objects.count() == len(records)
