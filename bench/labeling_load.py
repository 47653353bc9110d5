"""Labeling load benchmark: how many claim + vote cycles per second the HTTP API sustains.

What it measures, on a database of its own (dropped and recreated every run):

1. Setup, as a new user would start (issue 16): a fresh database, `manage.py migrate`, N labelers
   with API tokens, and --pairs (4,000) synthetic pairs imported with `manage.py import_pairs`
   (overlap 3) into a project of each HTTP phase's own, so that no phase labels what an earlier one
   left (or runs it dry), and the ceiling's project (6). Nothing else warms the database: no ANALYZE
   but what the imports do themselves.
2. gunicorn (`gunicorn -c gunicorn.conf.py config.wsgi`) on a free loopback port.
3. N simulated labelers, one keep-alive HTTP/1.1 connection each (raw asyncio streams, no client
   library, so the generator stays cheap on a small machine). One "vote" is one claim
   (`POST /api/v1/projects/<slug>/assignments/`) followed by one vote
   (`POST /api/v1/assignments/<id>/vote/`, with an Idempotency-Key so a retried vote is safe).
   a. flat out (after a short warm-up): votes/s and p50/p99 latency of claim, vote and claim + vote.
   b. flat out with one round trip a vote: the vote asks for the next assignment (`?next=1`), so a
      claim is sent only when a labeler holds none.
   a and b take turns with the ceiling (6) in --rounds rounds (3) of --duration / --rounds seconds
   each, --duration seconds in all for each of the three: this machine's speed drifts by tens of per
   cent within minutes, and taking turns puts the drift on all three alike.
   c. paced: each labeler starts a vote (claim, then vote) every N / --paced-rate seconds on a fixed schedule;
      achieved votes/s, p50/p99 latency (from the actual start, and from the scheduled start so a
      slow server cannot hide behind late starts) and how many starts were late.
   Every response status is counted per endpoint: 201, 200 (idempotent replay), 204 (nothing
   left) and 409 (refused) are acceptable, anything else is an error.
4. After each phase, invariants checked in SQL: no (comparison, labeler) voted twice, no
   comparison with more votes than its overlap nor with votes + live leases above it,
   Comparison.vote_count equal to the real count, assignment status in step with its vote, and
   every vote the client saw acknowledged with 201 present in the database.
5. One probe claim + vote (and vote with `?next=1`) through Django's test client records the SQL
   each request issues (queries per request, the claim query's text, its EXPLAIN ANALYZE).
6. Ceiling: gunicorn idle, the same claim + vote transactions (the SQL assignment_claim and
   vote_submit issue, rewritten by hand) run straight through psycopg on N connections spread over
   a few client processes, flat out, on a project of its own imported at setup as the HTTP
   phases' were.
7. A table on stdout and JSON in bench/results/labeling_load.json (machine, parameters, figures):
   HTTP flat out with two calls and with one, each as a share of the ceiling.

Everything it starts (gunicorn, client processes) is stopped at the end, on error too, and the
whole run is bounded by --timeout.

    python bench/labeling_load.py [--labelers 100] [--pairs 4000] [--duration 20] [--paced-rate 20]

`--preset 1m` runs the same at 1,000,000 comparisons, built in SQL rather than imported (seed_million):
nearly all full, and a veteran labeler whose 50,000 votes are on the comparisons the claim sorts first.
The claim's EXPLAIN (ANALYZE, BUFFERS) plans for a new labeler and for the veteran go to
bench/results/labeling_load_1m_plans.txt; the ceiling labels what the HTTP phases left of the same project.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import datetime as dt
import json
import math
import multiprocessing
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from annotation import sql  # noqa: E402  (imports no Django)
from bench import app  # noqa: E402
from bench.common import app_commit, log, time_limit, write_results  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "labeling_load.json"
RESULTS_1M = ROOT / "bench" / "results" / "labeling_load_1m.json"
PLANS_1M = ROOT / "bench" / "results" / "labeling_load_1m_plans.txt"
ACCEPTABLE = frozenset({200, 201, 204, 409})
CHOICES = ("left", "right", "tie", "both_bad")
HTTP_SLUG = "bench-http"
# Flat out with two calls a vote (claim, then vote), then with one (the vote's ?next=1 claims the next pair).
FLAT_PHASES = ("flat", "flat_one_call")
HTTP_PHASES = (*FLAT_PHASES, "paced")
SQL_SLUG = "bench-sql"
OVERLAP = 3
REQUEST_TIMEOUT_S = 30.0
LATE_TOLERANCE_MS = 10.0


# --------------------------------------------------------------------------------------------
# Setup: database, schema, labelers, comparisons
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    labelers: int
    duration: float
    warmup: float
    paced_rate: float
    paced_duration: float
    ceiling_connections: int
    ceiling_procs: int
    database: str
    admin_url: str
    text_chars: int
    http_comparisons: int
    sql_comparisons: int
    skip_ceiling: bool
    rounds: int
    preset: str
    output: Path
    timeout: float
    app_root: Path

    @property
    def db_url(self) -> str:
        return app.database_url(self.admin_url, self.database)


_WORDS = (
    "the model answer should explain why each step follows from the previous one and cite the "
    "relevant facts clearly concise helpful harmless honest reasoning example detail summary "
    "policy reward preference response prompt user assistant context question careful correct"
).split()


def _text(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


def synthetic_pairs(count: int, text_chars: int) -> list[dict[str, str]]:
    """Pairs as import lines: distinct prompts and answers of about `text_chars` characters."""
    rng = random.Random(1)
    pool = [_text(rng, text_chars) for _ in range(500)]
    return [
        {
            "prompt": f"Prompt {i}: {pool[i % len(pool)][: text_chars // 2]}",
            "response_a": f"[{i}a] {pool[(i * 7 + 1) % len(pool)]}",
            "response_b": f"[{i}b] {pool[(i * 13 + 2) % len(pool)]}",
            "source_a": "policy-a",
            "source_b": "policy-b",
        }
        for i in range(count)
    ]


@dataclass(frozen=True)
class Seed:
    tokens: list[str]
    labeler_ids: list[int]
    probe_token: str
    # Each HTTP phase's project, slug and id: at 4k a fresh import of its own (a phase that ran the
    # import dry would measure the 204s), at 1m the one project built in SQL.
    http_projects: dict[str, tuple[str, int]]

    @property
    def http_project_id(self) -> int:
        """The first phase's project: the one the probe and the plans read."""
        return self.http_projects[HTTP_PHASES[0]][1]


