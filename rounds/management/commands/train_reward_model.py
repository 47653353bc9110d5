import dataclasses

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
        from training.reward import RewardConfig

        parser.add_argument("project_slug")
        for spec in dataclasses.fields(RewardConfig):
            flag = "--" + spec.name.replace("_", "-")
            if spec.type is bool:
                parser.add_argument(flag, action="store_true", default=None, help=spec.metadata["help"])
            else:
                kind = spec.type if spec.type in (int, float) else str
                parser.add_argument(flag, type=kind, help=spec.metadata["help"])  # type: ignore[arg-type]

    def handle(self, *args: object, project_slug: str, **options: object) -> None:
        project = Project.objects.filter(slug=project_slug).first()
        if project is None:
            raise CommandError(f"no project {project_slug!r}")
        from training.reward import RewardConfig

        names = {spec.name for spec in dataclasses.fields(RewardConfig)}
        overrides = {name: value for name, value in options.items() if name in names and value is not None}
        try:
            model = reward_model_start(project=project, overrides=overrides)
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
