"""Agreement snapshots, aggregated labels and adjudication: the database side of annotation.agreement
and annotation.aggregation."""

from datetime import datetime
from typing import Any

import numpy as np
from django.conf import settings
from django.contrib.auth.models import User
from django.core.cache import cache
from django.db import connection, transaction
from django.utils import timezone

from annotation.aggregation import dawid_skene
from annotation.agreement import CHOICES, Votes, labeler_table, majority, pairwise_cohen, project_figures, value_counts
from annotation.models import AggregatedLabel, AgreementSnapshot, Comparison, Project, Vote

# A comparison goes to the review queue when no choice has a majority or under this share agrees.
REVIEW_BELOW_SHARE = 0.67

_VOTES_SQL = """
SELECT v.comparison_id, v.labeler_id, v.choice, v.strength, v.winner_id, v.shown_left_id, v.time_spent_ms,
       c.gold_choice, c.round
FROM annotation_vote v JOIN annotation_comparison c ON c.id = v.comparison_id
WHERE c.project_id = %s
ORDER BY v.id
"""


class _LoadedVotes:
    """The project's votes as arrays, with the dense indices mapped back to database ids."""

    def __init__(self, project_id: int) -> None:
        with connection.cursor() as cursor:
            cursor.execute(_VOTES_SQL, [project_id])
            rows = cursor.fetchall()
        columns = list(zip(*rows, strict=True)) if rows else [()] * 9
        comparison, labeler, choice, strength, winner, shown_left, time_ms, gold, rounds = columns
        self.comparison_ids, item = np.unique(np.array(comparison, dtype=np.int64), return_inverse=True)
        self.labeler_ids, labeler_index = np.unique(np.array(labeler, dtype=np.int64), return_inverse=True)
        choice_index = np.array([CHOICES.index(c) for c in choice], dtype=np.int64)
        strength_array = np.array(strength, dtype=np.int64)
        sign = np.select([choice_index == 0, choice_index == 1], [1, -1], 0)
        has_winner = np.array([w is not None for w in winner], dtype=bool)
        gold_choice = np.array([CHOICES.index(g) if g else -1 for g in gold], dtype=np.int64)
        self.rounds = np.array([-1 if r is None else r for r in rounds], dtype=np.int64)
        self.votes = Votes(
            item=item.astype(np.int64),
            labeler=labeler_index.astype(np.int64),
            choice=choice_index,
            signed=sign * strength_array,
            left_won=has_winner & (np.array(winner, dtype=object) == np.array(shown_left, dtype=object)),
            has_winner=has_winner,
            seconds=np.array(time_ms, dtype=np.float64) / 1000,
            gold_correct=np.where(gold_choice < 0, -1, (gold_choice == choice_index).astype(np.int8)).astype(np.int8),
        )
        self.strength = strength_array

    def subset(self, mask: np.ndarray) -> Votes:
        return Votes(**{name: getattr(self.votes, name)[mask] for name in Votes.__dataclass_fields__})


def agreement_refresh(*, project_id: int, now: datetime | None = None) -> AgreementSnapshot:
    """Recompute the project's agreement (whole project and per round) and its aggregated labels."""
    now = now or timezone.now()
    project = Project.objects.get(pk=project_id)
    loaded = _LoadedVotes(project_id)
    votes = loaded.votes
    usernames = dict(User.objects.filter(pk__in=loaded.labeler_ids.tolist()).values_list("pk", "username"))
    not_gold = votes.gold_correct < 0

    def named(rows: list[dict]) -> list[dict]:
        for row in rows:
            row["labeler_index"] = index = int(row["labeler"])
            row["labeler"] = int(loaded.labeler_ids[index])
            row["username"] = usernames.get(row["labeler"], "?")
        return rows

    table = labeler_table(votes)
    excluded = {
        row["labeler"]
        for row in table
        if project.gold_min_accuracy is not None
        and row["gold_accuracy"] is not None
        and row["gold_accuracy"] < project.gold_min_accuracy
    }
    counted = not_gold & ~np.isin(votes.labeler, list(excluded))
    trust, split = _aggregate(project, loaded, counted)
    for row in named(table):
        row["trust"] = trust.get(row["labeler_index"])
        row["excluded"] = row["labeler_index"] in excluded
    pairs = pairwise_cohen(loaded.subset(not_gold))
    for pair in pairs:
        pair["first"] = usernames.get(int(loaded.labeler_ids[int(pair["first"])]), "?")
        pair["second"] = usernames.get(int(loaded.labeler_ids[int(pair["second"])]), "?")

    with transaction.atomic():
        snapshot = AgreementSnapshot.objects.create(
            project=project,
            computed_at=now,
            figures={**project_figures(loaded.subset(not_gold)), "split_pairs": split},
            labelers=table,
            labeler_pairs=pairs,
        )
        for round_number in sorted(set(loaded.rounds[loaded.rounds >= 0].tolist())):
            in_round = not_gold & (loaded.rounds == round_number)
            AgreementSnapshot.objects.create(
                project=project,
                round=round_number,
                computed_at=now,
                figures=project_figures(loaded.subset(in_round)),
                labelers=named(labeler_table(loaded.subset(in_round))),
            )
    return snapshot


