"""Every write of the labeling product, the Django admin and API tokens aside. Views, the API,
commands and tasks all call these."""

import json
import logging
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import current_app
from django.conf import settings
from django.contrib.auth.models import Group, Permission, User
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import UploadedFile
from django.db import DatabaseError, connection, transaction
from django.db.backends.base.operations import BaseDatabaseOperations
from django.dispatch import Signal
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerUnavailable
from redis import RedisError
from rest_framework.authtoken.models import Token

from annotation import selectors, sql
from annotation.agreement import CHOICES
from annotation.importing import PairRecord, parse_pair_lines, summarize_errors, text_problem
from annotation.models import (
    ADMINS_GROUP,
    LABELERS_GROUP,
    AggregatedLabel,
    AgreementSnapshot,
    Assignment,
    Comparison,
    Project,
    Prompt,
    Response,
    Vote,
    content_hash,
)
from annotation.quality import AGGREGATE_COLUMNS, ProjectVotes, quality_report

logger = logging.getLogger(__name__)

MAX_TIME_SPENT_MS = 24 * 3600 * 1000
SCREEN_CHOICES = ("left", "right", "tie", "both_bad")
MAX_RATIONALE_LENGTH = 5000
MAX_JUDGMENT_LENGTH = 10_000
MAX_IDEMPOTENCY_KEY_LENGTH = Vote._meta.get_field("idempotency_key").max_length
# Overlap is a PositiveSmallIntegerField, PostgreSQL's smallint: psycopg would send 65537 as 1.
MAX_OVERLAP = BaseDatabaseOperations.integer_field_ranges[Project._meta.get_field("overlap").get_internal_type()][1]


class LabelingError(Exception):
    """A request that cannot be honoured; the message is shown to the labeler as it is."""


class LeaseGone(LabelingError):
    pass


class AlreadyVoted(LabelingError):
    pass


class IdempotencyKeyReused(LabelingError):
    pass


class InvalidInput(LabelingError):
    """A value that breaks a rule or that its column cannot hold; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class InvalidVote(InvalidInput):
    pass


def labeler_create(*, username: str, password: str, admin: bool = False) -> User:
    """Create or update a user in the labelers group (and admins, when asked)."""
    with transaction.atomic():
        user, _ = User.objects.get_or_create(username=username)
        user.set_password(password)
        user.is_staff = user.is_staff or admin
        user.save()
        user.groups.add(Group.objects.get_or_create(name=LABELERS_GROUP)[0])
        if admin:
            admins, _ = Group.objects.get_or_create(name=ADMINS_GROUP)
            # Admins manage everything of the labeling product in the Django admin.
            admins.permissions.add(*Permission.objects.filter(content_type__app_label="annotation"))
            user.groups.add(admins)
    return user


def bot_token(username: str) -> str:
    """A simulated labeler's API token; the bot is created (a labeler with a random password) when missing."""
    user = User.objects.filter(username=username, groups__name=LABELERS_GROUP).first()
    if user is None:
        user = labeler_create(username=username, password=secrets.token_urlsafe(24))
    return Token.objects.get_or_create(user=user)[0].key


def project_check(*, slug: str, overlap: int | None = None) -> None:
    """Raise InvalidInput unless the slug is one the slug column and URLs take (letters, digits, `-`
    and `_`, at most 50) and the overlap fits its column."""
    try:
        Project._meta.get_field("slug").clean(slug, None)
    except ValidationError as error:
        raise InvalidInput("slug", f"{slug!r}: {' '.join(error.messages)}") from None
    if overlap is not None and not 1 <= overlap <= MAX_OVERLAP:
        raise InvalidInput("overlap", f"{overlap} is outside 1..{MAX_OVERLAP}")