def seed(cfg: Config) -> Seed:
    """Labelers (one shared password hash: hashing N times would take most of a minute) and tokens,
    through the app's models, then the labeling project as a new user makes it: `import_pairs`."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password
    from django.contrib.auth.models import Group
    from django.db import connection
    from rest_framework.authtoken.models import Token

    from annotation.models import LABELERS_GROUP, Project

    user_model = get_user_model()
    group = Group.objects.get_or_create(name=LABELERS_GROUP)[0]
    password = make_password("bench-password")
    names = [f"bench{i:04d}" for i in range(cfg.labelers)] + ["bench-probe"]
    users = user_model.objects.bulk_create([user_model(username=name, password=password) for name in names])
    membership = user_model.groups.through
    membership.objects.bulk_create([membership(user_id=user.pk, group_id=group.pk) for user in users])
    tokens = Token.objects.bulk_create([Token(key=binascii.hexlify(os.urandom(20)).decode(), user=u) for u in users])

    if cfg.preset == "1m":
        veteran = user_model.objects.create(username="bench-veteran", password=password)
        membership.objects.create(user_id=veteran.pk, group_id=group.pk)
        fillers = user_model.objects.bulk_create([user_model(username=f"bench-filler{i}", password=password)
                                                  for i in range(OVERLAP)])  # fmt: skip
        membership.objects.bulk_create([membership(user_id=user.pk, group_id=group.pk) for user in fillers])
        Token.objects.create(key=binascii.hexlify(os.urandom(20)).decode(), user=veteran)
        project_id = seed_million(cfg, veteran.pk, [user.pk for user in fillers])
        http_projects = {phase: (HTTP_SLUG, project_id) for phase in HTTP_PHASES}
    else:
        http_projects = {}
        with tempfile.NamedTemporaryFile("w", prefix="bench-pairs-", suffix=".jsonl") as pairs_file:
            pairs = synthetic_pairs(cfg.http_comparisons, cfg.text_chars)
            pairs_file.writelines(json.dumps(pair) + "\n" for pair in pairs)
            pairs_file.flush()
            for phase in HTTP_PHASES:
                slug = f"{HTTP_SLUG}-{phase}".replace("_", "-")
                command = ["manage.py", "import_pairs", slug, pairs_file.name, "--overlap", str(OVERLAP)]
                subprocess.run([sys.executable, *command], cwd=cfg.app_root, env=app.environment(cfg.db_url),
                               check=True)  # fmt: skip
                http_projects[phase] = (slug, Project.objects.get(slug=slug).pk)
    connection.close()
    return Seed(
        tokens=[t.key for t in tokens[:-1]],
        labeler_ids=[u.pk for u in users[:-1]],
        probe_token=tokens[-1].key,
        http_projects=http_projects,
    )


# --preset 1m: a project of MILLION_COMPARISONS built in SQL (generate_series), not through the ORM or
# import_pairs, which would take most of an hour here. Nearly every comparison is full; the rest are
# the queue. A veteran labeler has voted on VETERAN_VOTES comparisons, all of them among the partial
# ones that sort first in the claim's order (vote_count DESC): the worst case for their claim, which
# must pass over every one of them.
MILLION_COMPARISONS = 1_000_000
VETERAN_VOTES = 50_000
OPEN_COMPARISONS = 10_000  # no vote yet: what the HTTP phases label
MILLION_PROMPTS = 1_000


def seed_million(cfg: Config, veteran_id: int, filler_ids: list[int]) -> int:
    """The 1m preset's project: comparisons 1..FULL have OVERLAP votes from the filler labelers, the next
    VETERAN_VOTES have the veteran's vote and a filler's (vote_count 2), the last OPEN_COMPARISONS none.
    Votes, assignments and vote_count agree, as the invariants check; then ANALYZE, as an import does."""
    from annotation import services

    project_id = services.project_get_or_create(slug=HTTP_SLUG, name=HTTP_SLUG, overlap=OVERLAP).pk
    full = MILLION_COMPARISONS - VETERAN_VOTES - OPEN_COMPARISONS
    text = _text(random.Random(1), cfg.text_chars)
    params = {"project": project_id, "prompts": MILLION_PROMPTS, "comparisons": MILLION_COMPARISONS,
              "full": full, "partial_end": full + VETERAN_VOTES, "veteran": veteran_id, "fillers": filler_ids,
              "text": text}  # fmt: skip
    t = time.perf_counter()
    with psycopg.connect(cfg.db_url) as conn:
        # Bulk load: no per-row foreign-key triggers (every reference is built valid here).
        conn.execute("SET session_replication_role = replica")
        for statement in MILLION_SQL:
            conn.execute(statement, params)
        conn.commit()
        conn.autocommit = True
        conn.execute("SET session_replication_role = DEFAULT")
        conn.execute("ANALYZE")
    log(f"1m preset: {MILLION_COMPARISONS:,} comparisons with their votes built in {time.perf_counter() - t:.0f} s")
    return project_id


MILLION_SQL = [
    """INSERT INTO annotation_prompt (project_id, text, messages, content_hash)
       SELECT %(project)s, 'Prompt ' || i || ': ' || left(%(text)s, 300), NULL, md5('prompt' || i)
       FROM generate_series(1, %(prompts)s) i""",
    """INSERT INTO annotation_response (prompt_id, text, source)
       SELECT p.id, '[' || side || '] ' || %(text)s, 'policy-' || side
       FROM annotation_prompt p CROSS JOIN (VALUES ('a'), ('b')) sides(side)
       WHERE p.project_id = %(project)s""",
    # Comparison i takes prompt i mod prompts and its two responses; vote_count as the votes below.
    """INSERT INTO annotation_comparison (project_id, prompt_id, response_a_id, response_b_id, origin, round,
                                         gold_choice, meta, content_hash, vote_count, created_at)
       SELECT %(project)s, p.id, ra.id, rb.id, 'imported', NULL, '', '{}', md5('comparison' || i),
              CASE WHEN i <= %(full)s THEN 3 WHEN i <= %(partial_end)s THEN 2 ELSE 0 END, now()
       FROM generate_series(1, %(comparisons)s) i
       JOIN (SELECT id, row_number() OVER (ORDER BY id) - 1 AS n FROM annotation_prompt
             WHERE project_id = %(project)s) p ON p.n = i %% %(prompts)s
       JOIN annotation_response ra ON ra.prompt_id = p.id AND ra.source = 'policy-a'
       JOIN annotation_response rb ON rb.prompt_id = p.id AND rb.source = 'policy-b'
       ORDER BY i""",
    """CREATE TEMP TABLE million_voters AS
       SELECT c.id AS comparison_id, v.labeler_id
       FROM (SELECT id, row_number() OVER (ORDER BY id) AS i FROM annotation_comparison
             WHERE project_id = %(project)s) c
       CROSS JOIN LATERAL (
           SELECT unnest(CASE WHEN c.i <= %(full)s THEN %(fillers)s::bigint[]
                              WHEN c.i <= %(partial_end)s THEN ARRAY[%(veteran)s, (%(fillers)s::bigint[])[1]]
                              ELSE ARRAY[]::bigint[] END) AS labeler_id) v""",
    """INSERT INTO annotation_assignment (comparison_id, labeler_id, status, left_is_a, created_at, expires_at)
       SELECT comparison_id, labeler_id, 'voted', true, now() - interval '1 day', now() - interval '1 day'
       FROM million_voters ORDER BY comparison_id, labeler_id""",
    """INSERT INTO annotation_vote (comparison_id, labeler_id, assignment_id, choice, winner_id, strength,
                                   shown_left_id, rationale, flags, time_spent_ms, idempotency_key, created_at,
                                   source, judgment)
       SELECT a.comparison_id, a.labeler_id, a.id, 'a', c.response_a_id, 1, c.response_a_id, '', '[]', 1000,
              NULL, a.created_at, 'human', NULL
       FROM annotation_assignment a JOIN annotation_comparison c ON c.id = a.comparison_id
       WHERE c.project_id = %(project)s ORDER BY a.id""",
]


def seed_ceiling_project(cfg: Config) -> int:
    """The ceiling's own project, imported as the HTTP phases' were (pairs_import analyzes the tables it
    made stale; nothing vacuums them), so that both sides label a fresh import."""
    from django.db import connection

    from annotation import services
    from annotation.importing import PairRecord

    project = services.project_get_or_create(slug=SQL_SLUG, name=SQL_SLUG, overlap=OVERLAP)
    pairs = synthetic_pairs(cfg.sql_comparisons, cfg.text_chars)
    records = [
        PairRecord(line=i, prompt=pair["prompt"], response_a=pair["response_a"], response_b=pair["response_b"],
                   source_a=pair["source_a"], source_b=pair["source_b"])
        for i, pair in enumerate(pairs)
    ]  # fmt: skip
    services.pairs_import(project=project, records=records)
    connection.close()
    return project.pk


@dataclass
class Probe:
    claim_queries: list[str]
    vote_queries: list[str]
    vote_next_queries: list[str]  # a vote with ?next=1, which claims the next pair too
    claim_sql: str  # the candidate query, for EXPLAIN ANALYZE later


def probe_queries(token: str, slug: str) -> Probe:
    """A claim, a vote, and a vote with ?next=1 through Django's test client, recording every statement."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client(HTTP_HOST="127.0.0.1", HTTP_AUTHORIZATION=f"Token {token}")

    def vote(assignment: int, query: str, key: str) -> Any:
        response = client.post(
            f"/api/v1/assignments/{assignment}/vote/{query}",
            data={"choice": "left", "strength": 2},
            content_type="application/json",
            HTTP_IDEMPOTENCY_KEY=key,
        )
        assert response.status_code == 201, response.content
        return response.json()

    # A first claim and vote fill the access cache, as every request after a labeler's first finds it.
    warm = client.post(f"/api/v1/projects/{slug}/assignments/")
    assert warm.status_code == 201, warm.content
    vote(warm.json()["assignment"], "", "probe-0")
    # Each list is read as soon as its request is done: a request outside a capture clears the log.
    with CaptureQueriesContext(connection) as captured:
        response = client.post(f"/api/v1/projects/{slug}/assignments/")
    assert response.status_code == 201, response.content
    claim_queries = [q["sql"] for q in captured.captured_queries]
    with CaptureQueriesContext(connection) as captured:
        vote(response.json()["assignment"], "", "probe-1")
    vote_queries = [q["sql"] for q in captured.captured_queries]
    response = client.post(f"/api/v1/projects/{slug}/assignments/")
    with CaptureQueriesContext(connection) as captured:
        assert vote(response.json()["assignment"], "?next=1", "probe-2")["next"] is not None
    vote_next_queries = [q["sql"] for q in captured.captured_queries]
    candidate = next(q for q in claim_queries if "SKIP LOCKED" in q)
    connection.close()
    return Probe(claim_queries, vote_queries, vote_next_queries, candidate)


