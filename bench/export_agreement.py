"""Export and agreement benchmark at scale: one project of N comparisons x 3 votes (default 3,000,000 votes).

What it measures, on a database of its own (dropped and recreated every run):

1. Load: 60 labelers and two projects, written with PostgreSQL COPY (prompts, responses, comparisons,
   'voted' assignments, votes): the big one of N comparisons and a quarter-size one (N/4, older
   votes) to show whether memory grows with the project. Each also gets 1,000 unvoted comparisons,
   so the labeling page has work to hand out. Labelers agree ~70% of the time. FK triggers are
   off during COPY (session_replication_role = replica); every FK is checked afterwards.
2. Agreement: `services.agreement_refresh` on each project, phase by phase (vote query, loading into
   numpy, labeler table, Dawid-Skene, AggregatedLabel upsert, Cohen pairs), and peak RSS; beside
   it the `krippendorff` package's nominal alpha on the same votes (labelers x items matrix), which
   must agree with the snapshot's alpha to 1e-9.
3. Export: `export.export_stream` for preferences and raw votes, JSON Lines and Parquet, consumed
   and counted: rows/s and peak RSS, at N and N/4; beside each, PostgreSQL's own
   `COPY (<the export's SELECT>) TO STDOUT` as the ceiling.
4. Latency of admin reads on the big project with Django's test client (5 runs each, p50/max):
   agreement API, a labeler's votes, time to first byte of both exports, the labeling page (as a
   labeler) and any --pages; EXPLAIN ANALYZE of the slowest query of every call above 500 ms.

Every measurement runs in a fresh subprocess (`--worker`), so peak RSS (VmHWM) figures don't
pollute each other; a worker still running at --timeout or on error is killed. A table on stdout,
JSON in bench/results/export_agreement.json (machine, parameters, app commit, figures).

    python bench/export_agreement.py [--comparisons 1000000] [--pages /projects/{slug}/dashboard/ ...]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg
from psycopg import sql as pgsql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import app  # noqa: E402
from bench.common import BenchTimeout, app_commit, log, time_limit, write_results  # noqa: E402

if TYPE_CHECKING:
    from annotation.export import Format  # imported at run time only in a worker, after Django's setup

RESULTS = ROOT / "bench" / "results" / "export_agreement.json"
BIG, SMALL = "bench-big", "bench-quarter"
LABELERS, OVERLAP, OPEN_COMPARISONS, RUNS, SLOW_MS = 60, 3, 1000, 5, 500.0
PLAIN_STATIC = "django.contrib.staticfiles.storage.StaticFilesStorage"
CHOICES = ("a", "b", "tie", "both_bad")  # the order of annotation.agreement.CHOICES
WORDS = (
    "the model answer should explain why each step follows from previous one and cite relevant facts clearly "
    "concise helpful harmless honest reasoning example detail summary policy reward user assistant context "
    "question careful correct python function returns list error handling database query index latency"
).split()


def maxrss_mib() -> float:
    """Peak RSS of this process. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across
    exec, so a worker would start out at the peak of the parent that spawned it."""
    status = Path("/proc/self/status").read_text()
    return round(int(status.split("VmHWM:")[1].split()[0]) / 1024, 1)


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


def tsv(n: int, columns: list[Any], chunk: int = 50_000) -> Iterator[bytes]:
    """COPY text rows; a column is a constant str, a list of str or a numpy array."""
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        cols: list[Any] = []
        for c in columns:
            if isinstance(c, str):
                cols.append(itertools.repeat(c, hi - lo))
            elif isinstance(c, np.ndarray) and c.dtype.kind != "U":
                cols.append(map(str, c[lo:hi].tolist()))
            else:
                cols.append(c[lo:hi] if isinstance(c, list) else c[lo:hi].tolist())
        yield ("\n".join(map("\t".join, zip(*cols, strict=False))) + "\n").encode()


def copy_into(conn: psycopg.Connection, table: str, names: str, n: int, columns: list[Any]) -> None:
    with conn.cursor().copy(f"COPY {table} ({names}) FROM STDIN") as copy:
        for data in tsv(n, columns):
            copy.write(data)


def timestamps(ms: np.ndarray) -> np.ndarray:
    return np.datetime_as_string(ms.astype("datetime64[ms]"), unit="ms", timezone="UTC")


def load_project(conn: psycopg.Connection, slug: str, n: int, labelers: np.ndarray, end_ms: int, seed: int) -> int:
    """N comparisons with OVERLAP votes each, plus OPEN_COMPARISONS without votes, in one transaction."""
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    ids = {t: app.fetch_one(conn, f"SELECT COALESCE(MAX(id), 0) FROM annotation_{t}")[0]
           for t in ("prompt", "response", "comparison", "assignment", "vote")}  # fmt: skip
    project = app.fetch_one(
        conn,
        "INSERT INTO annotation_project (slug, name, guidelines, overlap, lease_seconds, created_at, gold_rate)"
        " VALUES (%s, %s, '', %s, 600, now(), 0) RETURNING id",
        [slug, slug, OVERLAP],
    )[0]
    m, v = n + OPEN_COMPARISONS, n * OVERLAP

    def pool(size: int, low: int, high: int) -> list[str]:
        texts = []
        for _ in range(size):
            target, words = prng.randint(low, high), [prng.choice(WORDS).capitalize()]
            while sum(map(len, words)) + len(words) < target:
                words.append(prng.choice(WORDS))
            texts.append(" ".join(words) + prng.choice(".?!"))
        return texts

    prompt_pool, response_pool = pool(4096, 170, 230), pool(8192, 320, 480)
    pick_p, pick_r = rng.integers(0, 4096, m).tolist(), rng.integers(0, 8192, 2 * m).tolist()
    prompts = [f"Q{i}: {prompt_pool[p]}" for i, p in enumerate(pick_p)]
    responses = [f"{response_pool[r]} [{i}]" for i, r in enumerate(pick_r)]
    prompt_id = ids["prompt"] + 1 + np.arange(m)
    ra = ids["response"] + 1 + 2 * np.arange(m)
    comparison_id = ids["comparison"] + 1 + np.arange(m)
    prompt_hashes = [hashlib.sha256(p.encode()).hexdigest() for p in prompts]
    copy_into(conn, "annotation_prompt", "id, project_id, text, messages, content_hash", m,
              [prompt_id, str(project), prompts, r"\N", prompt_hashes])  # fmt: skip
    copy_into(conn, "annotation_response", "id, prompt_id, text, source", 2 * m,
              [ids["response"] + 1 + np.arange(2 * m), np.repeat(prompt_id, 2), responses,
               np.array(["policy-v1", "policy-v2", "policy-v3"])[rng.integers(0, 3, 2 * m)]])  # fmt: skip
    copy_into(conn, "annotation_comparison", "id, project_id, prompt_id, response_a_id, response_b_id, origin, "
              "round, gold_choice, meta, content_hash, vote_count, created_at", m,
              [comparison_id, str(project), prompt_id, ra, ra + 1, "imported", 1 + np.arange(m) * 4 // m, "", "{}",
               [hashlib.sha256(f"{slug}:{i}".encode()).hexdigest() for i in range(m)],
               np.where(np.arange(m) < n, OVERLAP, 0), timestamps(np.full(m, end_ms - 40 * 86_400_000))])  # fmt: skip

    # Three different labelers per comparison; each votes the hidden truth with their own accuracy
    # (0.75-0.9, so two votes agree ~70% of the time), otherwise one of the other three choices.
    first = rng.integers(0, LABELERS, n)
    second = (first + 1 + rng.integers(0, LABELERS - 1, n)) % LABELERS
    low, high = np.minimum(first, second), np.maximum(first, second)
    third = rng.integers(0, LABELERS - 2, n)
    third += third >= low
    third += third >= high
    who = np.stack([first, second, third], axis=1).ravel()
    item = np.repeat(np.arange(n), OVERLAP)
    truth = rng.choice(4, n, p=[0.45, 0.45, 0.06, 0.04])[item]
    accuracy = rng.uniform(0.75, 0.9, LABELERS)
    choice = np.where(rng.random(v) < accuracy[who], truth, (truth + rng.integers(1, 4, v)) % 4)
    left_is_a = rng.random(v) < 0.5
    a_id, b_id = ra[item], ra[item] + 1
    winner = np.where(choice == 0, a_id, np.where(choice == 1, b_id, 0))
    spent = np.clip(np.exp(rng.normal(9.6, 0.7, v)), 800, 600_000).astype(np.int64)
    voted_ms = end_ms - 30 * 86_400_000 + np.arange(v) * (30 * 86_400_000 // max(v, 1))
    vote_id, assignment_id = ids["vote"] + 1 + np.arange(v), ids["assignment"] + 1 + np.arange(v)
    copy_into(conn, "annotation_assignment", "id, comparison_id, labeler_id, status, left_is_a, created_at, expires_at",
              v, [assignment_id, comparison_id[item], labelers[who], "voted", np.where(left_is_a, "t", "f"),
                  timestamps(voted_ms - spent), timestamps(voted_ms - spent + 600_000)])  # fmt: skip
    rationales = np.array(["", "", "", "", "", "", "", "", "B is more concise.", "A cites its sources."])
    copy_into(conn, "annotation_vote", "id, comparison_id, labeler_id, assignment_id, choice, winner_id, strength, "
              "shown_left_id, rationale, flags, time_spent_ms, idempotency_key, created_at", v,
              [vote_id, comparison_id[item], labelers[who], assignment_id, np.array(CHOICES)[choice],
               np.where(winner > 0, winner.astype("U20"), r"\N"), rng.integers(1, 4, v),
               np.where(left_is_a, a_id, b_id), rationales[rng.integers(0, len(rationales), v)], "[]", spent, r"\N",
               timestamps(voted_ms)])  # fmt: skip
    return int(project)


def load(db_url: str, n: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    with psycopg.connect(db_url) as conn:
        for setting in ("session_replication_role = replica", "synchronous_commit = off",
                        "maintenance_work_mem = '1GB'"):  # fmt: skip
            conn.execute(f"SET {setting}")
        conn.execute("INSERT INTO auth_group (name) VALUES ('labelers') ON CONFLICT (name) DO NOTHING")
        labelers = np.array([row[0] for row in conn.execute(
            "INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, email, is_staff,"
            " is_active, date_joined) SELECT '!bench', false, 'labeler' || lpad(g::text, 2, '0'), '', '', '',"
            " false, true, now() FROM generate_series(1, %s) g ORDER BY g RETURNING id", [LABELERS])])  # fmt: skip
        conn.execute("INSERT INTO auth_user_groups (user_id, group_id) SELECT u.id, g.id FROM auth_user u, "
                     "auth_group g WHERE u.password = '!bench' AND g.name = 'labelers'")  # fmt: skip
        now_ms = int(time.time() * 1000)
        load_project(conn, SMALL, max(n // 4, 1), labelers, now_ms - 60 * 86_400_000, seed=2)
        load_project(conn, BIG, n, labelers, now_ms - 3_600_000, seed=1)
        for (table,) in conn.execute("SELECT table_name FROM information_schema.columns WHERE column_name = 'id'"
                                     " AND table_schema = 'public' AND is_identity = 'YES'").fetchall():  # fmt: skip
            conn.execute(pgsql.SQL("SELECT setval(pg_get_serial_sequence({t}, 'id'), COALESCE(MAX(id), 0) + 1, false)"
                                   " FROM {i}").format(t=pgsql.Literal(table), i=pgsql.Identifier(table)))  # fmt: skip
        conn.commit()
        copy_s = time.perf_counter() - t0
        conn.execute("SET session_replication_role = origin")
        # Every single-column FK of the app's tables, checked once now that COPY skipped the triggers.
        fks = conn.execute(
            "SELECT conrelid::regclass::text, a.attname, confrelid::regclass::text, fa.attname FROM pg_constraint c"
            " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]"
            " JOIN pg_attribute fa ON fa.attrelid = c.confrelid AND fa.attnum = c.confkey[1]"
            " WHERE c.contype = 'f' AND c.conrelid::regclass::text LIKE 'annotation_%'"
        ).fetchall()
        check = "SELECT COUNT(*) FROM {} x WHERE x.{} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {} y WHERE y.{} = x.{})"
        broken = 0
        for table, column, ref, ref_column in fks:
            names = [pgsql.Identifier(name) for name in (table, column, ref, ref_column, column)]
            broken += app.fetch_one(conn, pgsql.SQL(check).format(*names))[0]
    t1 = time.perf_counter()
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        sizes: dict[str, str] = dict(conn.execute(
            "SELECT relname, pg_size_pretty(pg_total_relation_size(oid)) FROM pg_class WHERE relname IN"
            " ('annotation_vote', 'annotation_assignment', 'annotation_comparison', 'annotation_response',"
            " 'annotation_prompt')").fetchall())  # fmt: skip
    return {"copy_s": round(copy_s, 1), "fk_check_s": round(t1 - t0 - copy_s, 1),
            "vacuum_analyze_s": round(time.perf_counter() - t1, 1), "fk_violations": broken,
            "table_sizes": sizes}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Workers: each runs in a fresh process with Django set up and prints its figures as JSON
# --------------------------------------------------------------------------------------------


def wrap(owner: Any, name: str, into: dict[str, float], key: str | None = None) -> None:
    """Replace owner.name by a wrapper adding its wall time (of calls, or of iteration) to into[key]."""
    original, key = getattr(owner, name), key or name

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            into[key] = into.get(key, 0.0) + time.perf_counter() - t

    setattr(owner, name, timed)


def work_agreement(slug: str) -> dict[str, Any]:
    from annotation import quality, selectors, services
    from annotation.models import Project

    phases: dict[str, float] = {}
    for name in ("labeler_table", "dawid_skene", "_aggregate", "pairwise_cohen", "project_figures"):
        wrap(quality, name, phases)
    wrap(selectors, "project_vote_rows", phases, "vote_query_and_fetch")
    wrap(quality.ProjectVotes, "from_rows", phases, "load_numpy")
    wrap(services, "_store_aggregates", phases, "store_aggregates")

    project = Project.objects.get(slug=slug)
    base = maxrss_mib()
    t = time.perf_counter()
    snapshot = services.agreement_refresh(project_id=project.pk)
    total = time.perf_counter() - t
    phases["build_aggregate_rows"] = phases["_aggregate"] - phases["dawid_skene"]
    top = ("vote_query_and_fetch", "load_numpy", "labeler_table", "_aggregate", "pairwise_cohen", "project_figures",
           "store_aggregates")  # fmt: skip
    phases["other"] = total - sum(phases.get(k, 0.0) for k in top)
    return {"seconds": round(total, 2), "phases_s": {k: round(x, 2) for k, x in phases.items()},
            "figures": snapshot.figures, "rss_before_mib": base, "peak_rss_mib": maxrss_mib()}  # fmt: skip


def work_krippendorff(slug: str) -> dict[str, Any]:
    import krippendorff
    from django.db import connection

    from annotation import agreement
    from annotation.models import Project
    from annotation.selectors import latest_snapshot

    project = Project.objects.get(slug=slug)
    t = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("SELECT v.comparison_id, v.labeler_id, v.choice FROM annotation_vote v JOIN "
                       "annotation_comparison c ON c.id = v.comparison_id WHERE c.project_id = %s AND "
                       "c.gold_choice = ''", [project.pk])  # fmt: skip
        rows = cursor.fetchall()
    _, item = np.unique(np.fromiter((r[0] for r in rows), np.int64, len(rows)), return_inverse=True)
    _, labeler = np.unique(np.fromiter((r[1] for r in rows), np.int64, len(rows)), return_inverse=True)
    code = {c: i for i, c in enumerate(CHOICES)}
    choice = np.fromiter((code[r[2]] for r in rows), np.int64, len(rows))
    del rows
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    matrix = np.full((labeler.max() + 1, item.max() + 1), np.nan)
    matrix[labeler, item] = choice
    matrix_s = time.perf_counter() - t
    t = time.perf_counter()
    package = krippendorff.alpha(reliability_data=matrix, level_of_measurement="nominal")
    package_s = time.perf_counter() - t
    counts = agreement.value_counts(item, choice, len(CHOICES))
    t = time.perf_counter()
    from_counts = krippendorff.alpha(value_counts=counts, level_of_measurement="nominal")
    package_counts_s = time.perf_counter() - t
    t = time.perf_counter()
    app_alpha = agreement.krippendorff_alpha(agreement.value_counts(item, choice, len(CHOICES)), "nominal")
    app_s = time.perf_counter() - t
    snapshot = latest_snapshot(project=project)
    stored = snapshot.figures["alpha_nominal"] if snapshot else None
    diffs = [abs(float(x) - package) for x in (from_counts, app_alpha, stored) if x is not None]
    return {"votes": int(len(choice)), "matrix_shape": list(matrix.shape), "matrix_mib": round(matrix.nbytes / 2**20),
            "load_s": round(load_s, 2), "matrix_s": round(matrix_s, 2), "package_alpha": package,
            "package_s": round(package_s, 3), "package_value_counts_s": round(package_counts_s, 4),
            "app_alpha": app_alpha, "app_alpha_s": round(app_s, 4), "snapshot_alpha": stored,
            "max_abs_diff": max(diffs), "agree_1e9": bool(stored is not None and max(diffs) <= 1e-9),
            "peak_rss_mib": maxrss_mib()}  # fmt: skip


def work_export(slug: str, file_format: Format, votes: bool) -> dict[str, Any]:
    from annotation import export
    from annotation.models import Project

    counts = {"source": 0, "rows": 0}

    def counting(original: Callable[..., Iterator[Any]], key: str) -> Callable[..., Iterator[Any]]:
        def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
            for row in original(*args, **kwargs):
                counts[key] += 1
                yield row

        return wrapper

    export._stream = counting(export._stream, "source")
    export.preference_rows = counting(export.preference_rows, "rows")
    export.vote_rows = counting(export.vote_rows, "rows")
    project = Project.objects.get(slug=slug)
    base, nbytes, first_s = maxrss_mib(), 0, None
    t = time.perf_counter()
    for chunk in export.export_stream(project, file_format=file_format, votes=votes):
        first_s = first_s if first_s is not None else time.perf_counter() - t
        nbytes += len(chunk)
    seconds = time.perf_counter() - t
    return {"seconds": round(seconds, 2), "first_chunk_s": round(first_s or 0, 3), "bytes": nbytes,
            "query_rows": counts["source"], "rows": counts["rows"],
            "query_rows_per_s": round(counts["source"] / seconds), "rows_per_s": round(counts["rows"] / seconds),
            "rss_before_mib": base, "peak_rss_mib": maxrss_mib()}  # fmt: skip


def work_copy(slug: str, votes: bool) -> dict[str, Any]:
    from django.db import connection

    from annotation.models import Project

    sql, params = export_query(Project.objects.get(slug=slug), votes)
    connection.ensure_connection()
    query = psycopg.ClientCursor(connection.connection).mogrify(sql, params)
    nbytes, rows, t = 0, 0, time.perf_counter()
    with connection.connection.cursor() as cursor, cursor.copy(f"COPY ({query}) TO STDOUT") as copy:
        for data in copy:
            nbytes, rows = nbytes + len(data), rows + bytes(data).count(b"\n")  # text format escapes newlines in values
    seconds = time.perf_counter() - t
    return {"seconds": round(seconds, 2), "bytes": nbytes, "rows": rows, "rows_per_s": round(rows / seconds),
            "peak_rss_mib": maxrss_mib()}  # fmt: skip


def export_query(project: Any, votes: bool) -> tuple[str, list[Any]]:
    """The SELECT (and parameters) the export runs, as export.py builds it today, without running it."""
    from annotation import export

    seen: list[tuple[str, list[Any]]] = []
    original = export._stream

    def capture(sql: str, params: list[Any]) -> Iterator[tuple[Any, ...]]:
        seen.append((sql, list(params)))
        return iter(())

    export._stream = capture
    try:
        next(export.vote_rows(project) if votes else export.preference_rows(project, export.PreferenceFilters()), None)
    finally:
        export._stream = original
    return seen[0]


def explain(sql: str, params: Any = None, declare: bool = False, setup: tuple[str, ...] = ()) -> str:
    from django.db import connection, transaction

    with transaction.atomic(), connection.cursor() as cursor:
        for statement in setup:  # e.g. the SET LOCAL the export issues before its cursor
            cursor.execute(statement)
        prefix = "EXPLAIN (ANALYZE, BUFFERS) " + ("DECLARE bench_explain CURSOR FOR " if declare else "")
        cursor.execute(prefix + sql, params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
        transaction.set_rollback(True)
    return plan


def work_latency(slug: str, pages: list[str]) -> dict[str, Any]:
    from django.contrib.auth.models import User
    from django.db import connection
    from django.http import StreamingHttpResponse
    from django.test import Client, override_settings
    from django.test.utils import CaptureQueriesContext

    from annotation import services
    from annotation.models import Project

    # DEBUG=0 wants collectstatic's manifest for {% static %}; plain storage instead, so the run writes nothing.
    override_settings(STORAGES={"staticfiles": {"BACKEND": PLAIN_STATIC}}).enable()
    project = Project.objects.get(slug=slug)
    admin_client, labeler_client = Client(HTTP_HOST="127.0.0.1"), Client(HTTP_HOST="127.0.0.1")
    admin_client.force_login(services.labeler_create(username="bench-admin", password="bench-pw", admin=True))
    labeler = User.objects.filter(username__startswith="labeler").order_by("id").first()
    assert labeler is not None
    labeler_client.force_login(labeler)
    export_sql = {kind: export_query(project, kind == "votes") for kind in ("preferences", "votes")}
    api = f"/api/v1/projects/{slug}"
    calls: list[tuple[str, str, Client, str | None]] = [
        ("agreement API", f"{api}/agreement/", admin_client, None),
        ("votes API (one labeler)", f"{api}/votes/?labeler={labeler.username}", admin_client, None),
        ("export preferences jsonl TTFB", f"{api}/export/?format=jsonl", admin_client, "preferences"),
        ("export votes jsonl TTFB", f"{api}/export/?format=jsonl&kind=votes", admin_client, "votes"),
        ("labeling page (labeler)", f"/p/{slug}/label/", labeler_client, None),
        *((f"page {url}", url.replace("{slug}", slug), admin_client, None) for url in pages),
    ]
    t = time.perf_counter()  # the first request of a process imports and warms up what the rest reuse
    admin_client.get("/")
    warmup_ms = round((time.perf_counter() - t) * 1000, 1)
    results = []
    for name, url, client, streamed in calls:
        times, slowest, status = [], ("", 0.0), 0
        for _ in range(RUNS):
            with CaptureQueriesContext(connection) as queries:
                t = time.perf_counter()
                response = client.get(url)
                if isinstance(response, StreamingHttpResponse):
                    next(iter(response.streaming_content), b"")
                times.append((time.perf_counter() - t) * 1000)
                response.close()
            status = response.status_code
            top = max(queries.captured_queries, key=lambda q: float(q["time"]), default=None)
            if top is not None and float(top["time"]) > slowest[1]:
                slowest = (top["sql"], float(top["time"]))
        row: dict[str, Any] = {"name": name, "url": url, "status": status, "runs_ms": [round(x, 1) for x in times],
               "p50_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1),
               "queries": len(queries.captured_queries), "slowest_query_ms": round(slowest[1] * 1000, 1)}  # fmt: skip
        row["slow"] = row["max_ms"] > SLOW_MS
        if row["slow"] and slowest[0]:
            row["slowest_query"], row["explain"] = slowest[0], explain(slowest[0])
        if row["slow"] and streamed:  # the export's own query runs on a server-side cursor the capture cannot see
            sets = tuple(q["sql"] for q in queries.captured_queries if q["sql"].lstrip().upper().startswith("SET "))
            row["export_query"], params = export_sql[streamed]
            row["export_explain"] = explain(row["export_query"], params, declare=True, setup=sets)
        results.append(row)
    return {"warmup_ms": warmup_ms, "calls": results, "peak_rss_mib": maxrss_mib()}


def worker_main(spec: dict[str, Any]) -> None:
    app.django_setup()  # run_worker passed app.environment
    work: Callable[..., dict[str, Any]] = globals()[f"work_{spec.pop('task')}"]
    print("\nRESULT " + json.dumps(work(**spec), default=str), flush=True)


def run_worker(db_url: str, deadline: float, **spec: Any) -> dict[str, Any]:
    """One measurement in a fresh interpreter; subprocess.run kills it on timeout or on any error here."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise BenchTimeout("out of time")
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=app.environment(db_url),
                          capture_output=True, text=True, timeout=remaining, cwd=ROOT)  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"worker {spec} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return dict(json.loads(lines[-1].removeprefix("RESULT ")))


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def print_report(r: dict[str, Any]) -> None:
    ld = r["load"]
    print(f"\nload: {r['parameters']['comparisons']:,} + {r['parameters']['comparisons'] // 4:,} comparisons, "
          f"copy {ld['copy_s']} s, FK check {ld['fk_check_s']} s, VACUUM ANALYZE {ld['vacuum_analyze_s']} s, "
          f"FK violations {ld['fk_violations']}")  # fmt: skip
    print("\nagreement_refresh          seconds  peak RSS MiB   phases (s)")
    for size, a in r["agreement"].items():
        print(f"  {size:<24} {a['seconds']:>7}  {a['peak_rss_mib']:>12}   {a['phases_s']}")
    k = r["krippendorff"]
    print(f"krippendorff.alpha (reliability_data {k['matrix_shape']}): {k['package_s']} s, value_counts= "
          f"{k['package_value_counts_s']} s, app's alpha {k['app_alpha_s']} s; refresh / package = "
          f"{r['agreement_to_krippendorff_ratio']}; alpha {k['package_alpha']:.12f} vs snapshot "
          f"{k['snapshot_alpha']}, |diff| {k['max_abs_diff']:.1e} -> agree to 1e-9: {k['agree_1e9']}")  # fmt: skip
    print("\nexport (full size | quarter)       rows/s    query rows/s  COPY rows/s  ratio   MB     peak RSS MiB")
    for name, e in r["export"].items():
        full, quarter = e["full"], e["quarter"]
        print(f"  {name:<30} {full['rows_per_s']:>9,} {full['query_rows_per_s']:>12,} {e['copy']['rows_per_s']:>12,} "
              f"{e['to_copy_ratio']:>7}  {full['bytes'] / 1e6:>6.0f}   {full['peak_rss_mib']} | "
              f"{quarter['peak_rss_mib']}")  # fmt: skip
    print(f"\nlatency ({RUNS} runs each; over {SLOW_MS:.0f} ms flagged)")
    for c in r["latency"]["calls"]:
        print(f"  {c['name']:<34} status {c['status']}  p50 {c['p50_ms']:>8} ms  max {c['max_ms']:>8} ms  "
              f"{c['queries']} queries, slowest {c['slowest_query_ms']} ms{'  SLOW' if c['slow'] else ''}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comparisons", type=int, default=1_000_000, help="comparisons of the big project")
    parser.add_argument("--database", default="flywheel_bench_big", help="dropped and recreated")
    parser.add_argument("--pages", nargs="*", default=[], help="extra admin URLs to time ({slug}: the project)")
    parser.add_argument("--skip-load", action="store_true", help="reuse the database of an earlier run")
    parser.add_argument("--timeout", type=float, default=3600, help="hard limit for the whole run in seconds")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0

    db_url = app.database_url(app.ADMIN_URL, args.database)
    with time_limit(args.timeout):
        deadline = time.monotonic() + args.timeout
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        r: dict[str, Any] = {
            "machine": {**app.database_machine(app.ADMIN_URL), "memory_gib": memory_gib},
            "parameters": {"comparisons": args.comparisons, "votes": args.comparisons * OVERLAP, "labelers": LABELERS,
                           "open_comparisons": OPEN_COMPARISONS, "database": args.database, "pages": args.pages,
                           "app_commit": app_commit()},
        }  # fmt: skip
        if args.skip_load:
            r["load"] = dict.fromkeys(("copy_s", "fk_check_s", "vacuum_analyze_s", "fk_violations"), "skipped")
            app.migrate(db_url)  # the app may have moved on
        else:
            log(f"resetting {args.database}, migrating, loading {args.comparisons:,} + {args.comparisons // 4:,}")
            app.reset_database(app.ADMIN_URL, args.database)
            app.migrate(db_url)
            r["load"] = load(db_url, args.comparisons)
            log(f"loaded: {r['load']}")
        r["agreement"] = {}
        for size, slug in (("full", BIG), ("quarter", SMALL)):
            log(f"agreement_refresh on {slug}")
            r["agreement"][size] = run_worker(db_url, deadline, task="agreement", slug=slug)
        with psycopg.connect(db_url, autocommit=True) as conn:  # what autovacuum would do after the upsert
            conn.execute("VACUUM ANALYZE annotation_aggregatedlabel, annotation_agreementsnapshot")
        log("krippendorff package")
        r["krippendorff"] = run_worker(db_url, deadline, task="krippendorff", slug=BIG)
        ratio = r["agreement"]["full"]["seconds"] / r["krippendorff"]["package_s"]
        r["agreement_to_krippendorff_ratio"] = round(ratio, 1)
        r["export"] = {}
        for votes, file_format in itertools.product((False, True), ("jsonl", "parquet")):
            name = f"{'votes' if votes else 'preferences'} {file_format}"
            log(f"export {name}")
            e = {size: run_worker(db_url, deadline, task="export", slug=slug, file_format=file_format, votes=votes)
                 for size, slug in (("full", BIG), ("quarter", SMALL))}  # fmt: skip
            e["copy"] = run_worker(db_url, deadline, task="copy", slug=BIG, votes=votes)
            e["to_copy_ratio"] = round(e["full"]["query_rows_per_s"] / e["copy"]["rows_per_s"], 3)
            r["export"][name] = e
        log("latency of admin reads")
        r["latency"] = run_worker(db_url, deadline, task="latency", slug=BIG, pages=args.pages)
        r["slow_calls"] = [c["name"] for c in r["latency"]["calls"] if c["slow"]]
        print_report(r)
        write_results(args.output, r)
        log(f"wrote {args.output}")
        return 1 if r["slow_calls"] or not r["krippendorff"]["agree_1e9"] else 0


if __name__ == "__main__":
    sys.exit(main())
