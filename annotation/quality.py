"""A project's quality from its votes: the agreement figures (whole project and per round), the
labeler table with gold accuracy and trust, Cohen's kappa per labeler pair, and every voted
comparison's aggregated label. Pure numpy over annotation.agreement and annotation.aggregation;
services.agreement_refresh reads the votes and stores what this returns."""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from annotation.aggregation import dawid_skene
from annotation.agreement import (
    CHOICES,
    Votes,
    ai_agreement,
    labeler_table,
    majority,
    pairwise_cohen,
    project_figures,
    value_counts,
)

# A comparison goes to the review queue when no choice has a majority or under this share agrees.
REVIEW_BELOW_SHARE = 0.67

# The order of an aggregated label's values in QualityReport.aggregates, as AggregatedLabel names them.
AGGREGATE_COLUMNS = (
    "comparison_id", "votes_a", "votes_b", "votes_tie", "votes_both_bad", "mean_strength", "majority_choice",
    "majority_share", "ds_choice", "ds_confidence",
)  # fmt: skip


@dataclass(frozen=True)
class ProjectVotes:
    """A project's votes as arrays, with the dense indices mapped back to database ids."""

    votes: Votes
    comparison_ids: npt.NDArray[np.int64]  # item index -> comparison id
    labeler_ids: npt.NDArray[np.int64]  # labeler index -> user id
    strength: npt.NDArray[np.int64]
    rounds: npt.NDArray[np.int64]  # per vote: its comparison's round, -1 outside rounds
    ai: npt.NDArray[np.bool_]  # per vote: an AI labeler's
    consistent: npt.NDArray[np.int8]  # per AI vote: 1 when its verdict survived the swap, 0 not; -1 for people's
    judges: dict[int, dict[str, Any]]  # per AI labeler index: the judge and template of its latest vote

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[Any, ...]]) -> "ProjectVotes":
        """From rows of (comparison id, labeler id, choice, strength, winner id, shown-left id,
        time spent ms, gold choice, round, source, judgment), as selectors.project_vote_rows reads
        them, in vote order."""
        columns = list(zip(*rows, strict=True)) if rows else [()] * 11
        comparison, labeler, choice, strength, winner, shown_left, time_ms, gold, rounds, source, judgment = columns
        comparison_ids, item = np.unique(np.array(comparison, dtype=np.int64), return_inverse=True)
        labeler_ids, labeler_index = np.unique(np.array(labeler, dtype=np.int64), return_inverse=True)
        choice_index = np.array([CHOICES.index(c) for c in choice], dtype=np.int64)
        strength_array = np.array(strength, dtype=np.int64)
        sign = np.select([choice_index == 0, choice_index == 1], [1, -1], 0)
        has_winner = np.array([w is not None for w in winner], dtype=bool)
        gold_choice = np.array([CHOICES.index(g) if g else -1 for g in gold], dtype=np.int64)
        votes = Votes(
            item=item.astype(np.int64),
            labeler=labeler_index.astype(np.int64),
            choice=choice_index,
            signed=sign * strength_array,
            left_won=has_winner & (np.array(winner, dtype=object) == np.array(shown_left, dtype=object)),
            has_winner=has_winner,
            seconds=np.array(time_ms, dtype=np.float64) / 1000,
            gold_correct=np.where(gold_choice < 0, -1, (gold_choice == choice_index).astype(np.int8)).astype(np.int8),
        )
        # SQLite hands JSON back as text.
        judgments = [json.loads(j) if isinstance(j, str) else j for j in judgment]
        judges = {
            int(index): {"judge": j.get("judge"), "template_version": j.get("template_version")}
            for index, j in zip(labeler_index, judgments, strict=True)
            if j
        }
        return cls(
            votes=votes,
            comparison_ids=comparison_ids,
            labeler_ids=labeler_ids,
            strength=strength_array,
            rounds=np.array([-1 if r is None else r for r in rounds], dtype=np.int64),
            ai=np.array([s == "ai" for s in source], dtype=bool),
            consistent=np.array(
                [-1 if not j or j.get("consistent") is None else int(bool(j["consistent"])) for j in judgments],
                dtype=np.int8,
            ),
            judges=judges,
        )

    def subset(self, mask: npt.NDArray[np.bool_]) -> Votes:
        return Votes(**{name: getattr(self.votes, name)[mask] for name in Votes.__dataclass_fields__})