def explain_million(cfg: Config, seed_: Seed) -> dict[str, str]:
    """EXPLAIN (ANALYZE, BUFFERS) of the claim's statements at 1m, as the claim sends them (in a
    transaction rolled back, as the candidate's row lock would stay otherwise): a labeler new to the
    project, and the veteran, whose 50,000 votes are all on comparisons that sort first."""
    with psycopg.connect(cfg.db_url) as conn:
        veteran = app.fetch_one(conn, "SELECT id FROM auth_user WHERE username = 'bench-veteran'")[0]
        now = dt.datetime.now(dt.UTC)
        plans = {}
        for who, labeler in (("new labeler", seed_.labeler_ids[0]), ("veteran (50,000 votes)", veteran)):
            params = {"project": seed_.http_project_id, "overlap": OVERLAP, "now": now, "labeler": labeler,
                      "expires_at": now + dt.timedelta(minutes=10)}  # fmt: skip
            statements = {
                "renew": sql.RENEW_CURRENT_LEASE.format(clock=sql.POSTGRESQL_CLOCK),
                "candidate": sql.CANDIDATE.format(passed_over="", lock="FOR UPDATE OF c SKIP LOCKED"),
            }
            for name, statement in statements.items():
                query = psycopg.ClientCursor(conn).mogrify(statement, params)
                rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + query).fetchall()
                conn.rollback()
                plans[f"{name}, {who}"] = "\n".join(row[0] for row in rows)
    return plans


def explain_claim(cfg: Config, claim_sql: str) -> str:
    """EXPLAIN ANALYZE of the probe labeler's candidate query, in the table state after the run."""
    with psycopg.connect(cfg.db_url) as conn:
        rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + claim_sql).fetchall()
        conn.rollback()
    return "\n".join(row[0] for row in rows)


# --------------------------------------------------------------------------------------------
# gunicorn
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)


