import secrets
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from annotation.services import ImportRejected, labeler_create, pairs_import_file, project_update

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
        credentials = {}
        with transaction.atomic():
            try:
                project, result = pairs_import_file(
                    project_slug="demo", lines=DEMO_FILE.read_bytes().splitlines(), overlap=3
                )
            except ImportRejected as error:
                raise CommandError(f"{DEMO_FILE} is broken: {error}") from None
            project_update(project=project, name="Demo: everyday assistant answers", guidelines=DEMO_GUIDELINES)
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