@dataclass(frozen=True)
class RoundQuality:
    round: int
    figures: dict[str, Any]
    labelers: list[dict[str, Any]]


@dataclass(frozen=True)
class QualityReport:
    figures: dict[str, Any]
    labelers: list[dict[str, Any]]
    labeler_pairs: list[dict[str, Any]]
    rounds: list[RoundQuality]
    # One row per voted comparison, in AGGREGATE_COLUMNS order; empty when no vote counts (all are
    # gold or from excluded labelers), and then every aggregate of the project is back to no votes.
    aggregates: list[tuple[Any, ...]]


def quality_report(
    loaded: ProjectVotes, *, usernames: dict[int, str], gold_min_accuracy: float | None, ai_counts: bool = True
) -> QualityReport:
    """Gold votes count only for gold accuracy; labelers under `gold_min_accuracy` on gold are kept
    out of the aggregated labels (not out of the agreement figures). The project's agreement
    figures are the humans' among themselves; AI votes make aggregated labels only when
    `ai_counts` (otherwise they are suggestions, measured in the labeler rows)."""
    votes = loaded.votes
    not_gold = votes.gold_correct < 0

    ai_labelers = set(votes.labeler[loaded.ai].tolist())

    def named(rows: list[dict[str, Any]], ai_figures: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        for row in rows:
            row["labeler_index"] = index = int(row["labeler"])
            row["labeler"] = int(loaded.labeler_ids[index])
            row["username"] = usernames.get(row["labeler"], "?")
            row["kind"] = "ai" if index in ai_labelers else "human"
            if index in ai_labelers:
                row.update(ai_figures.get(index, {}), **loaded.judges.get(index, {}))
        return rows

    table = labeler_table(votes)
    excluded = {
        row["labeler"]
        for row in table
        if gold_min_accuracy is not None
        and row["gold_accuracy"] is not None
        and row["gold_accuracy"] < gold_min_accuracy
    }
    counted = not_gold & ~np.isin(votes.labeler, list(excluded)) & (~loaded.ai | ai_counts)
    aggregates, trust, split = _aggregate(loaded, counted)
    for row in named(table, ai_agreement(loaded.subset(not_gold), loaded.ai[not_gold], loaded.consistent[not_gold])):
        row["trust"] = trust.get(row["labeler_index"])
        row["excluded"] = row["labeler_index"] in excluded
    pairs = pairwise_cohen(loaded.subset(not_gold))
    for pair in pairs:
        pair["first"] = usernames.get(int(loaded.labeler_ids[int(pair["first"])]), "?")
        pair["second"] = usernames.get(int(loaded.labeler_ids[int(pair["second"])]), "?")
    rounds = []
    for round_number in sorted(set(loaded.rounds[loaded.rounds >= 0].tolist())):
        chosen = not_gold & (loaded.rounds == round_number)
        in_round = loaded.subset(chosen)
        ai_figures = ai_agreement(in_round, loaded.ai[chosen], loaded.consistent[chosen])
        rounds.append(RoundQuality(round_number, project_figures(in_round), named(labeler_table(in_round), ai_figures)))
    return QualityReport(
        figures={**project_figures(loaded.subset(not_gold & ~loaded.ai)), "split_pairs": split},
        labelers=table,
        labeler_pairs=pairs,
        rounds=rounds,
        aggregates=aggregates,
    )


def _aggregate(
    loaded: ProjectVotes, counted: npt.NDArray[np.bool_]
) -> tuple[list[tuple[Any, ...]], dict[int, float], int]:
    """Majority and Dawid-Skene labels for every voted comparison; also trust per labeler index
    and how many comparisons are split (no majority, or under REVIEW_BELOW_SHARE agreeing)."""
    votes = loaded.votes
    if not counted.any():
        return [], {}, 0
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
    split = int((voted & ((label < 0) | (share < REVIEW_BELOW_SHARE))).sum())
    present = np.unique(labelers)
    return list(zip(*columns, strict=True)), {int(index): float(result.trust[index]) for index in present}, split
