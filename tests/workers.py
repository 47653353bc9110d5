"""A real Celery worker in its own process, for the tests where workers matter."""

import os
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
from django.db import connection

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
ROOT = Path(__file__).resolve().parents[1]


def manage(*args: str, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    """`manage.py` in a process of its own, on `env` alone: none of this process's database, Redis or
    Django settings, so an env of {"FLYWHEEL_VAR_DIR": ...} is the embedded default."""
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env={**clean_environment(), **env}, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


def clean_environment() -> dict[str, str]:
    drop = {"DATABASE_URL", "REDIS_URL", "DEBUG", "SECRET_KEY", "DJANGO_SETTINGS_MODULE"}
    return {name: value for name, value in os.environ.items() if name not in drop}


@dataclass
class Worker:
    process: subprocess.Popen
    output: str = field(default="")


def _switch_broker(app, **conf: object) -> None:
    """Celery builds its connection pool once, from the broker URL of that moment: a test that
    switches brokers needs a new pool, or its tasks go to the old broker."""
    app.conf.update(**conf)
    app._pool = None  # dropped, not closed: kombu's producer registry may still hold the old one
    app.amqp._producer_pool = None


@contextmanager
def celery_worker(queues: str, host: "Host | None" = None, **env: str) -> Iterator[Worker]:
    """A real Celery worker in its own process, consuming `queues` from Redis and writing to the
    test database; while it runs, this process enqueues to the same Redis. On another `host` (a
    network namespace) it reaches both over that host's link. Its log is in `output` once the
    block ends."""
    redis.Redis.from_url(REDIS_URL).flushdb()
    database = connection.settings_dict
    address = host.gateway if host else database["HOST"]
    url = f"postgres://{database['USER']}@{address}:{database['PORT']}/{database['NAME']}"
    redis_url = urlunsplit(urlsplit(REDIS_URL)._replace(netloc=f"{host.gateway}:6379")) if host else REDIS_URL
    from config.celery import app

    process = subprocess.Popen(
        [*(["ip", "netns", "exec", host.name] if host else []), sys.executable, "-m", "celery", "-A", "config",
         "worker", "--pool", "solo", "--queues", queues, "--without-mingle", "--without-gossip", "--loglevel", "INFO"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings_test", "DATABASE_URL": url,
             "REDIS_URL": redis_url, **env},
    )  # fmt: skip
    previous = {"broker_url": app.conf.broker_url, "task_always_eager": app.conf.task_always_eager}
    _switch_broker(app, broker_url=REDIS_URL, task_always_eager=False)
    worker = Worker(process)
    try:
        yield worker
    finally:
        _switch_broker(app, **previous)
        process.terminate()
        try:
            worker.output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a warm shutdown waits for its task: do not hide why the test ended
            process.kill()
            worker.output, _ = process.communicate()


@dataclass(frozen=True)
class Host:
    """Another machine, as far as the network goes: a network namespace whose only link is a veth
    pair to this one; `gateway` is this machine's end of it."""

    name: str
    gateway: str


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


@contextmanager
def other_host(index: int, ports: tuple[int, ...] = (5432, 6379)) -> Iterator[Host]:
    """A network namespace `flywheel-test-<index>` joined by veth to this one (10.231.<index>.1 here,
    .2 there), and `ports` of this machine's 127.0.0.1 (PostgreSQL, Redis: they listen there only)
    forwarded from the gateway address, as a real host would reach them over the network. Both
    are removed afterwards. Raises OSError where the machine forbids network namespaces."""
    name, outside, inside = f"flywheel-test-{index}", f"fwt{index}a", f"fwt{index}b"
    gateway, address = f"10.231.{index}.1", f"10.231.{index}.2"
    try:
        _run("ip", "netns", "add", name)
        _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        _run("ip", "link", "set", inside, "netns", name)
        _run("ip", "addr", "add", f"{gateway}/24", "dev", outside)
        _run("ip", "link", "set", outside, "up")
        for command in (["addr", "add", f"{address}/24", "dev", inside], ["link", "set", inside, "up"],
                        ["link", "set", "lo", "up"]):  # fmt: skip
            _run("ip", "netns", "exec", name, "ip", *command)
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        raise OSError(f"no network namespace here: {getattr(error, 'stderr', '') or error}") from error
    forwarders = [_Forwarder(gateway, port) for port in ports]
    try:
        yield Host(name, gateway)
    finally:
        for forwarder in forwarders:
            forwarder.close()
        subprocess.run(["ip", "link", "del", outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


class _Forwarder:
    """TCP from (address, port) to 127.0.0.1:port, a thread per connection."""

    def __init__(self, address: str, port: int) -> None:
        self.port = port
        self.server = socket.create_server((address, port))
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port))
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, client: socket.socket, upstream: socket.socket) -> None:
        with client, upstream:
            while not self.closed.is_set():
                readable, _, _ = select.select([client, upstream], [], [], 0.5)
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        return
                    (upstream if source is client else client).sendall(data)

    def close(self) -> None:
        self.closed.set()
        self.server.close()
