"""Settings from the environment, `check --deploy`, and the embedded SQLite default for one user."""

from tests.workers import manage


def test_check_deploy_passes_with_production_like_settings():
    env = {
        "DEBUG": "false",
        "SECRET_KEY": "q8Zr-2vNw!pL0s_4hT9yB3uXe7cK1mJ6aD5fG0iH2oR8tV4wY6zQ",
        "ALLOWED_HOSTS": "flywheel.example.com",
        "CSRF_TRUSTED_ORIGINS": "https://flywheel.example.com",
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/test",
    }
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=env)
    assert result.returncode == 0, result.stderr + result.stdout


def test_missing_secret_key_with_debug_off_stops_start_up():
    result = manage("check", env={"DEBUG": "0"})
    assert result.returncode != 0
    assert "SECRET_KEY must be set when DEBUG is off" in result.stderr


def test_a_bad_boolean_names_the_variable():
    result = manage("check", env={"DEBUG": "maybe"})
    assert result.returncode != 0
    assert "DEBUG='maybe' is not a boolean" in result.stderr


def test_embedded_default_runs_on_sqlite_for_one_labeler(tmp_path):
    env = {"DEBUG": "1", "FLYWHEEL_VAR_DIR": str(tmp_path)}
    assert manage("migrate", "-v0", env=env).returncode == 0
    seeded = manage("seed_demo", "--password", "demo-password-1", env=env)
    assert seeded.returncode == 0, seeded.stderr
    script = (
        "from django.contrib.auth import get_user_model\n"
        "from annotation.models import Project, Vote\n"
        "from annotation.services import assignment_claim, vote_submit\n"
        "alice = get_user_model().objects.get(username='alice')\n"
        "project = Project.objects.get(slug='demo')\n"
        "while (a := assignment_claim(project=project, labeler=alice)) is not None:\n"
        "    vote_submit(assignment_id=a.pk, labeler=alice, choice='left')\n"
        "print(Vote.objects.filter(labeler=alice).count(), Vote.objects.values('comparison').distinct().count())\n"
    )
    result = manage("shell", "-v", "0", "-c", script, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["100", "100"]
    assert (tmp_path / "flywheel.sqlite3").exists()
    # Export and agreement work on SQLite too (the GROUP BY form of the export query).
    exported = manage("export_pairs", "demo", str(tmp_path / "demo.jsonl"), env=env)
    assert exported.returncode == 0, exported.stderr
    rows = (tmp_path / "demo.jsonl").read_text().splitlines()
    assert len(rows) == 100 and all('"chosen"' in row for row in rows)


# Every statement of annotation/sql.py, with its named parameters, and the agreement refresh
# (vote rows and the bulk upsert of aggregated labels) on the embedded SQLite default.
SQLITE_STATEMENTS_SCRIPT = """
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.db import connection
from django.utils import timezone

from annotation import services, sql
from annotation.importing import PairRecord
from annotation.models import AggregatedLabel, Comparison, Project, Vote

alice, bob = (get_user_model().objects.get(username=name) for name in ("alice", "bob"))
demo = Project.objects.get(slug="demo")

claimed = services.assignment_claim(project=demo, labeler=alice)
assert services.assignment_claim(project=demo, labeler=alice).pk == claimed.pk, "a live lease is renewed"
params = {"project": demo.pk, "overlap": demo.overlap, "labeler": bob.pk,
          "now": connection.ops.adapt_datetimefield_value(timezone.now())}
clause, passed_over = sql.passed_over([claimed.comparison_id])
with connection.cursor() as cursor:
    cursor.execute(sql.CANDIDATE.format(passed_over="", lock=""), params)
    assert cursor.fetchone()[0] == claimed.comparison_id
    cursor.execute(sql.CANDIDATE.format(passed_over=clause, lock=""), {**params, **passed_over})
    assert cursor.fetchone()[0] != claimed.comparison_id, "a passed-over comparison is left out"
later = timezone.now() + timedelta(seconds=demo.lease_seconds + 1)
assert services.vote_submit(assignment_id=claimed.pk, labeler=alice, choice="left", now=later)[1], "late but room"

tight = services.project_get_or_create(slug="tight", overlap=1)
services.pairs_import(project=tight, records=[
    PairRecord(line=1, prompt="Q", response_a="A", response_b="B"),
    PairRecord(line=2, prompt="Gold Q", response_a="right", response_b="wrong", gold_choice="a"),
])
expired = services.assignment_claim(project=tight, labeler=alice)
taken_over = services.assignment_claim(project=tight, labeler=bob, now=later)
assert taken_over.comparison_id == expired.comparison_id, "an expired lease leaves room"
services.vote_submit(assignment_id=taken_over.pk, labeler=bob, choice="right", now=later)
try:
    services.vote_submit(assignment_id=expired.pk, labeler=alice, choice="left", now=later)
except services.LeaseGone:
    pass
else:
    raise AssertionError("a late vote on a full comparison must be refused")
Project.objects.filter(pk=tight.pk).update(gold_rate=1.0)
tight.refresh_from_db()
gold = services.assignment_claim(project=tight, labeler=alice, now=later)
assert gold.comparison.origin == Comparison.Origin.GOLD
services.vote_submit(assignment_id=gold.pk, labeler=alice, choice="left", now=later)

while (assignment := services.assignment_claim(project=demo, labeler=alice)) is not None:
    services.vote_submit(assignment_id=assignment.pk, labeler=alice, choice="right", strength=2)
snapshot = services.agreement_refresh(project_id=demo.pk)
assert snapshot.figures["votes"] == Vote.objects.filter(comparison__project=demo).count() == 100
assert AggregatedLabel.objects.filter(comparison__project=demo).count() == 100
tight_snapshot = services.agreement_refresh(project_id=tight.pk)
assert tight_snapshot.figures["votes"] == 1, "gold votes count for gold accuracy only"
assert {row["username"]: row["gold_items"] for row in tight_snapshot.labelers} == {"alice": 1, "bob": 0}
print("ok")
"""


def test_every_claim_and_vote_statement_runs_on_sqlite(tmp_path):
    env = {"DEBUG": "1", "FLYWHEEL_VAR_DIR": str(tmp_path)}
    assert manage("migrate", "-v0", env=env).returncode == 0
    seeded = manage("seed_demo", "--password", "demo-password-1", env=env)
    assert seeded.returncode == 0, seeded.stderr
    result = manage("shell", "-v", "0", "-c", SQLITE_STATEMENTS_SCRIPT, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok"]