def start_gunicorn(cfg: Config) -> Server:
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="bench-gunicorn-", suffix=".log")[1])
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "config.wsgi"],
            cwd=cfg.app_root,
            env={**app.environment(cfg.db_url), "GUNICORN_BIND": f"127.0.0.1:{port}"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() signals master and workers
        )
    server = Server(process, port, log_path)
    try:  # main() only stops a server it got back: one that --timeout interrupts here must be stopped here
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {process.returncode}:\n{server.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                    sock.sendall(b"GET /api/v1/auth/token/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    if sock.recv(64).startswith(b"HTTP/1.1 "):
                        return server
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gunicorn did not answer within 60 s:\n{server.log_tail()}")
    except BaseException:
        server.stop()
        raise


def gunicorn_settings() -> dict[str, Any]:
    """The settings gunicorn.conf.py resolves to with the current environment."""
    namespace: dict[str, Any] = {"__file__": str(ROOT / "gunicorn.conf.py")}
    exec(compile((ROOT / "gunicorn.conf.py").read_text(), "gunicorn.conf.py", "exec"), namespace)  # noqa: S102
    keys = ("workers", "worker_class", "threads", "keepalive", "timeout", "max_requests", "raw_env")
    return {k: namespace[k] for k in keys if k in namespace}


# --------------------------------------------------------------------------------------------
# CPU accounting from /proc: where the two cores go
# --------------------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_snapshot(server_pid: int | None) -> dict[str, Any]:
    """CPU seconds used so far by each process of gunicorn (master + workers), of PostgreSQL, of this
    process (the load generator) and of its other children (ceiling clients), plus the machine's busy
    and total seconds."""
    procs: dict[int, tuple[str, float]] = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        pid, ppid, ticks = int(entry), int(fields[1]), int(fields[11]) + int(fields[12])
        if server_pid is not None and (pid == server_pid or ppid == server_pid):
            procs[pid] = ("gunicorn", ticks / CLOCK_TICKS)
        elif comm == "postgres":
            procs[pid] = ("postgres", ticks / CLOCK_TICKS)
        elif pid == me:
            procs[pid] = ("generator", ticks / CLOCK_TICKS)
        elif ppid == me:
            procs[pid] = ("bench_children", ticks / CLOCK_TICKS)
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]
    return {"procs": procs, "machine_total": sum(values[:8]) / CLOCK_TICKS,
            "machine_busy": (sum(values[:8]) - idle) / CLOCK_TICKS}  # fmt: skip


def cpu_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """CPU seconds by component between two snapshots, process by process: one that started meanwhile
    counts from zero, one that exited meanwhile (a ceiling's backends closing) drops out instead of
    taking its whole past with it."""
    out = {"gunicorn": 0.0, "postgres": 0.0, "generator": 0.0, "bench_children": 0.0}
    for pid, (kind, seconds) in after["procs"].items():
        earlier = before["procs"].get(pid)
        out[kind] += seconds - (earlier[1] if earlier is not None and earlier[0] == kind else 0.0)
    out["machine_total"] = after["machine_total"] - before["machine_total"]
    out["machine_busy"] = after["machine_busy"] - before["machine_busy"]
    return out


def cpu_per_vote(delta: dict[str, float], votes: int) -> dict[str, float | None]:
    """CPU milliseconds per vote by component, and how busy the machine was."""
    if not delta:
        return {}
    out: dict[str, float | None] = {
        f"{k}_ms_per_vote": round(delta[k] * 1000 / votes, 2) if votes else None
        for k in ("gunicorn", "postgres", "generator", "bench_children")
        if delta[k] > 0
    }
    out["machine_busy_pct"] = (
        round(100 * delta["machine_busy"] / delta["machine_total"], 1) if delta["machine_total"] else None
    )
    return out


# --------------------------------------------------------------------------------------------
# HTTP client: one keep-alive HTTP/1.1 connection per labeler
# --------------------------------------------------------------------------------------------


class HttpConnection:
    """A minimal HTTP/1.1 client over asyncio streams: Content-Length and chunked bodies,
    reconnects when the server closes. A request whose connection fails before any response
    arrives is sent once more on a fresh connection (claims renew the same lease, votes carry an
    Idempotency-Key, so the retry cannot add a second vote)."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.prefix = f"Host: 127.0.0.1:{port}\r\nAuthorization: Token {token}\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reconnects = 0
        self.next_assignment: int | None = None  # handed out by the last vote's ?next=1

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.transport.set_write_buffer_limits(high=1 << 20)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes = b"", extra: bytes = b"") -> tuple[int, bytes]:
        head = (
            b"POST " + path.encode() + b" HTTP/1.1\r\n" + self.prefix + extra
            + b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )  # fmt: skip
        for attempt in (0, 1):
            if self.writer is None:
                await self._connect()
            assert self.reader is not None and self.writer is not None
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    self.writer.write(head + body)
                    return await self._read_response(self.reader)
            except (ConnectionError, asyncio.IncompleteReadError) as error:
                self.close()
                if attempt or (isinstance(error, asyncio.IncompleteReadError) and error.partial):
                    raise
                self.reconnects += 1
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    async def _read_response(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0][9:12])
        length = 0
        chunked = close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        if chunked:
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                parts.append(await reader.readexactly(size + 2))
            body = b"".join(p[:-2] for p in parts)
        else:
            body = await reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, body


# --------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------


@dataclass
class PhaseStats:
    name: str
    claim_ms: list[float] = field(default_factory=list)
    vote_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    from_schedule_ms: list[float] = field(default_factory=list)
    start_lag_ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    vote_ids: list[int] = field(default_factory=list)
    votes: int = 0  # votes answered 201
    refused: int = 0  # votes answered 409
    dry: int = 0  # claims answered 204
    errors: int = 0  # anything outside 200/201/204/409, exceptions included
    starts: int = 0
    late: int = 0
    missed: int = 0  # paced starts that never happened because the labeler was still busy at the end
    cpu: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    reconnects: int = 0
    rounds: int = 0  # flat out: the turns it took (--rounds)

    def record(self, endpoint: str, status: int | str) -> None:
        self.statuses[f"{endpoint} {status}"] += 1
        if status not in ACCEPTABLE:
            self.errors += 1


async def one_vote(
    conn: HttpConnection, slug: str, stats: PhaseStats, rng: random.Random, one_call: bool = False
) -> bool:
    """Claim, then vote. With `one_call` the vote asks for the next assignment (`?next=1`) and the
    claim is sent only when the labeler holds none from the vote before. Returns False when the
    project had nothing left for this labeler."""
    t0 = t1 = time.perf_counter()
    assignment = conn.next_assignment if one_call else None
    conn.next_assignment = None
    if assignment is None:
        try:
            status, body = await conn.post(f"/api/v1/projects/{slug}/assignments/")
        except Exception as error:  # noqa: BLE001 - counted, the run goes on
            stats.record("claim", type(error).__name__)
            return True
        t1 = time.perf_counter()
        stats.record("claim", status)
        stats.claim_ms.append((t1 - t0) * 1000)
        if status == 204:
            stats.dry += 1
            return False
        if status != 201:
            return True
        assignment = json.loads(body)["assignment"]
    payload = json.dumps({"choice": rng.choice(CHOICES), "strength": rng.randint(1, 3)}).encode()
    key = b"Idempotency-Key: " + uuid.uuid4().hex.encode() + b"\r\n"
    query = "?next=1" if one_call else ""
    try:
        status, body = await conn.post(f"/api/v1/assignments/{assignment}/vote/{query}", payload, key)
    except Exception as error:  # noqa: BLE001
        stats.record("vote", type(error).__name__)
        return True
    t2 = time.perf_counter()
    stats.record("vote", status)
    stats.vote_ms.append((t2 - t1) * 1000)
    stats.total_ms.append((t2 - t0) * 1000)
    if status in (200, 201):
        answer = json.loads(body)
        stats.votes += status == 201
        stats.vote_ids.append(answer["vote"])
        if one_call:
            following = answer["next"]
            if following is None:
                stats.dry += 1
                return False
            conn.next_assignment = following["assignment"]
    elif status == 409:
        stats.refused += 1
    return True


async def flat_out(
    conns: list[HttpConnection],
    slug: str,
    seconds: float,
    name: str,
    one_call: bool = False,
    stats: PhaseStats | None = None,
) -> PhaseStats:
    """Every labeler claims and votes as fast as answered for `seconds`, counted into `stats` (a new
    phase's, or an earlier round's of the same phase)."""
    stats = stats or PhaseStats(name)
    start = time.perf_counter()
    end = start + seconds

    async def labeler(conn: HttpConnection, rng: random.Random) -> None:
        while time.perf_counter() < end:
            if not await one_vote(conn, slug, stats, rng, one_call):
                await asyncio.sleep(0.05)

    # A labeler's choices differ from round to round, as they would from vote to vote.
    rngs = [random.Random(1000 * stats.rounds + i) for i in range(len(conns))]
    stats.rounds += 1
    await _run_labelers([labeler(c, rng) for c, rng in zip(conns, rngs, strict=True)], seconds)
    stats.elapsed_s += time.perf_counter() - start
    return stats


async def paced(conns: list[HttpConnection], slug: str, seconds: float, rate: float) -> PhaseStats:
    """Each labeler starts a vote every len(conns) / rate seconds, staggered evenly."""
    stats = PhaseStats("paced")
    interval = len(conns) / rate
    start = time.perf_counter() + 0.1
    end = start + seconds

    async def labeler(index: int, conn: HttpConnection) -> None:
        rng = random.Random(index)
        scheduled = start + index * interval / len(conns)
        while scheduled < end:
            now = time.perf_counter()
            if now >= end:  # too far behind: the slots left are missed, not run after the end
                stats.missed += math.ceil((end - scheduled) / interval)
                break
            if now < scheduled:
                await asyncio.sleep(scheduled - now)
                now = time.perf_counter()
            lag_ms = (now - scheduled) * 1000
            stats.starts += 1
            stats.start_lag_ms.append(lag_ms)
            stats.late += lag_ms > LATE_TOLERANCE_MS
            before = len(stats.total_ms)
            await one_vote(conn, slug, stats, rng)
            if len(stats.total_ms) > before:
                stats.from_schedule_ms.append((time.perf_counter() - scheduled) * 1000)
            scheduled += interval

    await _run_labelers([labeler(i, c) for i, c in enumerate(conns)], seconds + 0.1)
    stats.elapsed_s = time.perf_counter() - start
    return stats


async def _run_labelers(coros: list[Any], seconds: float) -> None:
    tasks = [asyncio.create_task(c) for c in coros]
    _, pending = await asyncio.wait(tasks, timeout=seconds + REQUEST_TIMEOUT_S * 2 + 5)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error


async def _measured(server: Server, phase: Any) -> PhaseStats:
    """The phase, with the CPU it used added to its stats' (an earlier round's, if any)."""
    before = cpu_snapshot(server.process.pid)
    stats: PhaseStats = await phase
    add_cpu(stats.cpu, cpu_delta(before, cpu_snapshot(server.process.pid)))
    return stats


def add_cpu(total: dict[str, float], delta: dict[str, float]) -> None:
    for key, seconds in delta.items():
        total[key] = total.get(key, 0.0) + seconds


async def http_phases(
    cfg: Config, server: Server, seed_: Seed, ceiling: Callable[[float], None] | None
) -> tuple[list[PhaseStats], dict[str, Any]]:
    """Warm-up; the two flat phases taking turns with `ceiling` (run in a thread for the seconds it is
    given; gunicorn idles meanwhile) in --rounds rounds; then paced. On the same keep-alive
    connections throughout; invariants after each phase (checked in a thread, the connections stay
    open meanwhile)."""
    conns = [HttpConnection(server.port, token) for token in seed_.tokens]
    flat: dict[str, PhaseStats] = {name: PhaseStats(name) for name in FLAT_PHASES}
    phases: list[PhaseStats] = []
    invariants: dict[str, Any] = {}
    segment = cfg.duration / cfg.rounds

    async def check(stats: PhaseStats) -> None:
        acked = [i for p in phases for i in p.vote_ids]
        project_id = seed_.http_projects[stats.name][1]
        invariants[stats.name] = await asyncio.to_thread(check_invariants, cfg, project_id, acked)

    try:
        if cfg.warmup > 0:
            phases.append(await flat_out(conns, seed_.http_projects[HTTP_PHASES[0]][0], cfg.warmup, "warmup"))
        for round_ in range(1, cfg.rounds + 1):
            for name, stats in flat.items():
                log(f"{name}: flat out {segment:.1f} s (round {round_} of {cfg.rounds})")
                reconnects = sum(c.reconnects for c in conns)
                slug = seed_.http_projects[name][0]
                await _measured(server, flat_out(conns, slug, segment, name, name == "flat_one_call", stats))
                stats.reconnects += sum(c.reconnects for c in conns) - reconnects
            if ceiling is not None:
                log(f"ceiling: the same transactions through psycopg for {segment:.1f} s (round {round_})")
                await asyncio.to_thread(ceiling, segment)
        for stats in flat.values():
            phases.append(stats)
            await check(stats)
        log(f"paced {cfg.paced_rate}/s for {cfg.paced_duration} s")
        reconnects = sum(c.reconnects for c in conns)
        slug = seed_.http_projects["paced"][0]
        phases.append(await _measured(server, paced(conns, slug, cfg.paced_duration, cfg.paced_rate)))
        phases[-1].reconnects = sum(c.reconnects for c in conns) - reconnects
        await check(phases[-1])
        return phases, invariants
    finally:
        for conn in conns:
            conn.close()


# --------------------------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------------------------

INVARIANTS_SQL = """
WITH v AS (
    SELECT comparison_id, count(*) AS n FROM annotation_vote GROUP BY comparison_id
), l AS (
    SELECT comparison_id, count(*) AS n FROM annotation_assignment
    WHERE status = 'open' AND expires_at > now() GROUP BY comparison_id
)
SELECT
    count(*) FILTER (WHERE coalesce(v.n, 0) > p.overlap),
    count(*) FILTER (WHERE coalesce(v.n, 0) + coalesce(l.n, 0) > p.overlap),
    count(*) FILTER (WHERE c.vote_count <> coalesce(v.n, 0)),
    coalesce(sum(v.n), 0),
    coalesce(sum(l.n), 0)
