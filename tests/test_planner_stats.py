"""Bulk writes of pairs keep PostgreSQL's planner informed: the claim that follows an import is planned
on statistics that know the new rows, not on the empty tables autovacuum saw a minute before."""

import pytest
from django.core.management import call_command
from django.db import connection

from annotation.services import pairs_import, project_get_or_create
from tests.factories import make_records, write_lines

# Committed for real (on_commit runs), as after an import in production.
pytestmark = pytest.mark.django_db(transaction=True)


def planner_rows(table: str) -> float:
    with connection.cursor() as cursor:
        cursor.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass", [table])
        return cursor.fetchone()[0]


def last_analyze(table: str):
    with connection.cursor() as cursor:
        cursor.execute("SELECT last_analyze FROM pg_stat_user_tables WHERE relname = %s", [table])
        return cursor.fetchone()[0]


def test_import_pairs_leaves_the_planner_knowing_the_rows(tmp_path):
    before = last_analyze("annotation_comparison")
    lines = [{"prompt": f"Question {i}?", "response_a": f"Yes {i}.", "response_b": f"No {i}."} for i in range(500)]
    call_command("import_pairs", "fresh", str(write_lines(tmp_path, lines)))

    assert planner_rows("annotation_comparison") == 500
    assert planner_rows("annotation_response") == 1000
    assert planner_rows("annotation_prompt") == 500
    analyzed = last_analyze("annotation_comparison")
    assert analyzed is not None and (before is None or analyzed > before)


def test_a_few_samples_into_a_known_table_are_left_to_autovacuum():
    project = project_get_or_create(slug="known")
    pairs_import(project=project, records=make_records(500))
    analyzed = last_analyze("annotation_comparison")

    pairs_import(project=project, records=make_records(8, tag="round-1-"))

    assert planner_rows("annotation_comparison") == 500  # ANALYZE would have made it 508
    assert last_analyze("annotation_comparison") == analyzed