def project_get_or_create(*, slug: str, name: str = "", overlap: int | None = None) -> Project:
    project_check(slug=slug, overlap=overlap)
    defaults: dict[str, object] = {"name": name or slug}
    if overlap is not None:
        defaults["overlap"] = overlap
    project, created = Project.objects.get_or_create(slug=slug, defaults=defaults)
    if not created and overlap is not None and project.overlap != overlap:
        project.overlap = overlap
        project.save(update_fields=["overlap"])
    return project


def project_update(*, project: Project, name: str, guidelines: str) -> Project:
    """Rename the project and set the guidelines labelers read beside every pair."""
    project.name, project.guidelines = name, guidelines
    project.save(update_fields=["name", "guidelines"])
    return project


def project_access_set(
    *, project: Project, members_only: bool | None = None, add: Sequence[str] = (), remove: Sequence[str] = ()
) -> Project:
    """Make the project members-only or open (None leaves it as is) and add or remove members by
    username. Unknown usernames raise InvalidInput, naming them all, and change nothing. A labeler
    who can no longer see the project loses the pairs they hold there: their open leases go, so a
    vote on one is a 404 like any unknown assignment, and the vote path checks no membership."""
    wanted = set(add) | set(remove)
    users = {user.username: user for user in User.objects.filter(username__in=wanted)}
    unknown = sorted(wanted - set(users))
    if unknown:
        raise InvalidInput("members", f"no such user: {', '.join(unknown)}")
    with transaction.atomic():
        if members_only is not None and project.members_only != members_only:
            project.members_only = members_only
            project.save(update_fields=["members_only"])
        project.members.add(*(users[name] for name in add))
        project.members.remove(*(users[name] for name in remove))
        if project.members_only:
            Assignment.objects.filter(comparison__project=project, status=Assignment.Status.OPEN).exclude(
                labeler__in=project.members.all()
            ).exclude(labeler__groups__name=ADMINS_GROUP).delete()
    return project


@dataclass(frozen=True)
class ImportResult:
    created: int
    duplicates: int
    invalid_lines: tuple[str, ...] = ()


