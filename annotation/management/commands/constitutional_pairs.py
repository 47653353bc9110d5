from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from annotation.ai_labeling import constitutional_import, constitutional_records
from annotation.management.arguments import positive_int
from annotation.models import Project


class Command(BaseCommand):
    help = (
        "Constitutional AI's supervised stage: the policy answers each prompt, critiques its answer by a sampled "
        "principle and revises it; each (revision, original) pair goes into the project's queue as a comparison of "
        "origin constitutional, for people and AI labelers to judge. Pairs already there are skipped."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("project_slug")
        parser.add_argument("--policy", required=True, help="Model id, local path or smollm2-135m.")
        parser.add_argument("--prompts", type=Path, required=True, help='JSON Lines with a "prompt" per line.')
        parser.add_argument("--principles", type=Path, help="Markdown list of principles (default: the constitution).")
        parser.add_argument("--n", type=positive_int, default=1, help="Answers (and revisions) per prompt.")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--max-new-tokens", type=positive_int, default=128)
        parser.add_argument(
            "--label-revision", action="store_true", help="Also cast an AI vote for each revision (Constitutional AI)."
        )

    def handle(self, *args: object, project_slug: str, policy: str, prompts: Path, principles: Path | None,
               n: int, seed: int, max_new_tokens: int, label_revision: bool, **options: object) -> None:  # fmt: skip
        from judging import judges
        from training import ppo

        project = Project.objects.filter(slug=project_slug).first()
        if project is None:
            raise CommandError(f"No project {project_slug!r}.")
        try:
            text = principles.read_text() if principles else project.constitution
            parsed = judges.parse_constitution(text)
            if not parsed:
                raise CommandError(f"no principles in {principles or 'the project constitution'}")
            records = constitutional_records(
                policy=policy, prompts=ppo.load_prompts(prompts), principles=parsed, n=n, seed=seed,
                max_new_tokens=max_new_tokens,
            )  # fmt: skip
        except (OSError, ValueError) as error:
            raise CommandError(str(error)) from None
        result = constitutional_import(project=project, records=records, policy=policy, label_revision=label_revision)
        self.stdout.write(
            f"{result.created} constitutional pairs added, {result.duplicates} already there, "
            f"{len(ppo.load_prompts(prompts)) * n - len(records)} revisions identical to their original left out."
        )
