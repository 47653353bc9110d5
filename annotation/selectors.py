"""Reads for pages and the API."""

from dataclasses import dataclass

from django.contrib.auth.models import AnonymousUser, User
from django.core.exceptions import PermissionDenied
from django.db.models import Exists, OuterRef, QuerySet
from django.utils import timezone

from annotation.models import ADMINS_GROUP, LABELERS_GROUP, Assignment, Comparison, Project, Vote


def _roles(user: User) -> set[str]:
    """The user's groups, read once per user object (that is, once per request): a labeling
    request checks access in several places."""
    roles = getattr(user, "_flywheel_roles", None)
    if roles is None:
        roles = set(user.groups.filter(name__in=[LABELERS_GROUP, ADMINS_GROUP]).values_list("name", flat=True))
        user._flywheel_roles = roles  # type: ignore[attr-defined]
    return roles


def labeler_or_none(user: User | AnonymousUser) -> User | None:
    """The user when they may label (in the labelers or admins group), else None."""
    return user if isinstance(user, User) and _roles(user) else None


def admin_or_none(user: User | AnonymousUser) -> User | None:
    """The user when they are in the admins group, else None."""
    return user if isinstance(user, User) and ADMINS_GROUP in _roles(user) else None


def labeler_required(user: User | AnonymousUser) -> User:
    """The user, who may label; otherwise 403 (the views, the API and the dashboard share this)."""
    labeler = labeler_or_none(user)
    if labeler is None:
        raise PermissionDenied("You are not in the labelers group.")
    return labeler


def admin_required(user: User | AnonymousUser) -> User:
    admin = admin_or_none(user)
    if admin is None:
        raise PermissionDenied("Only admins can do this.")
    return admin


def user_can_label(user: User | AnonymousUser) -> bool:
    return labeler_or_none(user) is not None


def projects_for_labeler() -> QuerySet[Project]:
    return Project.objects.order_by("name")


@dataclass(frozen=True)
class Progress:
    votes_today: int
    remaining: int


def labeler_progress(*, project: Project, labeler: User) -> Progress:
    """Votes this labeler cast today (any project), and comparisons of this project still open to them."""
    start_of_day = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    done_by_labeler = Assignment.objects.filter(
        comparison=OuterRef("pk"),
        labeler=labeler,
        status__in=[Assignment.Status.VOTED, Assignment.Status.SKIPPED],
    )
    remaining = (
        Comparison.objects.filter(project=project, vote_count__lt=project.overlap)
        .filter(~Exists(done_by_labeler))
        .count()
    )
    return Progress(
        votes_today=Vote.objects.filter(labeler=labeler, created_at__gte=start_of_day).count(),
        remaining=remaining,
    )


def assignment_for_display(*, assignment_id: int) -> Assignment:
    return Assignment.objects.select_related(
        "comparison__prompt", "comparison__response_a", "comparison__response_b", "comparison__project"
    ).get(pk=assignment_id)