class ImportRejected(LabelingError):
    """The file had bad lines; `errors` names each one. Nothing was written."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("nothing imported:\n" + summarize_errors(errors))


class ImportTooLarge(ImportRejected):
    """An upload over FLYWHEEL_IMPORT_MAX_BYTES, refused unread."""


def pairs_import_upload(
    *, project_slug: str, upload: UploadedFile, overlap: int | None = None, skip_invalid: bool = False
) -> tuple[Project, ImportResult]:
    """pairs_import_file for an uploaded file, which is read only when within FLYWHEEL_IMPORT_MAX_BYTES."""
    limit = settings.FLYWHEEL_IMPORT_MAX_BYTES
    if upload.size is not None and upload.size > limit:
        raise ImportTooLarge(
            [f"the file is {upload.size:,} bytes, over the limit of {limit:,} bytes (FLYWHEEL_IMPORT_MAX_BYTES)"]
        )
    return pairs_import_file(
        project_slug=project_slug, lines=upload.read().splitlines(), overlap=overlap, skip_invalid=skip_invalid
    )


def pairs_import_file(
    *, project_slug: str, lines: list[bytes], overlap: int | None = None, skip_invalid: bool = False
) -> tuple[Project, ImportResult]:
    """Validate a whole pair file, then import it into the project (created if missing).

    Bad lines abort the import unless skip_invalid, which imports the good ones and reports the rest.
    """
    try:
        project_check(slug=project_slug, overlap=overlap)
    except InvalidInput as error:
        raise ImportRejected([str(error)]) from None
    records, errors = parse_pair_lines(lines, max_line_bytes=settings.FLYWHEEL_IMPORT_MAX_LINE_BYTES)
    if errors and not (skip_invalid and records):
        raise ImportRejected(errors)
    with transaction.atomic():
        project = project_get_or_create(slug=project_slug, overlap=overlap)
        result = pairs_import(project=project, records=records)
    return project, ImportResult(result.created, result.duplicates, tuple(errors))


def pairs_import(
    *, project: Project, records: list[PairRecord], round_number: int | None = None, origin: str | None = None
) -> ImportResult:
    """Write parsed pairs in one transaction; pairs already present (either order) are skipped.
    With `round_number`, the pairs are a training round's samples (new policy against previous);
    `origin` names another origin (constitutional revisions)."""
    with transaction.atomic():
        existing = set(Comparison.objects.filter(project=project).values_list("content_hash", flat=True))
        prompt_ids = dict(Prompt.objects.filter(project=project).values_list("content_hash", "id"))
        fresh: list[tuple[str, PairRecord]] = []
        for record in records:
            pair_hash = content_hash(record.prompt, sorted([record.response_a, record.response_b]))
            if pair_hash not in existing:
                existing.add(pair_hash)
                fresh.append((pair_hash, record))

        new_prompts = {}
        for _, record in fresh:
            prompt_hash = content_hash(record.prompt)
            if prompt_hash not in prompt_ids and prompt_hash not in new_prompts:
                new_prompts[prompt_hash] = Prompt(
                    project=project,
                    text=record.prompt if isinstance(record.prompt, str) else "",
                    messages=None if isinstance(record.prompt, str) else record.prompt,
                    content_hash=prompt_hash,
                )
        for prompt in Prompt.objects.bulk_create(new_prompts.values(), batch_size=1000):
            prompt_ids[prompt.content_hash] = prompt.id

        responses = []
        for _, record in fresh:
            prompt_id = prompt_ids[content_hash(record.prompt)]
            responses.append(Response(prompt_id=prompt_id, text=record.response_a, source=record.source_a))
            responses.append(Response(prompt_id=prompt_id, text=record.response_b, source=record.source_b))
        responses = Response.objects.bulk_create(responses, batch_size=1000)

        Comparison.objects.bulk_create(
            [
                Comparison(
                    project=project,
                    prompt_id=prompt_ids[content_hash(record.prompt)],
                    response_a=responses[2 * index],
                    response_b=responses[2 * index + 1],
                    meta=record.meta,
                    origin=origin or _origin(record, round_number),
                    round=round_number,
                    gold_choice=record.gold_choice,
                    content_hash=pair_hash,
                )
                for index, (pair_hash, record) in enumerate(fresh)
            ],
            batch_size=1000,
        )
        created = len(fresh)
        if created and connection.vendor == "postgresql":
            # After commit: ANALYZE then counts the committed rows, and holds its table lock only briefly.
            transaction.on_commit(lambda: _planner_stats_refresh(created=created))
    return ImportResult(created=created, duplicates=len(records) - len(fresh))


# The tables an import writes that the claim and its display read. Assignments and votes grow a few
# rows a request while labeling, which autovacuum's own thresholds follow well enough.
_IMPORTED_TABLES = (Comparison, Prompt, Response)

# Autovacuum's own rule for when a table's statistics are stale (threshold + scale factor x the rows
# the planner knows of), with the server's settings. It applies the rule only every naptime (a
# minute), so a crowd that starts right after an import would be planned on the empty table.
_STATS_STALE = """
    SELECT %(created)s > current_setting('autovacuum_analyze_threshold')::int
                         + current_setting('autovacuum_analyze_scale_factor')::float8 * GREATEST(reltuples, 0)
    FROM pg_class WHERE oid = %(table)s::regclass
"""


def _planner_stats_refresh(*, created: int) -> None:
    """ANALYZE the imported tables when this import alone makes their statistics stale, as autovacuum
    would at its next pass. A round's few samples into a known table are left to autovacuum: ANALYZE
    reads up to 30,000 rows a table, which on a large project costs more than the samples' insert."""
    tables = ", ".join(connection.ops.quote_name(model._meta.db_table) for model in _IMPORTED_TABLES)
    try:
        stale = _fetch_one(_STATS_STALE, {"created": created, "table": Comparison._meta.db_table})
        if stale is not None and stale[0]:
            with connection.cursor() as cursor:
                cursor.execute(f"ANALYZE {tables}")
    except DatabaseError as error:  # the pairs are committed: say so, and leave the statistics to autovacuum
        logger.warning("ANALYZE after an import of %s pairs failed, autovacuum catches up: %r", created, error)


