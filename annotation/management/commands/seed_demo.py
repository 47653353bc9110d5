import secrets
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from annotation.importing import parse_pair_lines, summarize_errors
from annotation.services import labeler_create, pairs_import, project_get_or_create

DEMO_FILE = Path(__file__).resolve().parents[2] / "demo_data.jsonl"
DEMO_GUIDELINES = """\
Compare the two answers to the **last user message**.

1. **Correct** beats fluent: a confident factual error is worse than a hedge.
2. **Helpful**: does it answer what was asked, at a useful level of detail?
3. **Clear**: well organised, no padding.

Choose *tie* when both are equally good, *both bad* when neither is acceptable.
Strength says how sure you are: slightly, clearly or much better.
"""
DEMO_LABELERS = ["alice", "bob", "carol"]


class Command(BaseCommand):
    help = "Create demo users (printed with their passwords) and the small benign 'demo' project."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--password", help="Use this password for every demo user instead of random ones.")

    def handle(self, *args: object, password: str | None, **options: object) -> None:
        records, errors = parse_pair_lines(
            DEMO_FILE.read_bytes().splitlines(), max_line_bytes=settings.FLYWHEEL_IMPORT_MAX_LINE_BYTES
        )
        if errors:
            raise CommandError(f"{DEMO_FILE} is broken:\n{summarize_errors(errors)}")
        credentials = {}
        with transaction.atomic():
            project = project_get_or_create(slug="demo", name="Demo: everyday assistant answers", overlap=3)
            project.guidelines = DEMO_GUIDELINES
            project.save(update_fields=["guidelines"])
            result = pairs_import(project=project, records=records)
            for username, admin in [("admin", True)] + [(name, False) for name in DEMO_LABELERS]:
                credentials[username] = password or secrets.token_urlsafe(9)
                labeler_create(username=username, password=credentials[username], admin=admin)
        self.stdout.write(
            f"Project 'demo': {result.created} comparisons added, {result.duplicates} already there "
            f"(overlap {project.overlap})."
        )
        self.stdout.write("Demo users (username / password):")
        for username, secret in credentials.items():
            role = "admin + labeler" if username == "admin" else "labeler"
            self.stdout.write(f"  {username:<8} {secret}   ({role})")
