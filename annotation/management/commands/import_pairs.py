from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from annotation.importing import parse_pair_lines, summarize_errors
from annotation.services import pairs_import, project_get_or_create


class Command(BaseCommand):
    help = (
        "Import comparison pairs from a JSON Lines file into a project (created if missing). "
        'Lines are {"prompt", "response_a", "response_b", "meta"?} or the {"chosen", "rejected"} '
        "transcript format. A bad line aborts the whole import; nothing is written."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("project_slug")
        parser.add_argument("file", type=Path)
        parser.add_argument("--overlap", type=int, help="Labelers per comparison for this project.")
        parser.add_argument(
            "--skip-invalid",
            action="store_true",
            help="Import the good lines and report the bad ones instead of aborting.",
        )

    def handle(
        self, *args: object, project_slug: str, file: Path, overlap: int | None, skip_invalid: bool, **options: object
    ) -> None:
        if overlap is not None and overlap < 1:
            raise CommandError("--overlap must be at least 1")
        try:
            with file.open("rb") as handle:
                lines = handle.read().splitlines()
        except OSError as error:
            raise CommandError(f"{file}: {error.strerror}") from None
        records, errors = parse_pair_lines(lines, max_line_bytes=settings.FLYWHEEL_IMPORT_MAX_LINE_BYTES)
        if errors and not (skip_invalid and records):
            raise CommandError(f"{file}: nothing imported.\n" + summarize_errors(errors))
        with transaction.atomic():
            project = project_get_or_create(slug=project_slug, overlap=overlap)
            result = pairs_import(project=project, records=records)
        if errors:
            self.stderr.write("skipped invalid lines:\n" + summarize_errors(errors))
        self.stdout.write(
            self.style.SUCCESS(
                f"{project.slug}: {result.created} comparisons created, {result.duplicates} duplicates skipped"
                + (f", {len(errors)} invalid lines skipped" if errors else "")
                + f" (overlap {project.overlap})."
            )
        )