def _origin(record: PairRecord, round_number: int | None) -> str:
    if round_number is not None:
        return Comparison.Origin.ROUND_SAMPLE
    return Comparison.Origin.GOLD if record.gold_choice else Comparison.Origin.IMPORTED


# Claim and vote run on every labeling request, so they are a few hand-written statements
# (annotation/sql.py) rather than ORM chains: the ORM's own CPU was the bottleneck under load.


def _db_time(moment: datetime) -> Any:
    """A datetime as the backend stores it (SQLite keeps naive UTC text)."""
    return connection.ops.adapt_datetimefield_value(moment)


def _from_db_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if timezone.is_aware(value) else timezone.make_aware(value, UTC)
    return timezone.make_aware(datetime.fromisoformat(value), UTC)


def _fetch_one(sql: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def assignment_claim(*, project: Project, labeler: User, now: datetime | None = None) -> Assignment | None:
    """Lease the next comparison this labeler may vote on, or None when nothing is left.

    A labeler holding a live lease in the project gets it back, renewed, so a reload does not
    burn leases. Otherwise the candidate is a comparison they have not voted on or skipped whose
    votes plus live leases are below the overlap, partially labeled ones first; locking it with
    SKIP LOCKED keeps concurrent claimers off each other's rows without waiting. Gold pairs are
    mixed in at the project's gold rate; they check every labeler, so they have no overlap limit.
    """
    now = now or timezone.now()
    expires_at = now + timedelta(seconds=project.lease_seconds)
    lock = "FOR UPDATE OF c SKIP LOCKED" if connection.features.has_select_for_update_skip_locked else ""
    with transaction.atomic():
        clock = sql.POSTGRESQL_CLOCK if connection.vendor == "postgresql" else sql.CALLER_CLOCK
        current = _fetch_one(
            sql.RENEW_CURRENT_LEASE.format(clock=clock),
            {"expires_at": _db_time(expires_at), "labeler": labeler.pk, "now": _db_time(now), "project": project.pk},
        )
        if current is not None:
            return selectors.assignment_for_display(assignment_id=current[0])
        if project.gold_rate and random.random() < project.gold_rate:
            gold = _fetch_one(sql.GOLD_CANDIDATE, {"project": project.pk, "labeler": labeler.pk})
            if gold is not None:
                return _lease(gold[0], 0, 1 << 30, labeler, now, expires_at)
        params = {"project": project.pk, "overlap": project.overlap, "now": _db_time(now), "labeler": labeler.pk}
        passed_over: list[int] = []
        while True:
            excluded, excluded_params = sql.passed_over(passed_over)
            candidate = _fetch_one(sql.CANDIDATE.format(passed_over=excluded, lock=lock), {**params, **excluded_params})
            if candidate is None:
                return None
            assignment = _lease(candidate[0], candidate[1], project.overlap, labeler, now, expires_at)
            if assignment is not None:
                return assignment
            passed_over.append(candidate[0])


def _lease(
    comparison_id: int, vote_count: int, overlap: int, labeler: User, now: datetime, expires_at: datetime
) -> Assignment | None:
    row = _fetch_one(
        sql.LEASE_IF_ROOM,
        {
            "comparison": comparison_id,
            "labeler": labeler.pk,
            "left_is_a": random.random() < 0.5,
            "now": _db_time(now),
            "expires_at": _db_time(expires_at),
            "vote_count": vote_count,
            "overlap": overlap,
        },
    )
    return None if row is None else selectors.assignment_for_display(assignment_id=row[0])


def vote_on(
    *, comparison: Comparison, labeler: User, choice: str, judgment: dict[str, Any] | None = None, rationale: str = ""
) -> Vote:
    """A vote on a given comparison (choice canonical: a, b, tie or both_bad), through the same
    lease and vote as a claim would: an AI labeler's vote on a pair it made itself (constitutional
    revisions). None is cast when the comparison has no room left for the labeler."""
    now = timezone.now()
    expires = now + timedelta(seconds=comparison.project.lease_seconds)
    assignment = _lease(comparison.pk, comparison.vote_count, comparison.project.overlap, labeler, now, expires)
    if assignment is None:
        raise AlreadyVoted(f"comparison {comparison.pk} has no room for {labeler.username}")
    screen = {"a": "left", "b": "right"} if assignment.left_is_a else {"a": "right", "b": "left"}
    vote, _ = vote_submit(
        assignment_id=assignment.pk, labeler=labeler, choice=screen.get(choice, choice), judgment=judgment,
        rationale=rationale,
    )  # fmt: skip
    return vote


def assignment_skip(*, assignment: Assignment) -> None:
    """Give the comparison back; this labeler is not offered it again."""
    Assignment.objects.filter(pk=assignment.pk, status=Assignment.Status.OPEN).update(status=Assignment.Status.SKIPPED)


def vote_submit(
    *,
    assignment_id: int,
    labeler: User,
    choice: str,
    strength: int = 1,
    rationale: str = "",
    flags: list[str] | None = None,
    time_spent_ms: int | None = None,
    idempotency_key: str | None = None,
    judgment: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> tuple[Vote, bool]:
    """Record the labeler's verdict on their assignment; returns (vote, created).

    The vote's source is the account's kind; an AI labeler's vote carries its `judgment` (judge,
    template version, probabilities), which a person's may not.

    `choice` is what the labeler saw ("left", "right", "tie", "both_bad"); the vote stores the
    winning Response, so the screen order never leaks into the data. The same idempotency key
    returns the first vote. A vote after the lease expired counts only while the comparison still
    has room: overlap is never exceeded.
    """
    if choice not in SCREEN_CHOICES:
        raise InvalidVote("choice", f"{choice!r} is not one of {', '.join(SCREEN_CHOICES)}")
    if strength not in (1, 2, 3):
        raise InvalidVote("strength", f"{strength!r} is not 1, 2 or 3")
    unknown_flags = sorted(set(flags or []) - set(Vote.Flag.values))
    if unknown_flags:
        raise InvalidVote("flags", f"{unknown_flags[0]!r} is not one of {', '.join(Vote.Flag.values)}")
    if time_spent_ms is not None and not 0 <= time_spent_ms <= MAX_TIME_SPENT_MS:
        raise InvalidVote("time_spent_ms", f"{time_spent_ms} is outside 0..{MAX_TIME_SPENT_MS}")
    source = selectors.labeler_kind(labeler)
    if (judgment is not None) != (source == "ai"):
        raise InvalidVote("judgment", "is required of an AI labeler's vote" if source == "ai" else "is for AI labelers")
    if judgment is not None:
        problem = _json_problem(judgment, max_length=MAX_JUDGMENT_LENGTH)
        if problem:
            raise InvalidVote("judgment", problem)
    for name, text, limit in (
        ("rationale", rationale, MAX_RATIONALE_LENGTH),
        ("idempotency_key", idempotency_key or "", MAX_IDEMPOTENCY_KEY_LENGTH),
    ):
        problem = text_problem(text, max_length=limit)
        if problem:
            raise InvalidVote(name, problem)
    # The comparison's and the assignment's row locks; sql.VOTE_LOCK says why both.
    lock = sql.VOTE_LOCK if connection.features.has_select_for_update else ""

    with transaction.atomic():
        row = _fetch_one(sql.LOCK_FOR_VOTE.format(lock=lock), {"assignment": assignment_id, "labeler": labeler.pk})
        if row is None:
            raise Assignment.DoesNotExist(f"no assignment {assignment_id} for this labeler")
        # The clock is read only now, holding the lock: read earlier, a lease that expired while we
        # waited would still look live, and a claim that took its place would overfill the pair.
        now = now or timezone.now()
        (_, status, expires_at, left_is_a, leased_at,
         comparison_id, response_a, response_b, vote_count, origin, project_id, overlap, ai_votes) = row  # fmt: skip
        # A suggestion takes no overlap slot: the people's votes still fill the comparison.
        takes_a_slot = not (source == "ai" and ai_votes == "suggest")
        if idempotency_key:
            earlier = _fetch_one(sql.VOTE_BY_KEY, {"labeler": labeler.pk, "idempotency_key": idempotency_key})
            if earlier is not None:
                if earlier[1] != assignment_id:
                    raise IdempotencyKeyReused("this Idempotency-Key was already used for another assignment")
                return Vote.objects.get(pk=earlier[0]), False
        if status == Assignment.Status.VOTED:
            raise AlreadyVoted("you have already voted on this comparison")
        live = status == Assignment.Status.OPEN and _from_db_time(expires_at) > now
        if not live and origin != Comparison.Origin.GOLD and takes_a_slot:
            others = _fetch_one(
                sql.OTHER_LIVE_LEASES, {"comparison": comparison_id, "now": _db_time(now), "assignment": assignment_id}
            )
            if vote_count + (others[0] if others else 0) >= overlap:
                raise LeaseGone(
                    "your lease on this comparison expired and it has since received all the votes it needs"
                )

        left, right = (response_a, response_b) if left_is_a else (response_b, response_a)
        canonical = {"left": "a" if left_is_a else "b", "right": "b" if left_is_a else "a"}
        vote = Vote(
            comparison_id=comparison_id,
            labeler=labeler,
            assignment_id=assignment_id,
            choice=canonical.get(choice, choice),
            winner_id={"left": left, "right": right}.get(choice),
            strength=strength,
            shown_left_id=left,
            rationale=rationale,
            flags=sorted(set(flags or [])),
            time_spent_ms=time_spent_ms if time_spent_ms is not None else _elapsed_ms(_from_db_time(leased_at), now),
            idempotency_key=idempotency_key or None,
            created_at=now,
            source=source,
            judgment=judgment,
        )
        with connection.cursor() as cursor:
            cursor.execute(
                sql.INSERT_VOTE,
                {
                    "comparison_id": comparison_id,
                    "labeler_id": labeler.pk,
                    "assignment_id": assignment_id,
                    "choice": vote.choice,
                    "winner_id": vote.winner_id,
                    "strength": strength,
                    "shown_left_id": left,
                    "rationale": rationale,
                    "flags": json.dumps(vote.flags),
                    "time_spent_ms": vote.time_spent_ms,
                    "idempotency_key": vote.idempotency_key,
                    "created_at": _db_time(now),
                    "source": source,
                    "judgment": json.dumps(judgment) if judgment is not None else None,
                },
            )
            inserted = cursor.fetchone()
            if inserted is None:
                # A unique constraint refused the vote. Mostly the same key, committed meanwhile with a
                # vote on another assignment, whose comparison's lock we do not hold.
                if idempotency_key and Vote.objects.filter(labeler=labeler, idempotency_key=idempotency_key).exists():
                    raise IdempotencyKeyReused("this Idempotency-Key was already used for another assignment")
                raise AlreadyVoted("you have already voted on this comparison")
            vote.pk = inserted[0]
            # What the API's ?next=1 reads of the comparison, known here; its other fields load if read.
            vote.comparison = Comparison.from_db(connection.alias, ["id", "project_id"], [comparison_id, project_id])
            if takes_a_slot:
                cursor.execute(sql.COUNT_VOTE, {"comparison": comparison_id})
            cursor.execute(sql.MARK_VOTED, {"assignment": assignment_id})
        transaction.on_commit(lambda: agreement_schedule(project_id=project_id))
    return vote, True


def _json_problem(value: object, *, max_length: int) -> str | None:
    """What PostgreSQL's jsonb would refuse (NUL, non-finite numbers) or what is too long."""
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return "holds a value JSON cannot carry (NaN or infinity)"
    if "\\u0000" in encoded:
        return "holds a NUL character"
    if len(encoded) > max_length:
        return f"is {len(encoded):,} characters as JSON, over the limit of {max_length:,}"
    return None


def _elapsed_ms(start: datetime, end: datetime) -> int:
    return max(0, min(MAX_TIME_SPENT_MS, int((end - start).total_seconds() * 1000)))


# Agreement and aggregated labels: computed by annotation.quality from every vote of the project,
# stored here as snapshots (history for the dashboard) and one AggregatedLabel per comparison.

# By name, so that this module need not import annotation.tasks, which imports it.
AGREEMENT_REFRESH_TASK = "annotation.tasks.agreement_refresh_task"
# Sent by the refresh task with `project_id` once a project's labels are recomputed: the rounds app
# closes a labeling round whose pairs are all aggregated.
agreement_refreshed = Signal()


def agreement_refresh(*, project_id: int, now: datetime | None = None) -> AgreementSnapshot:
    """Recompute the project's agreement (whole project and per round) and its aggregated labels."""
    now = now or timezone.now()
    project = Project.objects.get(pk=project_id)
    loaded = ProjectVotes.from_rows(selectors.project_vote_rows(project_id=project_id))
    report = quality_report(
        loaded,
        usernames=selectors.usernames_by_id(user_ids=loaded.labeler_ids.tolist()),
        gold_min_accuracy=project.gold_min_accuracy,
        ai_counts=project.ai_votes == "count",
    )
    if report.aggregates:
        _store_aggregates(report.aggregates)
    else:
        AggregatedLabel.objects.filter(comparison__project=project).update(
            votes_a=0, votes_b=0, votes_tie=0, votes_both_bad=0, mean_strength=None, majority_choice="",
            majority_share=0.0, ds_choice="", ds_confidence=None,
        )  # fmt: skip
    with transaction.atomic():
        snapshot = AgreementSnapshot.objects.create(
            project=project,
            computed_at=now,
            figures=report.figures,
            labelers=report.labelers,
            labeler_pairs=report.labeler_pairs,
        )
        for in_round in report.rounds:
            AgreementSnapshot.objects.create(
                project=project,
                round=in_round.round,
                computed_at=now,
                figures=in_round.figures,
                labelers=in_round.labelers,
            )
    return snapshot


def _store_aggregates(rows: list[tuple[Any, ...]]) -> None:
    """Upsert aggregated labels, keeping adjudications. On PostgreSQL through COPY into a temporary
    table and one INSERT ... ON CONFLICT: a million rows in seconds, not minutes of ORM."""
    updates = ", ".join(f"{name} = excluded.{name}" for name in AGGREGATE_COLUMNS[1:])
    if connection.vendor != "postgresql":
        objects = [AggregatedLabel(**dict(zip(AGGREGATE_COLUMNS, row, strict=True))) for row in rows]
        AggregatedLabel.objects.bulk_create(
            objects, batch_size=2000, update_conflicts=True, unique_fields=["comparison"],
            update_fields=[*AGGREGATE_COLUMNS[1:], "updated_at"],
        )  # fmt: skip
        return
    names = ", ".join(AGGREGATE_COLUMNS)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS aggregate_load")
        cursor.execute(
            "CREATE TEMPORARY TABLE aggregate_load (comparison_id bigint, votes_a int, votes_b int, votes_tie int, "
            "votes_both_bad int, mean_strength float8, majority_choice text, majority_share float8, ds_choice text, "
            "ds_confidence float8) ON COMMIT DROP"
        )
        with cursor.cursor.copy(f"COPY aggregate_load ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        cursor.execute(
            f"INSERT INTO annotation_aggregatedlabel ({names}, adjudicated_choice, updated_at) "
            f"SELECT {names}, '', now() FROM aggregate_load "
            f"ON CONFLICT (comparison_id) DO UPDATE SET {updates}, updated_at = excluded.updated_at"
        )


def agreement_schedule(*, project_id: int) -> None:
    """After a vote: recompute agreement once per burst of votes, not once per vote.

    With a broker, the first vote of a burst schedules one task `AGREEMENT_DEBOUNCE_SECONDS` later;
    later votes in that window ride along. Without one (the embedded default) nothing is queued:
    pages refresh stale figures when they are opened (snapshot_for_page).

    Best effort: the vote is committed already, so a Redis that is down or never answers (within
    REDIS_TIMEOUT) costs a warning, never an error; beat's agreement_catch_up recomputes later. A
    pending key set just before the broker failed expires by itself after the delay.
    """
    if settings.CELERY_TASK_ALWAYS_EAGER:
        return
    delay = settings.FLYWHEEL_AGREEMENT_DEBOUNCE_SECONDS
    try:
        if cache.add(f"agreement-pending:{project_id}", 1, timeout=delay):
            current_app.send_task(AGREEMENT_REFRESH_TASK, args=(project_id,), countdown=delay)
    except (RedisError, BrokerUnavailable) as error:
        logger.warning("agreement refresh of project %s not scheduled, beat catches up: %r", project_id, error)


def agreement_refresh_request(*, project_id: int) -> bool:
    """The dashboard's refresh button: recompute now, on a worker (in-process without one). False
    when the broker cannot be reached."""
    if settings.CELERY_TASK_ALWAYS_EAGER:
        agreement_refresh(project_id=project_id)
        return True
    try:
        current_app.send_task(AGREEMENT_REFRESH_TASK, args=(project_id,))
    except BrokerUnavailable as error:
        logger.warning("agreement refresh of project %s not scheduled: %r", project_id, error)
        return False
    return True


def agreement_catch_up(*, now: datetime | None = None) -> list[int]:
    """Beat's safety net for refreshes that were never scheduled or were lost with Redis: recomputes
    each project with a vote that no snapshot counts, once the vote is older than twice the debounce
    window (by then its own refresh should have run). Returns the projects recomputed."""
    now = now or timezone.now()
    voted_before = now - timedelta(seconds=2 * settings.FLYWHEEL_AGREEMENT_DEBOUNCE_SECONDS)
    project_ids = selectors.projects_with_uncounted_votes(voted_before=voted_before)
    for project_id in project_ids:
        agreement_refresh(project_id=project_id)
    return project_ids


def snapshot_for_page(*, project: Project) -> AgreementSnapshot | None:
    """The latest snapshot. On the embedded default (no workers) a stale one is recomputed first,
    which is why this is a service; with workers, pages never compute: the debounced task keeps
    snapshots current."""
    snapshot = selectors.latest_snapshot(project=project)
    if settings.CELERY_TASK_ALWAYS_EAGER and selectors.snapshot_is_stale(project=project, snapshot=snapshot):
        snapshot = agreement_refresh(project_id=project.pk)
    return snapshot


def comparison_adjudicate(*, comparison: Comparison, choice: str, admin: User) -> AggregatedLabel:
    """An admin's final label; export uses it over the votes."""
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {', '.join(CHOICES)}")
    aggregate, _ = AggregatedLabel.objects.update_or_create(
        comparison=comparison,
        defaults={"adjudicated_choice": choice, "adjudicated_by": admin, "adjudicated_at": timezone.now()},
    )
    return aggregate
