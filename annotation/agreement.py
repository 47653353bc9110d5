"""Inter-annotator agreement on pairwise votes. Pure numpy, no Django: the database side feeds it
arrays and stores what it returns.

Every statistic is undefined (None) where its reference implementation raises or returns NaN:
no item with two votes, a single value in the data, and so on. The formulas follow
Krippendorff (2011) "Computing Krippendorff's Alpha-Reliability", Fleiss (1971) and Cohen (1960),
and are checked against the `krippendorff`, statsmodels and scikit-learn packages in the tests.
"""

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

# Canonical choices in a fixed order; a signed strength puts ties and both-bad at 0.
CHOICES = ("a", "b", "tie", "both_bad")
SIGNED_DOMAIN = np.arange(-3, 4)

IntArray = npt.NDArray[np.int64]


def value_counts(items: IntArray, values: IntArray, n_values: int) -> IntArray:
    """Units x values matrix: how many votes gave each value to each item (items are 0..n-1)."""
    n_items = int(items.max()) + 1 if len(items) else 0
    flat = np.bincount(items * n_values + values, minlength=n_items * n_values)
    return flat.reshape(n_items, n_values)


def _undefined(value: float) -> float | None:
    return None if not math.isfinite(value) else float(value)


def krippendorff_alpha(counts: IntArray, level: Literal["nominal", "ordinal"]) -> float | None:
    """Alpha from a units x values count matrix; for ordinal data the columns are in order."""
    counts = counts[counts.sum(axis=1) >= 2].astype(np.float64)
    if counts.shape[0] == 0 or counts.shape[1] <= 1:
        return None
    pairable = counts.sum(axis=1)
    # Coincidences: every ordered pair of values from two different votes on one unit, weighted 1/(m-1).
    weighted = counts / (pairable - 1)[:, None]
    observed = weighted.T @ counts - np.diag(weighted.sum(axis=0))
    totals = observed.sum(axis=0)
    expected = (np.outer(totals, totals) - np.diag(totals)) / (totals.sum() - 1)
    distance = _distance(level, totals)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _undefined(1 - (observed * distance).sum() / (expected * distance).sum())