FROM annotation_comparison c
JOIN annotation_project p ON p.id = c.project_id
LEFT JOIN v ON v.comparison_id = c.id
LEFT JOIN l ON l.comparison_id = c.id
WHERE c.project_id = %(project)s
"""

DUPLICATES_SQL = """
SELECT count(*) FROM (
    SELECT 1 FROM annotation_vote v JOIN annotation_comparison c ON c.id = v.comparison_id
    WHERE c.project_id = %(project)s GROUP BY v.comparison_id, v.labeler_id HAVING count(*) > 1
) d
"""

STATUS_MISMATCH_SQL = """
SELECT count(*) FROM annotation_assignment a
JOIN annotation_comparison c ON c.id = a.comparison_id
LEFT JOIN annotation_vote v ON v.assignment_id = a.id
WHERE c.project_id = %(project)s AND (a.status = 'voted') <> (v.id IS NOT NULL)
"""

ACKED_MISSING_SQL = """
SELECT count(*) FROM unnest(%(ids)s::bigint[]) AS acked(id)
WHERE NOT EXISTS (SELECT 1 FROM annotation_vote v WHERE v.id = acked.id)
"""


def check_invariants(cfg: Config, project_id: int, acked: list[int]) -> dict[str, int]:
    with psycopg.connect(cfg.db_url) as conn:
        params = {"project": project_id, "ids": acked}
        over_votes, over_leases, count_mismatch, votes, leases = app.fetch_one(conn, INVARIANTS_SQL, params)
        found = {
            "duplicate_votes": app.fetch_one(conn, DUPLICATES_SQL, params)[0],
            "votes_over_overlap": over_votes,
            "votes_plus_leases_over_overlap": over_leases,
            "vote_count_mismatch": count_mismatch,
            "assignment_status_mismatch": app.fetch_one(conn, STATUS_MISMATCH_SQL, params)[0],
            "acknowledged_vote_missing": app.fetch_one(conn, ACKED_MISSING_SQL, params)[0],
        }
    found["violations"] = sum(found.values())
    found["votes_in_db"] = int(votes)
    found["live_leases"] = int(leases)
    found["acknowledged"] = len(acked)
    return found


# --------------------------------------------------------------------------------------------
# Ceiling: the same transactions straight through psycopg
# --------------------------------------------------------------------------------------------

# The app's own statements (annotation/sql.py, which imports no Django) run straight through
# psycopg: what a request adds around them (token, group check, project by slug, the display
# query, Django and DRF themselves) is what the ratio measures.


@dataclass
class CeilingResult:
    votes: int = 0
    dry: int = 0
    refused: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    total_ms: list[float] = field(default_factory=list)
    vote_ids: list[int] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)

    def merge(self, other: CeilingResult) -> None:
        self.votes += other.votes
        self.dry += other.dry
        self.refused += other.refused
        self.errors.update(other.errors)
        self.total_ms.extend(other.total_ms)
        self.vote_ids.extend(other.vote_ids)


async def _ceiling_claim(conn: psycopg.AsyncConnection[Any], project: int, labeler: int) -> int | None:
    """assignment_claim: the new assignment's id, or None when nothing is left."""
    now = dt.datetime.now(dt.UTC)
    expires = now + dt.timedelta(seconds=600)
    async with conn.transaction():
        renew = sql.RENEW_CURRENT_LEASE.format(clock=sql.POSTGRESQL_CLOCK)
        renew_params = {"expires_at": expires, "labeler": labeler, "now": now, "project": project}
        current = await (await conn.execute(renew, renew_params)).fetchone()
        if current is not None:
            return int(current[0])
        params = {"project": project, "overlap": OVERLAP, "now": now, "labeler": labeler}
        passed_over: list[int] = []
        while True:
            excluded, excluded_params = sql.passed_over(passed_over)
            query = sql.CANDIDATE.format(passed_over=excluded, lock="FOR UPDATE OF c SKIP LOCKED")
            candidate = await (await conn.execute(query, {**params, **excluded_params})).fetchone()
            if candidate is None:
                return None
            lease_params = {"comparison": candidate[0], "vote_count": candidate[1], "labeler": labeler,
                            "left_is_a": random.random() < 0.5, "now": now, "expires_at": expires,
                            "overlap": OVERLAP}  # fmt: skip
            leased = await (await conn.execute(sql.LEASE_IF_ROOM, lease_params)).fetchone()
            if leased is not None:
                return int(leased[0])
            passed_over.append(candidate[0])


