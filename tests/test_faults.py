"""Faults degrade, never lie: a vote that was saved answers 201 whatever Redis does, a database that
cannot be reached answers 503 with Retry-After within the connect timeout, and /healthz says which
of the two is down. Real parts throughout: a redis-server of the test's own, killed and restarted;
sockets that accept and never answer; gunicorn in front of a database that never answers."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
import redis
from django.conf import settings
from django.db import OperationalError, connection
from django.test import Client, RequestFactory, override_settings
from django.utils import timezone

from annotation.models import AgreementSnapshot, Vote
from annotation.services import agreement_catch_up
from config.errors import server_error
from config.middleware import RETRY_AFTER_SECONDS
from rounds.models import LEASE, RewardModel, TrainingRound, TrainingSettings
from rounds.reward_models import reward_models_reclaim
from rounds.services import rounds_check
from tests.factories import api_client_for, make_project, voted_project
from tests.workers import _switch_broker

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RedisServer:
    """A redis-server of this test's own, on its own port, that the test may kill and start again."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=1)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: the Redis fault tests start one of their own")
    server = RedisServer()
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.kill()


class SilentServer:
    """Accepts TCP connections and never sends a byte: a hung Redis or PostgreSQL."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                accepted, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.held.append(accepted)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        for held in self.held:
            held.close()
        self.listener.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


@contextmanager
def redis_at(url: str) -> Iterator[None]:
    """The app's cache and broker at `url`, as REDIS_URL=url would configure them (settings.py)."""
    from config.celery import app

    caches = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": url,
            "OPTIONS": settings.REDIS_SOCKET_OPTIONS,
        }
    }
    previous = {"broker_url": app.conf.broker_url, "task_always_eager": app.conf.task_always_eager}
    with override_settings(
        REDIS_URL=url, CELERY_BROKER_URL=url, CACHES=caches, CELERY_TASK_ALWAYS_EAGER=False,
        FLYWHEEL_AGREEMENT_DEBOUNCE_SECONDS=1,
    ):  # fmt: skip
        _switch_broker(app, broker_url=url, task_always_eager=False)
        try:
            yield
        finally:
            _switch_broker(app, **previous)


def claim_and_vote(client, project) -> tuple[int, float]:
    """Claims through the API and votes on what it got: (the vote's status, seconds the vote took)."""
    claimed = client.post(f"/api/v1/projects/{project.slug}/assignments/")
    assert claimed.status_code == 201, claimed.content
    started = time.monotonic()
    voted = client.post(f"/api/v1/assignments/{claimed.json()['assignment']}/vote/", {"choice": "left"}, format="json")
    return voted.status_code, time.monotonic() - started


@pytest.mark.django_db(transaction=True)
def test_votes_answer_201_while_redis_is_down_and_the_refresh_catches_up(redis_server, alice):
    project = make_project(pairs=8, overlap=1)
    client = api_client_for(alice)
    with redis_at(redis_server.url):
        assert claim_and_vote(client, project)[0] == 201
        assert redis_server.client().llen("default") == 1, "the first vote of a burst schedules one refresh"

        redis_server.kill()
        for _ in range(3):
            status, seconds = claim_and_vote(client, project)
            assert status == 201
            assert seconds < 2
        assert Vote.objects.filter(labeler=alice).count() == 4

        redis_server.start()
        assert claim_and_vote(client, project)[0] == 201
        assert redis_server.client().llen("default") == 1, "scheduling works again once Redis is back"

    # No worker runs here: the refresh queued before the outage died with Redis (it keeps nothing on
    # disk) and the one queued after it is never consumed. Beat's catch-up finds the project once
    # its votes are older than twice the debounce window.
    assert not AgreementSnapshot.objects.filter(project=project).exists()
    time.sleep(2.5)
    with override_settings(FLYWHEEL_AGREEMENT_DEBOUNCE_SECONDS=1):
        assert agreement_catch_up() == [project.pk]
    snapshot = AgreementSnapshot.objects.get(project=project, round=None)
    assert snapshot.figures["votes"] == 5