def _distance(level: str, totals: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    size = len(totals)
    if level == "nominal":
        return 1 - np.eye(size)
    cumulative = np.concatenate([[0.0], np.cumsum(totals)])
    low, high = np.minimum.outer(np.arange(size), np.arange(size)), np.maximum.outer(np.arange(size), np.arange(size))
    between = cumulative[high + 1] - cumulative[low]
    return (between - (totals[low] + totals[high]) / 2) ** 2


def fleiss_kappa(counts: IntArray) -> float | None:
    """Fleiss' kappa over the units that have the most raters (it needs equal raters per unit)."""
    raters = counts.sum(axis=1)
    if len(raters) == 0 or raters.max() < 2:
        return None
    table = counts[raters == raters.max()].astype(np.float64)
    n = table.sum(axis=1)[0]
    category_share = table.sum(axis=0) / table.sum()
    per_unit = ((table * table).sum(axis=1) - n) / (n * (n - 1))
    expected = (category_share * category_share).sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        return _undefined((per_unit.mean() - expected) / (1 - expected))


def percent_agreement(counts: IntArray) -> float | None:
    """Mean over units with two or more votes of the share of agreeing vote pairs."""
    counts = counts[counts.sum(axis=1) >= 2].astype(np.float64)
    if counts.shape[0] == 0:
        return None
    m = counts.sum(axis=1)
    return float(((counts * (counts - 1)).sum(axis=1) / (m * (m - 1))).mean())


def cohen_kappa(first: IntArray, second: IntArray) -> float | None:
    """Cohen's kappa of two labelers' values on the same items, in the same order."""
    if len(first) == 0:
        return None
    labels, inverse = np.unique(np.concatenate([first, second]), return_inverse=True)
    a, b = inverse[: len(first)], inverse[len(first) :]
    confusion = np.zeros((len(labels), len(labels)))
    np.add.at(confusion, (a, b), 1)
    total = confusion.sum()
    expected = np.outer(confusion.sum(axis=1), confusion.sum(axis=0)) / total
    disagreement = 1 - np.eye(len(labels))
    with np.errstate(divide="ignore", invalid="ignore"):
        return _undefined(1 - (disagreement * confusion).sum() / (disagreement * expected).sum())


def majority(counts: IntArray) -> tuple[IntArray, npt.NDArray[np.float64]]:
    """Per unit: the most voted value (-1 where the top is shared or there are no votes) and its share."""
    top = counts.argmax(axis=1)
    best = counts.max(axis=1)
    shared = (counts == best[:, None]).sum(axis=1) > 1
    totals = counts.sum(axis=1)
    label = np.where(shared | (totals == 0), -1, top)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(totals > 0, best / np.maximum(totals, 1), 0.0)
    return label, share


@dataclass(frozen=True)
class Votes:
    """Votes as parallel arrays. `item` and `labeler` are dense indices (0..n-1)."""

    item: IntArray
    labeler: IntArray
    choice: IntArray  # index into CHOICES
    signed: IntArray  # -3..3: +strength for A, -strength for B, 0 for tie and both bad
    left_won: npt.NDArray[np.bool_]  # the winner was the response shown on the left
    has_winner: npt.NDArray[np.bool_]
    seconds: npt.NDArray[np.float64]
    gold_correct: npt.NDArray[np.int8]  # 1 right, 0 wrong, -1 not a gold item

    def __len__(self) -> int:
        return len(self.item)


def project_figures(votes: Votes) -> dict[str, float | int | None]:
    nominal = value_counts(votes.item, votes.choice, len(CHOICES))
    signed = value_counts(votes.item, votes.signed - SIGNED_DOMAIN[0], len(SIGNED_DOMAIN))
    decided = votes.has_winner.sum()
    return {
        "votes": len(votes),
        "items": int((nominal.sum(axis=1) > 0).sum()),
        "items_with_overlap": int((nominal.sum(axis=1) >= 2).sum()),
        "labelers": int(len(np.unique(votes.labeler))),
        "percent_agreement": percent_agreement(nominal),
        "fleiss_kappa": fleiss_kappa(nominal),
        "alpha_nominal": krippendorff_alpha(nominal, "nominal"),
        "alpha_ordinal": krippendorff_alpha(signed, "ordinal"),
        "left_share": float(votes.left_won.sum() / decided) if decided else None,
        "tie_share": float((votes.choice == CHOICES.index("tie")).mean()) if len(votes) else None,
        "both_bad_share": float((votes.choice == CHOICES.index("both_bad")).mean()) if len(votes) else None,
    }


def labeler_table(votes: Votes) -> list[dict[str, Any]]:
    """One row per labeler index present in the votes."""
    nominal = value_counts(votes.item, votes.choice, len(CHOICES))
    # Leave-one-out majority: the other votes on the item, without this one.
    others = nominal[votes.item].copy()
    others[np.arange(len(votes)), votes.choice] -= 1
    others_label, _ = majority(others)
    comparable = others_label >= 0
    agrees = comparable & (others_label == votes.choice)

    rows = []
    order = np.argsort(votes.labeler, kind="stable")
    boundaries = np.flatnonzero(np.diff(votes.labeler[order])) + 1
    for group in np.split(order, boundaries):
        if len(group) == 0:
            continue
        decided = votes.has_winner[group]
        gold = votes.gold_correct[group]
        rows.append(
            {
                "labeler": int(votes.labeler[group[0]]),
                "votes": int(len(group)),
                "agreement": _mean(agrees[group][comparable[group]]),
                "agreement_items": int(comparable[group].sum()),
                "gold_accuracy": _mean(gold[gold >= 0] == 1),
                "gold_items": int((gold >= 0).sum()),
                "median_seconds": float(np.median(votes.seconds[group])),
                "left_share": _mean(votes.left_won[group][decided]),
                "tie_share": _mean(votes.choice[group] == CHOICES.index("tie")),
                "both_bad_share": _mean(votes.choice[group] == CHOICES.index("both_bad")),
            }
        )
    return rows


def ai_agreement(
    votes: Votes, ai: npt.NDArray[np.bool_], consistent: npt.NDArray[np.int8]
) -> dict[int, dict[str, Any]]:
    """Per AI labeler index: how often its decided votes (A or B) match the human majority on the
    same comparison (where the humans have one), and how often its verdict survived swapping the
    two answers (`consistent`: 1 yes, 0 no, -1 not recorded)."""
    if not ai.any():  # the usual project: no pass over its (maybe millions of) votes
        return {}
    human = ~ai
    n_items = int(votes.item.max()) + 1
    counts = np.zeros((n_items, len(CHOICES)), dtype=np.int64)
    np.add.at(counts, (votes.item[human], votes.choice[human]), 1)
    human_label, _ = majority(counts)
    rows = {}
    for labeler in np.unique(votes.labeler[ai]):
        mine = ai & (votes.labeler == labeler)
        compared = mine & votes.has_winner & (human_label[votes.item] >= 0)
        recorded = mine & (consistent >= 0)
        rows[int(labeler)] = {
            "agreement_with_humans": _mean(votes.choice[compared] == human_label[votes.item[compared]]),
            "agreement_with_humans_items": int(compared.sum()),
            "position_consistency": _mean(consistent[recorded] == 1),
            "position_consistency_items": int(recorded.sum()),
        }
    return rows


def pairwise_cohen(votes: Votes, *, min_shared: int = 20) -> list[dict[str, Any]]:
    """Cohen's kappa for every pair of labelers who voted on at least `min_shared` common items.

    Every pair of votes on one item is one observation of its two labelers; one bincount builds
    all the pairs' confusion matrices at once."""
    if len(votes) == 0:
        return []
    order = np.lexsort((votes.labeler, votes.item))
    item, labeler, choice = votes.item[order], votes.labeler[order], votes.choice[order]
    n_labelers, k = int(labeler.max()) + 1, len(CHOICES)
    firsts, seconds = [], []
    for distance in range(1, int(np.bincount(item).max())):
        same = np.flatnonzero(item[distance:] == item[:-distance])
        firsts.append(same)
        seconds.append(same + distance)
    if not firsts:
        return []
    first, second = np.concatenate(firsts), np.concatenate(seconds)
    pair = labeler[first] * n_labelers + labeler[second]  # sorted by labeler within an item: first < second
    cell = (pair * k + choice[first]) * k + choice[second]
    confusion = np.bincount(cell, minlength=n_labelers * n_labelers * k * k).reshape(-1, k, k).astype(np.float64)
    shared = confusion.sum(axis=(1, 2))
    rows = []
    disagreement = 1 - np.eye(k)
    for index in np.flatnonzero(shared >= min_shared):
        table = confusion[index]
        expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / shared[index]
        with np.errstate(divide="ignore", invalid="ignore"):
            kappa = _undefined(1 - (disagreement * table).sum() / (disagreement * expected).sum())
        rows.append({"first": int(index // n_labelers), "second": int(index % n_labelers), "shared": int(shared[index]),
                     "kappa": kappa})  # fmt: skip
    return rows


def _mean(values: npt.NDArray[np.bool_]) -> float | None:
    return float(values.mean()) if len(values) else None
