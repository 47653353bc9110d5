"""The app under a database benchmark: the environment it runs with, a database of its own (dropped and
recreated), its migrations, Django set up in the benchmark's own process, and the PostgreSQL server it ran on."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as pgsql
from psycopg.abc import Params, QueryNoTemplate
from psycopg.rows import TupleRow

from bench.common import ROOT, host, now_utc

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
SECRET_KEY = "bench-only-secret-key-" + "x" * 40


def database_url(admin_url: str, database: str) -> str:
    return admin_url.rsplit("/", 1)[0] + "/" + database


def environment(db_url: str) -> dict[str, str]:
    """The environment the app (migrate, gunicorn, Django in a worker or in-process) runs with."""
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DJANGO_SETTINGS_MODULE"}}
    env.update(
        DATABASE_URL=db_url,
        SECRET_KEY=SECRET_KEY,
        DEBUG="0",
        SECURE_SSL_REDIRECT="0",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        DJANGO_SETTINGS_MODULE="config.settings",
        LOG_LEVEL="WARNING",
    )
    return env


def reset_database(admin_url: str, database: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(database)))
        conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(database)))


def migrate(db_url: str, app_root: Path = ROOT) -> None:
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=app_root,
        env=environment(db_url),
        check=True,
        timeout=300,
    )


def django_setup(app_root: Path = ROOT) -> None:
    """Django in this process, with the environment already set (environment())."""
    os.chdir(app_root)  # celery's Django fixup puts the working directory first on sys.path
    sys.path.insert(0, str(app_root))
    import django

    django.setup()


def fetch_one(conn: psycopg.Connection[TupleRow], query: QueryNoTemplate, params: Params | None = None) -> TupleRow:
    """The row of a query that always returns one (a count, a SHOW): psycopg types fetchone() as maybe None."""
    row = conn.execute(query, params).fetchone()
    assert row is not None, query
    return row


def database_machine(admin_url: str) -> dict[str, Any]:
    """The machine and the PostgreSQL version a database benchmark ran on."""
    with psycopg.connect(admin_url) as conn:
        postgres = fetch_one(conn, "SHOW server_version")[0]
    return {**host(), "postgres": postgres, "date": now_utc()}
