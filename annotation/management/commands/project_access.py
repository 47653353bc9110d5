from django.core.management.base import BaseCommand, CommandError, CommandParser

from annotation import selectors, services
from annotation.models import Project


class Command(BaseCommand):
    help = (
        "Make a project members-only (only its members and admins see it) or open to every labeler, "
        "and add or remove members. Prints the resulting state."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug")
        access = parser.add_mutually_exclusive_group()
        access.add_argument("--members-only", action="store_true", help="Only members and admins see the project.")
        access.add_argument("--open", action="store_true", help="Every labeler sees the project (the default).")
        parser.add_argument("--add", nargs="+", default=[], metavar="USER", help="Usernames to make members.")
        parser.add_argument("--remove", nargs="+", default=[], metavar="USER", help="Usernames to remove.")

    def handle(
        self,
        *args: object,
        slug: str,
        members_only: bool,
        open: bool,  # noqa: A002  # the option's name
        add: list[str],
        remove: list[str],
        **options: object,
    ) -> None:
        try:
            project = Project.objects.get(slug=slug)
        except Project.DoesNotExist:
            raise CommandError(f"No project {slug!r}.") from None
        try:
            services.project_access_set(
                project=project, members_only=True if members_only else False if open else None, add=add, remove=remove
            )
        except services.InvalidInput as error:
            raise CommandError(str(error)) from None
        access = "members-only" if project.members_only else "open to every labeler"
        members = ", ".join(selectors.project_member_names(project=project)) or "none"
        self.stdout.write(self.style.SUCCESS(f"{project.slug}: {access}; members: {members}"))
