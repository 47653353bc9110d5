from django.core.management.base import BaseCommand, CommandError, CommandParser

from annotation import ai_labeling, simulation
from annotation.management.arguments import positive_int
from annotation.models import Project, Vote
from annotation.services import InvalidInput
from judging.judges import JudgeError


class Command(BaseCommand):
    help = (
        "An AI labeler that claims and votes in a project through the HTTP API, judging each pair in both orders "
        "by the project's constitution (RLAIF), until the queue is empty for it or --max-votes."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("project_slug")
        parser.add_argument(
            "--judge",
            required=True,
            help="A causal LM (Hugging Face id, local path or smollm2-135m), or openai:BASE_URL#MODEL for an "
            "OpenAI-compatible chat-completions endpoint (key in FLYWHEEL_JUDGE_API_KEY).",
        )
        parser.add_argument("--url", default="http://127.0.0.1:8000", help="The running server.")
        parser.add_argument("--max-votes", type=positive_int, help="Stop after this many votes.")
        parser.add_argument("--name", help="The AI labeler's account (default: ai- and the judge's name).")
        parser.add_argument(
            "--timeout", type=float, default=60.0, help="Seconds an endpoint judge may take per request (default 60)."
        )
        parser.add_argument(
            "--chain-of-thought",
            action="store_true",
            help="A critique first, then the verdict; the critique is the rationale.",
        )

    def handle(self, *args: object, project_slug: str, judge: str, url: str, max_votes: int | None,
               name: str | None, chain_of_thought: bool, timeout: float, **options: object) -> None:  # fmt: skip
        project = Project.objects.filter(slug=project_slug).first()
        if project is None:
            raise CommandError(f"No project {project_slug!r}.")
        try:
            summary = ai_labeling.ai_label(
                project=project, judge=judge, base_url=url, name=name, max_votes=max_votes,
                chain_of_thought=chain_of_thought, timeout=timeout,
            )  # fmt: skip
        except (InvalidInput, JudgeError, simulation.SimulationError) as error:
            raise CommandError(str(error)) from None
        for labeler, result in summary.bots.items():
            mine = Vote.objects.filter(labeler__username=labeler, comparison__project=project)
            failed = mine.filter(judgment__parse_failed=True).count()
            self.stdout.write(
                f"{labeler}: {result.votes} votes in {summary.elapsed_s:.1f} s "
                f"({summary.votes_per_second:.2f} votes/s); verdicts that could not be read (counted as even), "
                f"in all its votes here: {failed} of {mine.count()}"
            )
