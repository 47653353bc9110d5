from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from annotation.importing import summarize_errors
from annotation.services import ImportRejected, pairs_import_file


class Command(BaseCommand):
    help = (
        "Import comparison pairs from a JSON Lines file into a project (created if missing). "
        'Lines are {"prompt", "response_a", "response_b", "meta"?, "gold"?} or the {"chosen", "rejected"} '
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
        try:
            lines = file.read_bytes().splitlines()
        except OSError as error:
            raise CommandError(f"{file}: {error.strerror}") from None
        try:
            project, result = pairs_import_file(
                project_slug=project_slug, lines=lines, overlap=overlap, skip_invalid=skip_invalid
            )
        except ImportRejected as error:
            raise CommandError(f"{file}: {error}") from None
        if result.invalid_lines:
            self.stderr.write("skipped invalid lines:\n" + summarize_errors(list(result.invalid_lines)))
        self.stdout.write(
            self.style.SUCCESS(
                f"{project.slug}: {result.created} comparisons created, {result.duplicates} duplicates skipped"
                + (f", {len(result.invalid_lines)} invalid lines skipped" if result.invalid_lines else "")
                + f" (overlap {project.overlap})."
            )
        )