async def _ceiling_vote(conn: psycopg.AsyncConnection[Any], labeler: int, assignment: int) -> int | None:
    """vote_submit with an idempotency key: the new vote's id, or None when refused."""
    key = uuid.uuid4().hex
    async with conn.transaction():
        locked = sql.LOCK_FOR_VOTE.format(lock=sql.VOTE_LOCK)
        row = await (await conn.execute(locked, {"assignment": assignment, "labeler": labeler})).fetchone()
        assert row is not None
        _, status, expires_at, left_is_a, leased_at, comparison, response_a, response_b = row[:8]
        now = dt.datetime.now(dt.UTC)
        live = expires_at > now
        earlier = "SELECT id FROM annotation_vote WHERE labeler_id = %s AND idempotency_key = %s"
        await (await conn.execute(earlier, [labeler, key])).fetchone()
        if status != "open" or not live:
            return None  # the benchmark's leases are always live
        left, right = (response_a, response_b) if left_is_a else (response_b, response_a)
        choice = random.choice(CHOICES)
        canonical = {"left": "a" if left_is_a else "b", "right": "b" if left_is_a else "a"}
        spent = max(0, int((now - leased_at).total_seconds() * 1000))
        vote_params = {"comparison_id": comparison, "labeler_id": labeler, "assignment_id": assignment,
                       "choice": canonical.get(choice, choice), "winner_id": {"left": left, "right": right}.get(choice),
                       "strength": random.randint(1, 3), "shown_left_id": left, "rationale": "", "flags": "[]",
                       "time_spent_ms": spent, "idempotency_key": key, "created_at": now, "source": "human",
                       "judgment": None}  # fmt: skip
        vote = await (await conn.execute(sql.INSERT_VOTE, vote_params)).fetchone()
        assert vote is not None
        await conn.execute(sql.COUNT_VOTE, {"comparison": comparison})
        await conn.execute(sql.MARK_VOTED, {"assignment": assignment})
        return int(vote[0])


async def _ceiling_labeler(
    db_url: str, project_id: int, labeler_id: int, start_at: float, end_at: float, out: CeilingResult
) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        while time.time() < end_at:
            t0 = time.perf_counter()
            try:
                claimed = await _ceiling_claim(conn, project_id, labeler_id)
                if claimed is None:
                    out.dry += 1
                    await asyncio.sleep(0.05)
                    continue
                vote = await _ceiling_vote(conn, labeler_id, claimed)
            except psycopg.Error as error:
                out.errors[type(error).__name__] += 1
                continue
            if vote is None:
                out.refused += 1
            else:
                out.votes += 1
                out.vote_ids.append(vote)
                out.total_ms.append((time.perf_counter() - t0) * 1000)


def ceiling_worker(
    db_url: str, project_id: int, labeler_ids: list[int], start_at: float, seconds: float
) -> CeilingResult:
    """One client process: an event loop with one connection per labeler."""
    out = CeilingResult()

    async def run() -> None:
        coros = [_ceiling_labeler(db_url, project_id, lid, start_at, start_at + seconds, out) for lid in labeler_ids]
        await asyncio.wait_for(asyncio.gather(*coros), timeout=start_at - time.time() + seconds + 60)

    asyncio.run(run())
    return out


def ceiling_connections(cfg: Config) -> int:
    """--ceiling-connections, or one per labeler, within the connection slots PostgreSQL has free."""
    with psycopg.connect(cfg.admin_url) as conn:
        limit = int(app.fetch_one(conn, "SHOW max_connections")[0])
        reserved = int(app.fetch_one(conn, "SHOW superuser_reserved_connections")[0])
        active = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        used = int(app.fetch_one(conn, active)[0])
    free = limit - reserved - used - 5
    wanted = cfg.ceiling_connections or cfg.labelers
    return max(1, min(wanted, free, cfg.labelers))


