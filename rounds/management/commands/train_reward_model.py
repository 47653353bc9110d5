from django.core.management.base import BaseCommand, CommandError, CommandParser

from annotation.models import Project
from rounds.models import RewardModel
from rounds.reward_models import TrainingBusy, reward_model_start


class Command(BaseCommand):
    help = (
        "Train a new reward model version on a project's aggregated comparisons. With workers it is "
        "queued on the `gpu` queue; on the embedded default it runs here and now."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        from training import cli
        from training.reward import RewardConfig

        parser.add_argument("project_slug")
        # No defaults of its own: a flag left out keeps the project's (FLYWHEEL_REWARD_BACKBONE first).
        cli.add_config_flags(parser, RewardConfig, defaults=False)

    def handle(self, *args: object, project_slug: str, **options: object) -> None:
        from training import cli
        from training.reward import RewardConfig

        project = Project.objects.filter(slug=project_slug).first()
        if project is None:
            raise CommandError(f"no project {project_slug!r}")
        try:
            model = reward_model_start(project=project, overrides=cli.flags_given(RewardConfig, options))
        except TrainingBusy as error:
            raise CommandError(str(error)) from None
        model.refresh_from_db()
        if model.status == RewardModel.Status.FAILED:
            raise CommandError(f"reward model v{model.version} failed:\n{model.error}")
        if model.status == RewardModel.Status.SUCCEEDED:
            summary = ", ".join(f"{key} {value}" for key, value in model.summary().items())
            self.stdout.write(self.style.SUCCESS(f"reward model v{model.version}: {summary} ({model.artifact_path})"))
        else:
            self.stdout.write(f"reward model v{model.version} is {model.status}; the gpu worker trains it.")