def _aggregate(project: Project, loaded: _LoadedVotes, counted: np.ndarray) -> tuple[dict[int, float], int]:
    """Majority and Dawid-Skene labels for every voted comparison; returns trust per labeler index
    and how many comparisons are split (no majority, or under REVIEW_BELOW_SHARE agreeing)."""
    votes = loaded.votes
    if not counted.any():
        AggregatedLabel.objects.filter(comparison__project=project).update(
            votes_a=0, votes_b=0, votes_tie=0, votes_both_bad=0, mean_strength=None, majority_choice="",
            majority_share=0.0, ds_choice="", ds_confidence=None,
        )  # fmt: skip
        return {}, 0
    items, labelers, choices = votes.item[counted], votes.labeler[counted], votes.choice[counted]
    counts = value_counts(items, choices, len(CHOICES))
    counts = np.vstack([counts, np.zeros((len(loaded.comparison_ids) - len(counts), len(CHOICES)), dtype=counts.dtype)])
    strength_sum = np.bincount(items, weights=loaded.strength[counted], minlength=len(loaded.comparison_ids))
    label, share = majority(counts)
    result = dawid_skene(items, labelers, choices, classes=len(CHOICES))
    posterior = np.vstack([result.posterior, np.zeros((len(counts) - len(result.posterior), len(CHOICES)))])
    totals = counts.sum(axis=1)
    voted = totals > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_strength = np.where(voted, strength_sum / np.maximum(totals, 1), np.nan)
    choice_names = np.array([*CHOICES, ""], dtype=object)
    columns = [
        loaded.comparison_ids.tolist(),
        *(counts[:, c].tolist() for c in range(len(CHOICES))),
        [None if np.isnan(value) else value for value in mean_strength.tolist()],
        choice_names[label].tolist(),  # -1 (shared top) picks ""
        share.tolist(),
        np.where(voted, choice_names[posterior.argmax(axis=1)], "").tolist(),
        [value if ok else None for value, ok in zip(posterior.max(axis=1).tolist(), voted.tolist(), strict=True)],
    ]
    _store_aggregates(list(zip(*columns, strict=True)))
    split = int((voted & ((label < 0) | (share < REVIEW_BELOW_SHARE))).sum())
    present = np.unique(labelers)
    return {int(index): float(result.trust[index]) for index in present}, split


_AGGREGATE_COLUMNS = [
    "comparison_id", "votes_a", "votes_b", "votes_tie", "votes_both_bad", "mean_strength", "majority_choice",
    "majority_share", "ds_choice", "ds_confidence",
]  # fmt: skip


def _store_aggregates(rows: list[tuple[Any, ...]]) -> None:
    """Upsert aggregated labels, keeping adjudications. On PostgreSQL through COPY into a temporary
    table and one INSERT ... ON CONFLICT: a million rows in seconds, not minutes of ORM."""
    updates = ", ".join(f"{name} = excluded.{name}" for name in _AGGREGATE_COLUMNS[1:])
    if connection.vendor != "postgresql":
        objects = [AggregatedLabel(**dict(zip(_AGGREGATE_COLUMNS, row, strict=True))) for row in rows]
        AggregatedLabel.objects.bulk_create(
            objects, batch_size=2000, update_conflicts=True, unique_fields=["comparison"],
            update_fields=[*_AGGREGATE_COLUMNS[1:], "updated_at"],
        )  # fmt: skip
        return
    names = ", ".join(_AGGREGATE_COLUMNS)
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
    pages refresh stale figures when they are opened.
    """
    if settings.CELERY_TASK_ALWAYS_EAGER:
        return
    from annotation.tasks import agreement_refresh_task

    delay = settings.FLYWHEEL_AGREEMENT_DEBOUNCE_SECONDS
    if cache.add(f"agreement-pending:{project_id}", 1, timeout=delay):
        agreement_refresh_task.apply_async((project_id,), countdown=delay)


def latest_snapshot(*, project: Project, round_number: int | None = None) -> AgreementSnapshot | None:
    return AgreementSnapshot.objects.filter(project=project, round=round_number).order_by("-computed_at", "-id").first()


def snapshot_for_page(*, project: Project) -> AgreementSnapshot | None:
    """The latest snapshot. On the embedded default (no workers) a stale one is recomputed first;
    with workers, pages never compute: the debounced task keeps snapshots current."""
    snapshot = latest_snapshot(project=project)
    if not settings.CELERY_TASK_ALWAYS_EAGER:
        return snapshot
    last_vote = Vote.objects.filter(comparison__project=project).order_by("-created_at").values("created_at").first()
    if snapshot is None or (last_vote is not None and last_vote["created_at"] > snapshot.computed_at):
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