def run_ceiling(cfg: Config, seed_: Seed, project_id: int, seconds: float) -> tuple[CeilingResult, int]:
    """The ceiling flat out for `seconds`: its result, CPU included, and the connections it used."""
    connections = ceiling_connections(cfg)
    labelers = seed_.labeler_ids[:connections]
    procs = min(cfg.ceiling_procs, connections)
    shares = [labelers[i::procs] for i in range(procs)]
    start_at = time.time() + 3.0  # time for the spawned processes to import and connect
    context = multiprocessing.get_context("spawn")
    with context.Pool(procs) as pool:
        pending = pool.starmap_async(
            ceiling_worker,
            [(cfg.db_url, project_id, share, start_at, seconds) for share in shares],
        )
        time.sleep(max(0.0, start_at - time.time()))
        before = cpu_snapshot(None)
        time.sleep(seconds)
        cpu = cpu_delta(before, cpu_snapshot(None))
        results = pending.get(timeout=90)
    total = CeilingResult(cpu=cpu)
    for part in results:
        total.merge(part)
    return total, connections


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 1)


def latency(values: list[float]) -> dict[str, float | None]:
    return {
        "p50_ms": pct(values, 0.50),
        "p99_ms": pct(values, 0.99),
        "mean_ms": round(statistics.fmean(values), 1) if values else None,
    }


def phase_summary(stats: PhaseStats) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "seconds": round(stats.elapsed_s, 2),
        "votes": stats.votes,
        "votes_per_s": round(stats.votes / stats.elapsed_s, 1) if stats.elapsed_s else 0.0,
        "refused_409": stats.refused,
        "dry_204": stats.dry,
        "errors": stats.errors,
        "statuses": dict(sorted(stats.statuses.items())),
        "reconnects": stats.reconnects,
        "claim": latency(stats.claim_ms),
        "vote": latency(stats.vote_ms),
        "claim_plus_vote": latency(stats.total_ms),
        "cpu": cpu_per_vote(stats.cpu, stats.votes),
    }
    if stats.starts:
        summary["starts"] = stats.starts
        summary["late_starts"] = stats.late
        summary["missed_starts"] = stats.missed
        summary["late_tolerance_ms"] = LATE_TOLERANCE_MS
        summary["start_lag"] = latency(stats.start_lag_ms)
        summary["claim_plus_vote_from_schedule"] = latency(stats.from_schedule_ms)
    return summary