@pytest.mark.django_db(transaction=True)
def test_a_vote_answers_201_within_2_seconds_when_redis_never_answers(silent_server, alice):
    project = make_project(pairs=2, overlap=1)
    client = api_client_for(alice)
    with redis_at(f"redis://127.0.0.1:{silent_server.port}/0"):
        status, seconds = claim_and_vote(client, project)
    assert status == 201
    assert seconds < 2, f"the vote took {seconds:.1f} s"
    assert Vote.objects.filter(labeler=alice).count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("broker", ["down", "silent"])
def test_the_dashboard_refresh_says_it_could_not_be_scheduled(admin_user, silent_server, broker):
    project = make_project(pairs=2)
    url = f"redis://127.0.0.1:{free_port() if broker == 'down' else silent_server.port}/0"
    client = Client()
    client.force_login(admin_user)
    with redis_at(url):
        started = time.monotonic()
        response = client.post(f"/projects/{project.slug}/agreement/refresh/", follow=True)
        seconds = time.monotonic() - started
    assert response.status_code == 200
    assert "could not be scheduled" in response.content.decode()
    assert seconds < 2, f"the refresh took {seconds:.1f} s"


@pytest.mark.django_db(transaction=True)
def test_training_starts_answer_at_once_while_redis_is_down_and_beat_sends_them_later(admin_user, redis_server):
    project = voted_project(60)
    TrainingSettings.objects.create(project=project, min_new_comparisons=1)
    client = Client()
    client.force_login(admin_user)
    with redis_at(redis_server.url):
        redis_server.kill()
        started = time.monotonic()
        trained = client.post(f"/projects/{project.slug}/reward-models/train/", follow=True)
        opened = client.post(f"/projects/{project.slug}/rounds/start/", follow=True)
        seconds = time.monotonic() - started
        assert trained.status_code == opened.status_code == 200
        assert seconds < 5, f"the two starts took {seconds:.1f} s"
        version = RewardModel.objects.get(project=project, status=RewardModel.Status.QUEUED)
        training_round = TrainingRound.objects.get(project=project)
        assert training_round.state == TrainingRound.State.TRAINING_REWARD_MODEL, "saved, though nothing was queued"

        redis_server.start()
        assert reward_models_reclaim() == [], "a version queued just now may still be in the queue"
        a_lease_ago = timezone.now() - LEASE - timedelta(seconds=1)
        RewardModel.objects.filter(pk=version.pk).update(created_at=a_lease_ago)
        TrainingRound.objects.filter(pk=training_round.pk).update(state_since=a_lease_ago)
        assert reward_models_reclaim() == [version.pk]
        assert rounds_check()["reclaimed"] == [training_round.pk]
        queued = [json.loads(message)["headers"] for message in redis_server.client().lrange("gpu", 0, -1)]
    assert sorted((headers["task"], headers["argsrepr"]) for headers in queued) == [
        ("rounds.tasks.reward_model_train_task", f"({version.pk},)"),
        ("rounds.tasks.round_run_task", f"({training_round.pk},)"),
    ]


@pytest.mark.django_db
def test_beat_recomputes_only_projects_whose_refresh_was_lost(alice):
    from annotation.tasks import agreement_catch_up_task

    assert agreement_catch_up_task.name in {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}

    lost, covered = make_project(pairs=2, overlap=1), make_project(pairs=2, overlap=1)
    client = api_client_for(alice)
    for project in (lost, covered):
        assert claim_and_vote(client, project)[0] == 201
    AgreementSnapshot.objects.create(project=covered, figures={}, labelers=[], labeler_pairs=[])
    with override_settings(FLYWHEEL_AGREEMENT_DEBOUNCE_SECONDS=3600):
        assert agreement_catch_up() == [], "a vote within the debounce window is the debounced task's"
    with override_settings(FLYWHEEL_AGREEMENT_DEBOUNCE_SECONDS=0):
        assert agreement_catch_up() == [lost.pk]
        assert AgreementSnapshot.objects.get(project=lost, round=None).figures["votes"] == 1
        assert agreement_catch_up() == []


