"""Agreement statistics equal the reference packages to 1e-9, on random and edge-case data."""

import math
from typing import Literal

import krippendorff
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import fleiss_kappa as statsmodels_fleiss

from annotation.agreement import (
    cohen_kappa,
    fleiss_kappa,
    krippendorff_alpha,
    majority,
    percent_agreement,
    value_counts,
)


def reference_alpha(matrix: np.ndarray, level: Literal["nominal", "ordinal"], domain) -> float | None:
    """matrix: coders x units with NaN for missing."""
    try:
        value = krippendorff.alpha(reliability_data=matrix, level_of_measurement=level, value_domain=domain)
    except (ValueError, ZeroDivisionError):
        return None
    return None if math.isnan(value) else value


def counts_from(matrix: np.ndarray, domain) -> np.ndarray:
    coders, units = np.nonzero(~np.isnan(matrix))
    values = np.searchsorted(np.asarray(domain), matrix[coders, units].astype(int))
    counts = value_counts(units.astype(np.int64), values.astype(np.int64), len(domain))
    return np.vstack([counts, np.zeros((matrix.shape[1] - counts.shape[0], len(domain)), dtype=counts.dtype)])


def same(ours, reference) -> bool:
    if ours is None or reference is None:
        return ours is None and reference is None
    return abs(ours - reference) <= 1e-9


def random_matrix(rng, coders: int, units: int, domain, missing: float) -> np.ndarray:
    matrix = rng.choice(np.asarray(domain), size=(coders, units)).astype(float)
    matrix[rng.random((coders, units)) < missing] = np.nan
    return matrix


NOMINAL = [0, 1, 2, 3]
ORDINAL = list(range(-3, 4))
EDGE_CASES = {
    "all agree": np.array([[1, 2, 0, 3], [1, 2, 0, 3], [1, 2, 0, 3]], dtype=float),
    "all agree on one value": np.array([[2, 2, 2], [2, 2, 2]], dtype=float),
    "all disagree": np.array([[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1]], dtype=float),
    "one labeler": np.array([[0, 1, 2, 3, 1]], dtype=float),
    "missing votes": np.array([[0, np.nan, 2, 3, np.nan], [0, 1, np.nan, 3, 1], [np.nan, 1, 2, 0, np.nan]]),
    "single pairable unit": np.array([[0, 1, np.nan], [1, np.nan, 2]], dtype=float),
}


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize(("level", "domain"), [("nominal", NOMINAL), ("ordinal", ORDINAL)])
def test_alpha_matches_krippendorff_on_random_data(seed, level, domain):
    rng = np.random.default_rng(seed)
    matrix = random_matrix(rng, coders=int(rng.integers(2, 8)), units=int(rng.integers(5, 200)), domain=domain,
                           missing=float(rng.uniform(0, 0.6)))  # fmt: skip
    # Make agreement better than chance so alpha is not always near zero.
    matrix[:, : matrix.shape[1] // 2] = np.where(np.isnan(matrix[:, : matrix.shape[1] // 2]), np.nan, matrix[0, 0])
    assert same(krippendorff_alpha(counts_from(matrix, domain), level), reference_alpha(matrix, level, domain))


@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("level", ["nominal", "ordinal"])
def test_alpha_matches_krippendorff_on_edge_cases(case, level):
    matrix = EDGE_CASES[case]
    domain = NOMINAL
    assert same(krippendorff_alpha(counts_from(matrix, domain), level), reference_alpha(matrix, level, domain))


def reference_fleiss(counts: np.ndarray) -> float | None:
    raters = counts.sum(axis=1)
    if len(raters) == 0 or raters.max() < 2:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        value = statsmodels_fleiss(counts[raters == raters.max()], method="fleiss")
    return None if math.isnan(value) else value


@pytest.mark.parametrize("seed", range(12))
def test_fleiss_matches_statsmodels_on_random_data(seed):
    rng = np.random.default_rng(seed)
    matrix = random_matrix(rng, coders=int(rng.integers(2, 7)), units=int(rng.integers(3, 300)), domain=NOMINAL,
                           missing=0.0 if seed % 2 else 0.3)  # fmt: skip
    counts = counts_from(matrix, NOMINAL)
    assert same(fleiss_kappa(counts), reference_fleiss(counts))


@pytest.mark.parametrize("case", EDGE_CASES)
def test_fleiss_matches_statsmodels_on_edge_cases(case):
    counts = counts_from(EDGE_CASES[case], NOMINAL)
    assert same(fleiss_kappa(counts), reference_fleiss(counts))


def reference_cohen(first, second) -> float | None:
    with np.errstate(divide="ignore", invalid="ignore"):
        value = cohen_kappa_score(first, second)
    return None if math.isnan(value) else value


@pytest.mark.parametrize("seed", range(12))
def test_cohen_matches_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    first = rng.integers(0, 4, size=int(rng.integers(5, 300)))
    second = np.where(rng.random(len(first)) < 0.6, first, rng.integers(0, 4, size=len(first)))
    assert same(cohen_kappa(first, second), reference_cohen(first, second))


@pytest.mark.parametrize(
    ("first", "second"),
    [([1, 1, 1], [1, 1, 1]), ([0, 1, 2, 3], [0, 1, 2, 3]), ([0, 1, 0, 1], [1, 0, 1, 0]), ([2, 2, 2], [0, 1, 3])],
)
def test_cohen_matches_scikit_learn_on_edge_cases(first, second):
    assert same(cohen_kappa(np.array(first), np.array(second)), reference_cohen(first, second))


def test_percent_agreement_by_hand():
    # Unit 1: 3 votes all "a" -> 1. Unit 2: a, a, b -> 2 of 6 ordered pairs agree -> 1/3. Unit 3: one vote, ignored.
    counts = np.array([[3, 0, 0, 0], [2, 1, 0, 0], [0, 0, 1, 0]])
    assert percent_agreement(counts) == pytest.approx((1 + 1 / 3) / 2)


def test_majority_marks_shared_tops_as_undecided():
    label, share = majority(np.array([[2, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]))
    assert label.tolist() == [0, -1, -1]
    assert share.tolist() == pytest.approx([2 / 3, 0.5, 0.0])


def test_pairwise_cohen_equals_scikit_learn_for_every_pair():
    from annotation.agreement import Votes, pairwise_cohen

    rng = np.random.default_rng(7)
    items, labelers, choices = [], [], []
    for item in range(400):
        for labeler in rng.choice(6, size=3, replace=False):
            items.append(item)
            labelers.append(labeler)
            choices.append(int(rng.integers(0, 4)) if rng.random() < 0.4 else item % 4)
    n = len(items)
    votes = Votes(
        item=np.array(items), labeler=np.array(labelers), choice=np.array(choices), signed=np.zeros(n, dtype=np.int64),
        left_won=np.zeros(n, dtype=bool), has_winner=np.zeros(n, dtype=bool), seconds=np.zeros(n),
        gold_correct=np.full(n, -1, dtype=np.int8),
    )  # fmt: skip
    rows = pairwise_cohen(votes, min_shared=20)
    assert len(rows) == 15
    for row in rows:
        by_item = {}
        for item, labeler, choice in zip(items, labelers, choices, strict=True):
            by_item.setdefault(item, {})[labeler] = choice
        shared = [votes_on for votes_on in by_item.values() if row["first"] in votes_on and row["second"] in votes_on]
        assert row["shared"] == len(shared)
        reference = reference_cohen([v[row["first"]] for v in shared], [v[row["second"]] for v in shared])
        assert same(row["kappa"], reference)
