"""Reads for pages, the API and the services."""

import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.contrib.auth.models import AnonymousUser, User
from django.core.exceptions import PermissionDenied
from django.db import connection, connections
from django.db.models import DateTimeField, Exists, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.http import Http404
from django.utils import timezone

from annotation import access_cache
from annotation.models import (
    ADMINS_GROUP,
    AI_LABELERS_GROUP,
    LABELERS_GROUP,
    AgreementSnapshot,
    Assignment,
    Comparison,
    Project,
    Prompt,
    Response,
    Vote,
)


def _roles(user: User) -> set[str]:
    """The user's groups, read once per user object (that is, once per request): a labeling
    request checks access in several places. Token authentication brings them from the access
    cache (roles_known)."""
    roles = getattr(user, "_flywheel_roles", None)
    if roles is None:
        names = [LABELERS_GROUP, ADMINS_GROUP, AI_LABELERS_GROUP]
        roles = set(user.groups.filter(name__in=names).values_list("name", flat=True))
        roles_known(user, roles)
    return roles


def user_roles(user: User) -> set[str]:
    return set(_roles(user))


def roles_known(user: User, roles: set[str]) -> None:
    user._flywheel_roles = roles  # type: ignore[attr-defined]  # a per-request cache on the user object


def labeler_or_none(user: User | AnonymousUser) -> User | None:
    """The user when they may label (in the labelers or admins group), else None."""
    return user if isinstance(user, User) and _roles(user) - {AI_LABELERS_GROUP} else None


def labeler_kind(user: User) -> str:
    """ "ai" for an AI labeler's account, "human" for everyone else's."""
    return "ai" if AI_LABELERS_GROUP in _roles(user) else "human"


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


def projects_for_labeler(*, user: User) -> QuerySet[Project]:
    """The projects the user may see and label: admins every one, labelers the open ones and those
    they are a member of."""
    projects = Project.objects.order_by("name")
    if admin_or_none(user) is not None:
        return projects
    # A subquery rather than a join on members, which would repeat an open project once per member.
    return projects.filter(Q(members_only=False) | Q(pk__in=user.member_projects.values("pk")))


def project_for_labeler(*, user: User | AnonymousUser, slug: str) -> Project:
    """The project when the user may label in it; 403 for a non-labeler, and 404, as for a project
    that does not exist, when it is members-only and they are not a member, so that its name and
    existence stay hidden. As projects_for_labeler decides, from the access cache."""
    labeler = labeler_required(user)
    project = _visible(labeler, access_cache.project_cached(slug=slug))
    if project is None:
        raise Http404("No such project.")
    return project


def project_for_labeler_or_none(*, user: User, project_id: int) -> Project | None:
    """The project by id when the labeler may see it (project_for_labeler's rule), else None."""
    return _visible(user, access_cache.project_cached(project_id=project_id))


def _visible(labeler: User, project: Project | None) -> Project | None:
    if project is None or not project.members_only or admin_or_none(labeler) is not None:
        return project
    return project if labeler.pk in access_cache.project_member_ids(project) else None


def assignment_current(*, project: Project, labeler: User) -> Assignment | None:
    """The labeler's live lease in the project, if any, ready to display; a read, renewing nothing."""
    return (
        Assignment.objects.select_related(
            "comparison__prompt", "comparison__response_a", "comparison__response_b", "comparison__project"
        )
        .filter(
            comparison__project=project,
            labeler=labeler,
            status=Assignment.Status.OPEN,
            expires_at__gt=timezone.now(),
        )
        .order_by("-expires_at")
        .first()
    )


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


# assignment_for_display's tables, each model's columns in its own order. One hand-written join: the
# claim answers with it on every labeling request, and compiling the ORM's select_related for it cost
# more CPU than the rest of the claim (bench/labeling_load.py).
_DISPLAY_JOIN = (
    ("a", Assignment, ""),
    ("c", Comparison, "c.id = a.comparison_id"),
    ("pr", Prompt, "pr.id = c.prompt_id"),
    ("ra", Response, "ra.id = c.response_a_id"),
    ("rb", Response, "rb.id = c.response_b_id"),
    ("p", Project, "p.id = c.project_id"),
)
_ASSIGNMENT_FOR_DISPLAY = "SELECT {columns} FROM {tables} WHERE a.id = %(assignment)s".format(
    columns=", ".join(
        f'{alias}."{field.column}"' for alias, model, _ in _DISPLAY_JOIN for field in model._meta.concrete_fields
    ),
    tables=" JOIN ".join(
        f"{model._meta.db_table} {alias}" + (f" ON {on}" if on else "") for alias, model, on in _DISPLAY_JOIN
    ),
)


