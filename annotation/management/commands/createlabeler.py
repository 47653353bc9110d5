from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from annotation.services import labeler_create


class Command(BaseCommand):
    help = "Create a labeler (or update their password); --admin also puts them in the admins group."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--password", required=True)
        parser.add_argument("--admin", action="store_true", help="Also an admin (dashboard, Django admin).")

    def handle(self, *args: object, username: str, password: str, admin: bool, **options: object) -> None:
        try:
            validate_password(password)
        except ValidationError as error:
            raise CommandError("--password: " + " ".join(error.messages)) from None
        labeler_create(username=username, password=password, admin=admin)
        role = "admin and labeler" if admin else "labeler"
        self.stdout.write(self.style.SUCCESS(f"{username} is a {role}."))
