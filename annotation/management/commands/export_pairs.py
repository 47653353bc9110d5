from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from annotation.export import FORMATS, SOURCES, Format, PreferenceFilters, export_stream
from annotation.models import Project


class Command(BaseCommand):
    help = (
        "Export a project's preference pairs (prompt, chosen, rejected + metadata) in the Hugging Face "
        "format, TRL's unpaired rows for KTO with --kto, or its raw votes with --votes, as JSON Lines or Parquet."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("project_slug")
        parser.add_argument("out_file", type=Path)
        parser.add_argument("--format", choices=FORMATS, help="Default: from the file name (.parquet), else jsonl.")
        parser.add_argument("--votes", action="store_true", help="One row per vote instead of one per pair.")
        parser.add_argument(
            "--kto",
            action="store_true",
            help="TRL's unpaired rows for KTO (prompt, completion, label): chosen true, rejected false; with "
            "--include-ties a both-bad pair gives two false rows and a tie none.",
        )
        parser.add_argument("--round", type=int, help="Only pairs of this training round.")
        parser.add_argument("--min-confidence", type=float, default=0.0, help="Drop pairs below this confidence.")
        parser.add_argument("--include-ties", action="store_true", help="Keep pairs judged tie or both bad.")
        parser.add_argument(
            "--min-gold-accuracy", type=float, help="Leave out labelers below this gold accuracy (default: project's)."
        )
        parser.add_argument("--no-pseudonymize", action="store_true", help="Raw votes with real labeler ids.")
        parser.add_argument(
            "--source",
            choices=SOURCES,
            help="Whose votes make the labels: human, ai or all (default: the project's "
            "setting: AI votes count unless they are suggestions).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        slug = str(options["project_slug"])
        project = Project.objects.filter(slug=slug).first()
        if project is None:
            raise CommandError(f"no project {slug!r}")
        out_file = Path(str(options["out_file"]))
        file_format: Format = options["format"] or ("parquet" if out_file.suffix == ".parquet" else "jsonl")
        if options["kto"] and options["votes"]:
            raise CommandError("--kto and --votes are two different exports: choose one")
        min_confidence = float(options["min_confidence"])
        if not 0 <= min_confidence <= 1:
            raise CommandError("--min-confidence must be between 0 and 1")
        filters = PreferenceFilters(
            round=options["round"],
            min_confidence=min_confidence,
            include_ties=bool(options["include_ties"]),
            min_gold_accuracy=options["min_gold_accuracy"],
            source=options["source"],
        )
        partial = out_file.with_name(out_file.name + ".partial")
        size = 0
        with partial.open("wb") as handle:
            for chunk in export_stream(
                project,
                file_format=file_format,
                votes=bool(options["votes"]),
                kto=bool(options["kto"]),
                filters=filters,
                pseudonymize=not options["no_pseudonymize"],
            ):
                handle.write(chunk)
                size += len(chunk)
        partial.replace(out_file)
        self.stdout.write(self.style.SUCCESS(f"Wrote {out_file} ({size:,} bytes, {file_format})."))