def print_table(result: dict[str, Any]) -> None:
    def fmt(value: Any) -> str:
        return "-" if value is None else str(value)

    print()
    print(f"{'phase':<13} {'votes/s':>8} {'votes':>7} {'409':>5} {'204':>5} {'err':>4}  "
          f"{'claim p50/p99':>15} {'vote p50/p99':>15} {'claim+vote p50/p99':>19}")  # fmt: skip
    for name in HTTP_PHASES:
        p = result["http"][name]
        cols = [f"{fmt(p[k]['p50_ms'])}/{fmt(p[k]['p99_ms'])}" for k in ("claim", "vote", "claim_plus_vote")]
        print(f"{name:<13} {p['votes_per_s']:>8} {p['votes']:>7} {p['refused_409']:>5} {p['dry_204']:>5} "
              f"{p['errors']:>4}  {cols[0]:>15} {cols[1]:>15} {cols[2]:>19}")  # fmt: skip
    paced_ = result["http"]["paced"]
    for name in HTTP_PHASES:
        print(f"{name} CPU: {result['http'][name]['cpu']}")
    scheduled = paced_["claim_plus_vote_from_schedule"]
    print(
        f"paced: offered {result['parameters']['paced_rate']}/s, {paced_['late_starts']}/{paced_['starts']} "
        f"starts late (>{LATE_TOLERANCE_MS:.0f} ms), {paced_['missed_starts']} missed, "
        f"from schedule p50/p99 {scheduled['p50_ms']}/{scheduled['p99_ms']} ms"
    )
    for name in HTTP_PHASES:
        if result["http"][name]["errors"]:
            print(f"{name} statuses: {result['http'][name]['statuses']}")
    for name, label in (("ceiling", "ceiling, the app's SQL"),):
        c = result.get(name)
        if c:
            print(f"{label} (psycopg, {c['connections']} connections / {c['processes']} processes): "
                  f"{c['votes_per_s']} votes/s, claim+vote p50/p99 "
                  f"{c['claim_plus_vote']['p50_ms']}/{c['claim_plus_vote']['p99_ms']} ms, "
                  f"dry {c['dry']}, errors {c['errors']}; CPU {c['cpu']}")  # fmt: skip
    if "http_to_ceiling_ratio" in result:
        print(f"HTTP flat / ceiling: two calls a vote {result['http_to_ceiling_ratio']}, "
              f"one call a vote (?next=1) {result['http_one_call_to_ceiling_ratio']}")  # fmt: skip
    queries = result["queries_per_request"]
    print(f"queries per request: claim {queries['claim']}, vote {queries['vote']}, "
          f"vote with ?next=1 {queries['vote_with_next']}")  # fmt: skip
    for name, found in result["invariants"].items():
        print(f"invariants after {name}: {found['violations']} violations {found}")
    print(f"total invariant violations: {result['invariant_violations']}")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--labelers", type=int, default=100, help="concurrent simulated labelers (default 100)")
    parser.add_argument("--duration", type=float, default=20, help="seconds of the flat-out and ceiling phases")
    parser.add_argument("--warmup", type=float, default=3, help="seconds flat out before measuring (default 3)")
    parser.add_argument("--paced-rate", type=float, default=20, help="votes/s offered in the paced phase (default 20)")
    parser.add_argument("--paced-duration", type=float, help="seconds of the paced phase (default: --duration)")
    parser.add_argument("--ceiling-connections", type=int, help="psycopg connections (default: --labelers, "
                        "capped by the server's free connection slots)")  # fmt: skip
    parser.add_argument("--ceiling-procs", type=int, default=2, help="client processes for the ceiling")
    parser.add_argument("--skip-ceiling", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="the two flat phases and the ceiling take turns in "
                        "this many rounds of --duration / N seconds each, so that a drift in the machine's speed "
                        "falls on all three alike (default 3)")  # fmt: skip
    parser.add_argument("--preset", choices=["4k", "1m"], default="4k", help="4k: --pairs pairs through import_pairs "
                        "(default); 1m: a project of 1,000,000 comparisons built in SQL, nearly all full, and a "
                        "veteran labeler with 50,000 votes; the claim's plans go to bench/results/")  # fmt: skip
    parser.add_argument("--database", default="flywheel_bench", help="dropped and recreated (default flywheel_bench)")
    parser.add_argument("--admin-url", default=app.ADMIN_URL)
    parser.add_argument("--text-chars", type=int, default=600, help="characters per synthetic response")
    parser.add_argument("--pairs", type=int, default=4000, help="pairs imported with import_pairs for the HTTP "
                        "phases (default 4000)")  # fmt: skip
    parser.add_argument("--comparisons", type=int, help="comparisons of the ceiling's project (default: enough for "
                        "the run)")  # fmt: skip
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--app-root", type=Path, default=ROOT, help="checkout of the app to benchmark (default: "
                        "this one); gunicorn.conf.py is always this checkout's")  # fmt: skip
    parser.add_argument("--timeout", type=float, help="hard limit for the whole run in seconds")
    args = parser.parse_args(argv)
    if args.preset == "1m":
        args.pairs = MILLION_COMPARISONS
        if args.output == RESULTS:
            args.output = RESULTS_1M
    paced_duration = args.paced_duration if args.paced_duration is not None else args.duration
    # A generous upper bound: 3000 votes/s for the ceiling, each comparison takes `OVERLAP` votes,
    # plus a lease's worth per labeler. The HTTP phases get the import as it is: a claim
    # answered 204 (counted as dry) says it ran out.
    sql_comparisons = args.comparisons or int(2 * 3000 * args.duration / OVERLAP) + 2 * args.labelers + 1000
    # The 1m preset's SQL build takes several minutes on a busy 2-core machine.
    timeout = args.timeout or 300 + 4 * args.duration + args.warmup + paced_duration + (
        1500 if args.preset == "1m" else 0
    )
    return Config(
        labelers=args.labelers,
        duration=args.duration,
        warmup=args.warmup,
        paced_rate=args.paced_rate,
        paced_duration=paced_duration,
        ceiling_connections=args.ceiling_connections or 0,
        ceiling_procs=max(1, args.ceiling_procs),
        database=args.database,
        admin_url=args.admin_url,
        text_chars=args.text_chars,
        http_comparisons=args.pairs,
        sql_comparisons=sql_comparisons,
        skip_ceiling=args.skip_ceiling,
        rounds=max(1, args.rounds),
        preset=args.preset,
        output=args.output.resolve(),
        timeout=timeout,
        app_root=args.app_root.resolve(),
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    server: Server | None = None
    try:
        with time_limit(cfg.timeout):
            result: dict[str, Any] = {"machine": app.database_machine(cfg.admin_url), "parameters": {
                "labelers": cfg.labelers, "duration_s": cfg.duration, "warmup_s": cfg.warmup,
                "paced_rate": cfg.paced_rate, "paced_duration_s": cfg.paced_duration, "overlap": OVERLAP,
                "http_comparisons": cfg.http_comparisons, "sql_comparisons": cfg.sql_comparisons,
                "text_chars": cfg.text_chars, "database": cfg.database, "app_root": str(cfg.app_root),
                "app_commit": app_commit(cfg.app_root),
            }}  # fmt: skip
            result["gunicorn"] = gunicorn_settings()
            t = time.perf_counter()
            log(f"resetting database {cfg.database} and migrating")
            app.reset_database(cfg.admin_url, cfg.database)
            app.migrate(cfg.db_url, cfg.app_root)
            os.environ.update(app.environment(cfg.db_url))
            app.django_setup(cfg.app_root)
            how = "built in SQL" if cfg.preset == "1m" else "through import_pairs"
            log(f"seeding {cfg.labelers} labelers; {cfg.http_comparisons:,} pairs {how}")
            seed_ = seed(cfg)
            result["setup_s"] = round(time.perf_counter() - t, 1)
            log(f"setup done in {result['setup_s']} s; starting gunicorn {result['gunicorn']}")

            if cfg.preset == "1m":
                plans = explain_million(cfg, seed_)
                result["plans_1m"] = {name: plan.splitlines()[-1] for name, plan in plans.items()}
                PLANS_1M.write_text("".join(f"== {name}\n{plan}\n\n" for name, plan in plans.items()))
                log(f"claim plans at 1m: {result['plans_1m']}; written to {PLANS_1M.relative_to(ROOT)}")

            # The ceiling's project, imported like the HTTP phases' (import_pairs' own ANALYZE, nothing
            # else); at 1m the ceiling labels the same project, what the HTTP phases leave of its queue.
            sql_project_id: int | None = None
            if not cfg.skip_ceiling:
                log(f"seeding the ceiling's project: {cfg.sql_comparisons} comparisons")
                sql_project_id = seed_.http_project_id if cfg.preset == "1m" else seed_ceiling_project(cfg)
            ceiling_total = CeilingResult()
            ceiling_connections_used = 0

            def ceiling_round(seconds: float) -> None:
                nonlocal ceiling_connections_used
                assert sql_project_id is not None
                part, ceiling_connections_used = run_ceiling(cfg, seed_, sql_project_id, seconds)
                ceiling_total.merge(part)
                add_cpu(ceiling_total.cpu, part.cpu)

            server = start_gunicorn(cfg)
            log(f"gunicorn answering on 127.0.0.1:{server.port}; warm-up {cfg.warmup} s, flat out {cfg.duration} s "
                f"in {cfg.rounds} rounds")  # fmt: skip
            ceiling = None if cfg.skip_ceiling else ceiling_round
            phases, result["invariants"] = asyncio.run(http_phases(cfg, server, seed_, ceiling))
            result["gunicorn_log_tail"] = server.log_tail(10)
            server.stop()
            result["http"] = {p.name: phase_summary(p) for p in phases}
            probe = probe_queries(seed_.probe_token, seed_.http_projects["paced"][0])
            result["queries_per_request"] = {
                "claim": len(probe.claim_queries),
                "vote": len(probe.vote_queries),
                "vote_with_next": len(probe.vote_next_queries),
            }
            result["explain_claim"] = explain_claim(cfg, probe.claim_sql)

            if sql_project_id is not None:
                connections = ceiling_connections_used
                result["ceiling"] = {
                    "connections": connections,
                    "processes": min(cfg.ceiling_procs, connections),
                    "seconds": round(cfg.duration, 2),
                    "votes": ceiling_total.votes,
                    "votes_per_s": round(ceiling_total.votes / cfg.duration, 1),
                    "refused": ceiling_total.refused,
                    "dry": ceiling_total.dry,
                    "errors": dict(ceiling_total.errors),
                    "claim_plus_vote": latency(ceiling_total.total_ms),
                    "cpu": cpu_per_vote(ceiling_total.cpu, ceiling_total.votes),
                }
                result["invariants"]["ceiling"] = check_invariants(cfg, sql_project_id, ceiling_total.vote_ids)
                ceiling_rate = max(result["ceiling"]["votes_per_s"], 0.1)
                result["http_to_ceiling_ratio"] = round(result["http"]["flat"]["votes_per_s"] / ceiling_rate, 3)
                one_call = result["http"]["flat_one_call"]["votes_per_s"]
                result["http_one_call_to_ceiling_ratio"] = round(one_call / ceiling_rate, 3)
            result["invariant_violations"] = sum(v["violations"] for v in result["invariants"].values())
            result["probe_sql"] = {
                "claim": probe.claim_queries,
                "vote": probe.vote_queries,
                "vote_with_next": probe.vote_next_queries,
            }
            print_table(result)
            write_results(cfg.output, result)
            log(f"wrote {cfg.output.relative_to(ROOT) if cfg.output.is_relative_to(ROOT) else cfg.output}")
            errors = sum(result["http"][name]["errors"] for name in HTTP_PHASES)
            return 1 if result["invariant_violations"] or errors else 0
    finally:
        if server is not None:
            server.stop()
            server.log_path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
