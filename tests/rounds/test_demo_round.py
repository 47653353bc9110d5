"""The newcomer's flywheel on the embedded default (SQLite and the broker folder under var/, no
PostgreSQL, no Redis): `seed_demo --simulate`, the stack of `make demo` (scripts/run-stack: web,
workers, beat), a round started in a real Chromium and labeled by keyboard, `run_round --wait`, and
a worker killed in the middle of a round. Tiny models stand in for the packaged ones
(bench/demo_round.py times the real thing)."""

import json
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.factories import PASSWORD, TINY
from tests.test_browser import CHROMIUM, CHROMIUM_FLAGS
from tests.test_browser import log_in as browser_log_in
from tests.workers import ROOT, clean_environment, manage

PPO = {"batch_size": 8, "minibatches": 2, "learning_rate": 1e-3, "checkpoint_every": 2, "temperature": 1.0}
TINY_DEMO = """
from annotation.models import Project
from rounds.models import TrainingSettings
Project.objects.filter(slug="demo").update(overlap=1)  # one vote closes a round's pair
TrainingSettings.objects.filter(project__slug="demo").update(
    policy={policy!r}, reward_overrides={reward!r}, optimizer_overrides={optimizer!r}
)
"""


@pytest.fixture(scope="module")
def seeded_demo(tmp_path_factory, tiny_policy, tiny_backbone) -> Path:
    """A var dir with the demo seeded and labeled by `seed_demo --simulate` over HTTP, its training
    settings switched to the tiny models; each test works on a copy."""
    var = tmp_path_factory.mktemp("demo-var")
    env = embedded(var)
    assert manage("migrate", "-v0", env=env).returncode == 0
    seeded = manage("seed_demo", "--password", PASSWORD, "--simulate", env=env)
    assert seeded.returncode == 0, seeded.stderr
    assert "300 simulated votes" in seeded.stdout, seeded.stdout
    optimizer = {"max_new_tokens": 8, "max_prompt_length": 48, "reward_max_length": 32, "ppo": {**PPO, "steps": 8}}
    script = TINY_DEMO.format(policy=tiny_policy, reward={"backbone": tiny_backbone, **TINY}, optimizer=optimizer)
    tuned = manage("shell", "-c", script, env=env)
    assert tuned.returncode == 0, tuned.stderr
    return var


@pytest.fixture
def var(seeded_demo, tmp_path) -> Path:
    copy = tmp_path / "var"
    shutil.copytree(seeded_demo, copy, ignore=shutil.ignore_patterns("broker"))
    return copy


def embedded(var: Path) -> dict[str, str]:
    # A short debounce: the last vote's agreement refresh, which closes the round, comes a second later.
    return {"DEBUG": "1", "FLYWHEEL_VAR_DIR": str(var), "ARTIFACTS_DIR": str(var / "artifacts"),
            "FLYWHEEL_AGREEMENT_DEBOUNCE_SECONDS": "1"}  # fmt: skip


def rounds(var: Path) -> list[tuple]:
    with sqlite3.connect(var / "flywheel.sqlite3") as db:
        return db.execute(
            "SELECT number, state, step, attempts, samples FROM rounds_traininground ORDER BY number"
        ).fetchall()


def processes_of(var: Path) -> list[int]:
    """The processes whose environment names this var dir."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"FLYWHEEL_VAR_DIR={var}\0".encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


@contextmanager
def stack(var: Path) -> Iterator[str]:
    """`scripts/run-stack`, as make demo starts it; stopped with Ctrl-C (SIGINT) at the end."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "scripts/run-stack", "--port", str(port)], cwd=ROOT,
        env={**clean_environment(), **embedded(var)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/accounts/login/", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise AssertionError(process.communicate()[0][-3000:]) from None
            time.sleep(0.5)
    try:
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=60)[0]
        assert process.returncode == 0, output[-3000:]
        assert processes_of(var) == [], "run-stack left processes behind"


@contextmanager
def browser() -> Iterator[Page]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium.new_context(viewport={"width": 1280, "height": 900}).new_page()
        chromium.close()


def log_in(page: Page, url: str, username: str) -> None:
    page.context.clear_cookies()  # whoever was logged in before
    browser_log_in(page, SimpleNamespace(url=url), username)