def assignment_for_display(*, assignment_id: int) -> Assignment:
    """The assignment with its comparison, prompt, both responses and project loaded, as
    select_related would load them (the backend's converters applied to every column)."""
    with connection.cursor() as cursor:
        cursor.execute(_ASSIGNMENT_FOR_DISPLAY, {"assignment": assignment_id})
        row = cursor.fetchone()
    if row is None:
        raise Assignment.DoesNotExist(f"no assignment {assignment_id}")
    instances: list[Any] = []
    start = 0
    for model, attnames, converters in _display_converters(connection.alias):
        values = list(row[start : start + len(attnames)])
        for index, field, field_converters in converters:
            for converter in field_converters:
                values[index] = converter(values[index], field.cached_col, connection)
        instances.append(model.from_db(connection.alias, attnames, values))
        start += len(attnames)
    assignment, comparison, prompt, response_a, response_b, project = instances
    comparison.prompt, comparison.response_a, comparison.response_b, comparison.project = (
        prompt, response_a, response_b, project,
    )  # fmt: skip
    assignment.comparison = comparison
    return assignment


@functools.cache
def _display_converters(alias: str) -> list[tuple[Any, list[str], list[tuple[int, Any, list[Any]]]]]:
    """For each of _DISPLAY_JOIN's models: its column names, and the converters the ORM would apply
    to each column that has any (a JSON field's, a boolean on SQLite), found once per database alias
    rather than once per row."""
    database = connections[alias]
    out = []
    for _, model, _ in _DISPLAY_JOIN:
        fields = model._meta.concrete_fields
        converters = []
        for index, field in enumerate(fields):
            found = database.ops.get_db_converters(field.cached_col) + field.get_db_converters(database)
            if found:
                converters.append((index, field, found))
        out.append((model, [field.attname for field in fields], converters))
    return out


@dataclass(frozen=True)
class VotePage:
    votes: list[Vote]
    next_after: int | None  # the `after` of the next page; None on the last one


def votes_for_labeler(*, project: Project, labeler: User, after: int, limit: int) -> VotePage:
    """The labeler's votes in the project with ids above `after`, oldest first. Keyset pages: no
    COUNT over a labeler's votes, which is slow on big projects."""
    votes = list(
        Vote.objects.filter(comparison__project=project, labeler=labeler, pk__gt=after).order_by("pk")[: limit + 1]
    )
    page = votes[:limit]
    return VotePage(votes=page, next_after=page[-1].pk if len(votes) > limit else None)


def latest_snapshot(*, project: Project, round_number: int | None = None) -> AgreementSnapshot | None:
    return AgreementSnapshot.objects.filter(project=project, round=round_number).order_by("-computed_at", "-id").first()


def snapshot_is_stale(*, project: Project, snapshot: AgreementSnapshot | None) -> bool:
    """True when there is no snapshot or a vote came in after it was computed."""
    if snapshot is None:
        return True
    last_vote = Vote.objects.filter(comparison__project=project).order_by("-created_at").values("created_at").first()
    return last_vote is not None and last_vote["created_at"] > snapshot.computed_at


def projects_with_uncounted_votes(*, voted_before: datetime) -> list[int]:
    """Projects with a vote from before `voted_before` that their latest snapshot does not count."""
    latest = AgreementSnapshot.objects.filter(project=OuterRef("pk"), round=None).order_by("-computed_at")
    never = Value(datetime.min.replace(tzinfo=UTC))
    counted_until = Coalesce(Subquery(latest.values("computed_at")[:1]), never, output_field=DateTimeField())
    uncounted = Vote.objects.filter(
        comparison__project=OuterRef("pk"), created_at__gt=OuterRef("counted_until"), created_at__lt=voted_before
    )
    projects = Project.objects.annotate(counted_until=counted_until).filter(Exists(uncounted)).order_by("pk")
    return list(projects.values_list("pk", flat=True))


_PROJECT_VOTES_SQL = """
SELECT v.comparison_id, v.labeler_id, v.choice, v.strength, v.winner_id, v.shown_left_id, v.time_spent_ms,
       c.gold_choice, c.round, v.source, v.judgment
FROM annotation_vote v JOIN annotation_comparison c ON c.id = v.comparison_id
WHERE c.project_id = %(project)s
ORDER BY v.id
"""


def project_vote_rows(*, project_id: int) -> list[tuple[Any, ...]]:
    """Every vote of the project, as the rows quality.ProjectVotes.from_rows takes. Plain tuples
    rather than model instances: a big project has millions of votes."""
    with connection.cursor() as cursor:
        cursor.execute(_PROJECT_VOTES_SQL, {"project": project_id})
        return cursor.fetchall()


def usernames_by_id(*, user_ids: list[int]) -> dict[int, str]:
    return dict(User.objects.filter(pk__in=user_ids).values_list("pk", "username"))


def project_member_names(*, project: Project) -> list[str]:
    return list(project.members.order_by("username").values_list("username", flat=True))