@pytest.mark.django_db
def test_healthz_answers_200_with_the_database_and_broker_state(redis_server):
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"database": "ok", "broker": "none"}
    with override_settings(REDIS_URL=redis_server.url, CELERY_BROKER_URL=redis_server.url):
        assert Client().get("/healthz").json() == {"database": "ok", "broker": "ok"}
        redis_server.kill()
        down = Client().get("/healthz")
    assert down.status_code == 200, "the app still saves votes without Redis"
    assert down.json() == {"database": "ok", "broker": "unavailable"}


@pytest.mark.django_db
def test_healthz_is_not_redirected_to_https():
    with override_settings(SECURE_SSL_REDIRECT=True):
        client = Client()
        assert client.get("/accounts/login/").status_code == 301
        assert client.get("/healthz").status_code == 200


@pytest.mark.django_db
def test_database_connections_have_a_statement_timeout():
    with connection.cursor() as cursor:
        cursor.execute("SHOW statement_timeout")
        assert cursor.fetchone()[0] == f"{settings.DB_STATEMENT_TIMEOUT}s"
    database = connection.settings_dict
    script = (
        "import django, time\n"
        "django.setup()\n"
        "from django.db import OperationalError, connection\n"
        "started = time.monotonic()\n"
        "try:\n"
        "    connection.cursor().execute('SELECT pg_sleep(10)')\n"
        "except OperationalError as error:\n"
        "    print(type(error.__cause__).__name__, round(time.monotonic() - started, 1))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings_test", "DB_STATEMENT_TIMEOUT": "1",
             "DATABASE_URL": f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    cause, seconds = result.stdout.split()
    assert cause == "QueryCanceled"
    assert float(seconds) < 3


def test_api_500s_are_json(alice, monkeypatch):
    from annotation import services

    def broken(**kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(services, "assignment_claim", broken)
    project = make_project(pairs=1)
    response = api_client_for(alice).post(f"/api/v1/projects/{project.slug}/assignments/")
    assert response.status_code == 500
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": "Internal server error."}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


def http(url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None) -> Answer:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            status, answer_headers, body = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        status, answer_headers, body = error.code, dict(error.headers), error.read()
    return Answer(status, answer_headers, body, time.monotonic() - started)


@contextmanager
def gunicorn(database_url: str, **settings: str) -> Iterator[dict[str, str]]:
    """The app as production runs it (gunicorn gthread, DEBUG off, no Redis) on `database_url`, with a
    2 s connect timeout and `settings` in its environment; yields the environment, GUNICORN_BIND and
    ALLOWED_HOSTS included."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DJANGO_SETTINGS_MODULE"}}
    env.update(
        DATABASE_URL=database_url, DB_CONNECT_TIMEOUT="2", DEBUG="0", ALLOWED_HOSTS="127.0.0.1",
        SECRET_KEY="a-test-only-secret-key-that-is-long-enough-0123456789", SECURE_SSL_REDIRECT="0",
        GUNICORN_BIND=f"127.0.0.1:{port}", GUNICORN_WORKERS="1", GUNICORN_THREADS="2",
    )  # fmt: skip
    env.update(settings)
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "config.wsgi"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        # A static file needs no database: once it is served, the worker has booted.
        deadline = time.monotonic() + 60
        while True:
            try:
                if http(f"http://127.0.0.1:{port}/static/favicon.svg").status == 200:
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.2)
        yield env
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
        print(output[-3000:])


def healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess:
    """docker compose's health check of the web container."""
    return subprocess.run(
        [sys.executable, "scripts/healthcheck"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )


@pytest.fixture
def gunicorn_on_a_silent_database(silent_server) -> Iterator[dict[str, str]]:
    with gunicorn(f"postgres://postgres@127.0.0.1:{silent_server.port}/flywheel") as env:
        yield env


def served_database_url() -> str:
    database = connection.settings_dict
    return f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"


@pytest.mark.django_db
def test_the_compose_health_check_passes_on_a_healthy_database():
    with gunicorn(served_database_url()) as env:
        result = healthcheck(env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"database": "ok", "broker": "none"}


def test_a_silent_database_answers_503_with_retry_after_within_the_connect_timeout(gunicorn_on_a_silent_database):
    env = gunicorn_on_a_silent_database
    base = f"http://{env['GUNICORN_BIND']}"
    body = json.dumps({"username": "alice", "password": "whatever"}).encode()
    api = http(f"{base}/api/v1/auth/token/", data=body, headers={"Content-Type": "application/json"})
    assert api.status == 503
    assert api.seconds < 5, f"{api.seconds:.1f} s with a 2 s connect timeout"
    assert int(api.headers["Retry-After"]) > 0
    assert api.headers["Content-Type"] == "application/json"
    assert "detail" in json.loads(api.body)

    page = http(f"{base}/", headers={"Cookie": "sessionid=abcdefghijklmnopqrstuvwxyz012345"})
    assert page.status == 503
    assert page.seconds < 5
    assert page.headers["Content-Type"].startswith("text/html")
    assert int(page.headers["Retry-After"]) > 0

    health = http(f"{base}/healthz")
    assert health.status == 503
    assert json.loads(health.body) == {"database": "unavailable", "broker": "none"}
    assert int(health.headers["Retry-After"]) > 0

    # More such requests than the server has threads: each is answered, none holds its slot for good.
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda _: http(f"{base}/api/v1/auth/token/", data=body,
                                               headers={"Content-Type": "application/json"}), range(6)))  # fmt: skip
    assert [answer.status for answer in answers] == [503] * 6
    assert http(f"{base}/healthz").status == 503
    assert healthcheck(env).returncode == 1


@pytest.mark.django_db(transaction=True)
def test_an_export_whose_query_is_cancelled_answers_503_not_a_200_cut_short(admin_user):
    project = make_project(pairs=4)
    database = connection.settings_dict
    locker = psycopg.connect(
        f"postgresql://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"
    )
    try:
        # Another session holds the table the export reads, so the export's query waits until the
        # statement timeout cancels it: what a slow or overloaded database does.
        locker.execute("LOCK TABLE annotation_aggregatedlabel IN ACCESS EXCLUSIVE MODE")
        with connection.cursor() as cursor:
            cursor.execute("SET statement_timeout = '300ms'")
        response = api_client_for(admin_user).get(f"/api/v1/projects/{project.slug}/export/")
    finally:
        locker.rollback()
        locker.close()
        with connection.cursor() as cursor:
            cursor.execute("RESET statement_timeout")
    assert response.status_code == 503
    assert response["Retry-After"] == str(RETRY_AFTER_SECONDS)


def test_a_database_error_outside_any_view_answers_503_and_other_errors_json_under_the_api():
    """Django's 500 handler, reached by what fails after the view: a session saved on the way out."""
    request = RequestFactory().get("/api/v1/projects/x/votes/")
    try:
        raise OperationalError("the database went away while the session was saved")
    except OperationalError:
        answer = server_error(request)
    assert answer.status_code == 503 and answer["Retry-After"] == str(RETRY_AFTER_SECONDS)
    try:
        raise RuntimeError("anything else")
    except RuntimeError:
        api_answer, page_answer = server_error(request), server_error(RequestFactory().get("/"))
    assert api_answer.status_code == page_answer.status_code == 500
    assert json.loads(api_answer.content) == {"detail": "Internal server error."}
    assert "text/html" in page_answer["Content-Type"]


def drop_the_servers_connections() -> int:
    """What a database restart does to the server's persistent connections: end every other backend."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


@pytest.mark.django_db
@pytest.mark.parametrize("grace", ["0", "3600"])
def test_a_dropped_persistent_connection_is_reopened_by_the_health_check_once_the_grace_is_over(grace):
    """config/postgresql: a connection that just finished a request skips the health check for
    DB_HEALTH_CHECK_GRACE seconds. Past the grace (0 here) the check finds the dropped connection and
    reopens it: no request fails. Within it (an hour here) the next request fails once, with a 503 and
    no lie, and the connection is reopened for the one after."""
    with gunicorn(
        served_database_url(), GUNICORN_THREADS="1", DB_CONN_MAX_AGE="600", DB_HEALTH_CHECK_GRACE=grace
    ) as env:
        base = f"http://{env['GUNICORN_BIND']}"
        assert http(f"{base}/healthz").status == 200
        assert drop_the_servers_connections() == 1
        after_drop = [http(f"{base}/healthz").status for _ in range(3)]
    assert after_drop == ([200, 200, 200] if grace == "0" else [503, 200, 200])
