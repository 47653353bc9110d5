from django.core.management.base import BaseCommand, CommandError, CommandParser

from annotation import simulation
from annotation.management.arguments import positive_int
from annotation.models import Project
from annotation.services import bot_token


class Command(BaseCommand):
    help = (
        "Bots sim-<slug>-<i> that claim and vote in a project through the HTTP API, judging by a hidden "
        "scoring function with Bradley-Terry noise."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("project_slug")
        parser.add_argument("--labelers", type=positive_int, default=3, help="How many bots (default 3).")
        parser.add_argument(
            "--preference", required=True, help="Hidden scoring function: marker:WORD, length or shorter."
        )
        parser.add_argument(
            "--noise",
            type=float,
            default=simulation.AGREEMENT_NOISE,
            help=f"Temperature T: P(left) = sigmoid(score gap / T); 0 is deterministic. Default "
            f"{simulation.AGREEMENT_NOISE}: about 73%% agreement between bots on marker pairs.",
        )
        parser.add_argument("--url", default="http://127.0.0.1:8000", help="The running server.")
        parser.add_argument("--max-votes", type=positive_int, help="Stop after this many votes in all.")
        parser.add_argument("--seed", type=int, help="Seed of the bots' noise.")

    def handle(
        self,
        *args: object,
        project_slug: str,
        labelers: int,
        preference: str,
        noise: float,
        url: str,
        max_votes: int | None,
        seed: int | None,
        **options: object,
    ) -> None:
        try:
            score = simulation.preference(preference)
        except ValueError as error:
            raise CommandError(f"--preference: {error}") from None
        if not noise >= 0:  # also refuses nan
            raise CommandError(f"--noise must be 0 or more, got {noise}")
        if not Project.objects.filter(slug=project_slug).exists():
            raise CommandError(f"No project {project_slug!r}.")
        tokens = {name: bot_token(name) for name in (f"sim-{project_slug}-{i}" for i in range(labelers))}
        try:
            summary = simulation.run_bots(
                base_url=url,
                project_slug=project_slug,
                tokens=tokens,
                score=score,
                noise=noise,
                max_votes=max_votes,
                seed=seed,
            )
        except simulation.SimulationError as error:
            raise CommandError(str(error)) from None
        self.stdout.write(
            f"{summary.votes} votes by {labelers} bots in {summary.elapsed_s:.1f} s "
            f"({summary.votes_per_second:.1f} votes/s), preference {preference}, noise {noise}."
        )
        for name, bot in summary.bots.items():
            refused = f", {bot.refused} refused" if bot.refused else ""
            self.stdout.write(f"  {name:<30} {bot.votes} votes{refused}")