@pytest.mark.browser
def test_an_admin_watches_a_round_that_a_labeler_then_closes_by_keyboard(var):
    with stack(var) as url, browser() as page:
        log_in(page, url, "admin")
        page.goto(f"{url}/projects/demo/rounds/")
        started = time.monotonic()
        with page.expect_response(lambda response: "/rounds/start/" in response.url):
            page.get_by_role("button", name="Start round").click()
        click_s = time.monotonic() - started
        assert click_s < 1.0, f"the start button took {click_s:.2f} s"  # the worker trains, not the request
        # The table polls itself: the phases go by with their progress, then the round is labeling.
        seen = set()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            cell = page.locator("#rounds td.progress").first.inner_text(timeout=10_000)
            seen.add(cell)
            if cell.startswith("labeling"):
                break
            time.sleep(0.3)
        assert any(re.match(r"(reward model|PPO steps)", text) for text in seen), seen
        assert any(text.startswith("labeling") for text in seen), (seen, rounds(var))
        (number, state, _, _, samples), = rounds(var)  # fmt: skip
        assert state == "labeling" and samples > 0

        # A labeler's queue now holds the round's pairs, new policy against the previous one.
        log_in(page, url, "alice")
        page.goto(f"{url}/p/demo/label/")
        pair, done = page.locator("#vote-form"), page.get_by_text("Nothing left for you")
        labeled = 0
        while True:
            expect(pair.or_(done)).to_be_visible()  # htmx claims the first pair once the page is loaded
            if done.is_visible():
                break
            before = page.locator("#pair").get_attribute("data-assignment")
            page.keyboard.press("1" if labeled % 2 else "2")
            page.keyboard.press("Enter")
            expect(page.locator("#pair")).not_to_have_attribute("data-assignment", before or "")
            labeled += 1
        with sqlite3.connect(var / "flywheel.sqlite3") as db:
            voted = db.execute(
                "SELECT c.origin, c.round FROM annotation_vote v JOIN annotation_comparison c ON c.id = v.comparison_id"
                " JOIN auth_user u ON u.id = v.labeler_id WHERE u.username = 'alice'"
            ).fetchall()
        assert labeled == samples and voted == [("round_sample", number)] * samples, (labeled, voted)

        # Agreement is refreshed a second after the last vote, which closes the round with its win rate.
        log_in(page, url, "admin")
        page.goto(f"{url}/projects/demo/rounds/{number}/")
        expect(page.locator("h1")).to_contain_text("done", timeout=120_000)
        win_rate = page.locator(".card", has_text="Human win rate").locator("strong")
        expect(win_rate).to_have_text(re.compile(r"^[01]\.\d{3}$"))
        page.goto(f"{url}/projects/demo/rounds/")
        assert "round 1 (ppo)" in page.content()  # the cross-round charts show it


def set_ppo(env: dict[str, str], ppo: dict) -> None:
    script = ("from rounds.models import TrainingSettings as T; s = T.objects.get(project__slug='demo'); "
              f"s.optimizer_overrides['ppo'] = {ppo!r}; s.save()")  # fmt: skip
    result = manage("shell", "-c", script, env=env)
    assert result.returncode == 0, result.stderr


def test_run_round_waits_prints_its_json_line_and_fails_loudly(var):
    env = embedded(var)
    set_ppo(env, {"stepz": 3})
    # No worker runs: after the take-over delay the command runs the round itself.
    failed = manage("run_round", "demo", "--wait", "--take-over-after", "1", env=env, timeout=300)
    assert failed.returncode != 0
    assert "round 1 failed: ValueError: unknown PPO setting 'stepz'" in failed.stderr, failed.stderr
    assert json.loads(failed.stdout.splitlines()[-1])["state"] == "failed"

    set_ppo(env, {**PPO, "steps": 4})
    result = manage("run_round", "demo", "--wait", "--take-over-after", "1", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.splitlines()[-1])
    assert set(line) == {"round", "state", "algorithm", "pairs", "proxy_reward", "kl", "mean_length", "seconds"}
    assert line["round"] == 2 and line["state"] == "labeling" and line["algorithm"] == "ppo"
    assert line["pairs"] > 0 and line["seconds"] > 0
    assert all(isinstance(line[key], float) for key in ("proxy_reward", "kl", "mean_length"))
    assert "running it in this process" in result.stderr
    # Progress on stderr, polled each second; each training phase's final count even when the
    # phase ended between two polls (on a fast machine the tiny PPO does), then the end.
    assert re.search(r"^reward model v1 (\d+)/\1$", result.stderr, re.MULTILINE), result.stderr
    assert re.search(r"^PPO steps 4/4$", result.stderr, re.MULTILINE), result.stderr
    assert "round 2: labeling" in result.stderr
    assert rounds(var)[-1][1:2] == ("labeling",)


def test_a_worker_killed_mid_round_is_replaced_and_the_round_finishes(var):
    env = embedded(var)
    set_ppo(env, {**PPO, "steps": 40})

    def worker() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "config", "worker", "--queues", "gpu,default", "--pool", "solo",
             "--without-mingle", "--without-gossip"], cwd=ROOT, env={**clean_environment(), **env},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    doomed = worker()
    try:
        opened = manage("run_round", "demo", env=env)  # no --wait: the worker takes it from the broker folder
        assert opened.returncode == 0, opened.stderr
        deadline = time.monotonic() + 300
        mid_ppo = lambda: rounds(var) and rounds(var)[0][1] == "training_policy" and rounds(var)[0][2] >= 4  # noqa: E731
        while time.monotonic() < deadline and not mid_ppo():
            time.sleep(0.2)
        assert mid_ppo(), rounds(var)
    finally:
        doomed.send_signal(signal.SIGKILL)  # no warm shutdown: its message is gone with it
        doomed.wait()
    # Two minutes later its lease has run out; what beat sends every two minutes then re-sends the round.
    expire = "from rounds.models import TrainingRound as R; from django.utils import timezone; " \
             "R.objects.update(lease_expires_at=timezone.now()); from rounds.tasks import rounds_check_task; " \
             "rounds_check_task.delay()"  # fmt: skip
    rescuer = worker()
    try:
        assert manage("shell", "-c", expire, env=env).returncode == 0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and rounds(var)[0][1] not in ("labeling", "failed"):
            time.sleep(0.5)
    finally:
        rescuer.terminate()
        rescuer.wait(timeout=60)
    (_, state, step, attempts, samples), = rounds(var)  # fmt: skip
    assert (state, step, attempts) == ("labeling", 40, 2) and samples > 0
