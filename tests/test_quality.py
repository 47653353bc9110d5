"""Agreement snapshots and aggregated labels computed from votes in PostgreSQL."""

import krippendorff
import numpy as np
import pytest
from django.test import override_settings

from annotation.importing import PairRecord
from annotation.models import AggregatedLabel, AgreementSnapshot, Comparison, Vote
from annotation.services import (
    agreement_refresh,
    comparison_adjudicate,
    labeler_create,
    pairs_import,
    snapshot_for_page,
)
from tests.factories import PASSWORD, label_all, make_project

pytestmark = pytest.mark.django_db

NOMINAL = {"a": 0, "b": 1, "tie": 2, "both_bad": 3}


def test_snapshot_figures_equal_the_reference_on_the_stored_votes():
    project = make_project(pairs=40, overlap=3)
    labelers = [labeler_create(username=f"l{i}", password=PASSWORD) for i in range(5)]
    rng = np.random.default_rng(0)
    label_all(project, labelers, lambda labeler, comparison: ["a", "b", "tie", "both_bad"][rng.integers(0, 4)])
    snapshot = agreement_refresh(project_id=project.pk)

    votes = list(Vote.objects.values_list("labeler_id", "comparison_id", "choice", "strength"))
    labeler_ids = sorted({v[0] for v in votes})
    comparison_ids = sorted({v[1] for v in votes})
    nominal = np.full((len(labeler_ids), len(comparison_ids)), np.nan)
    ordinal = np.full_like(nominal, np.nan)
    for labeler, comparison, choice, strength in votes:
        row, column = labeler_ids.index(labeler), comparison_ids.index(comparison)
        nominal[row, column] = NOMINAL[choice]
        ordinal[row, column] = {"a": strength, "b": -strength}.get(choice, 0)
    assert snapshot.figures["votes"] == 120 and snapshot.figures["items"] == 40
    assert snapshot.figures["alpha_nominal"] == pytest.approx(
        krippendorff.alpha(nominal, level_of_measurement="nominal"), abs=1e-9
    )
    assert snapshot.figures["alpha_ordinal"] == pytest.approx(
        krippendorff.alpha(ordinal, level_of_measurement="ordinal", value_domain=list(range(-3, 4))), abs=1e-9
    )
    assert {row["username"] for row in snapshot.labelers} == {f"l{i}" for i in range(5)}
    assert sum(row["votes"] for row in snapshot.labelers) == 120


def test_aggregated_labels_count_the_votes_and_follow_the_majority():
    project = make_project(pairs=6, overlap=3)
    labelers = [labeler_create(username=f"l{i}", password=PASSWORD) for i in range(3)]
    label_all(project, labelers, lambda labeler, comparison: "b" if labeler.username == "l2" else "a")
    agreement_refresh(project_id=project.pk)
    for aggregate in AggregatedLabel.objects.filter(comparison__project=project):
        assert (aggregate.votes_a, aggregate.votes_b, aggregate.votes_tie) == (2, 1, 0)
        assert aggregate.majority_choice == aggregate.ds_choice == aggregate.final_choice == "a"
        assert aggregate.majority_share == pytest.approx(2 / 3)
    assert AggregatedLabel.objects.count() == 6


def test_gold_accuracy_and_exclusion_of_careless_labelers():
    project = make_project(pairs=10, overlap=3)
    project.gold_rate = 1.0
    project.gold_min_accuracy = 0.8
    project.save()
    gold = [
        PairRecord(line=i, prompt=f"gold {i}", response_a=f"right {i}", response_b=f"wrong {i}", gold_choice="a")
        for i in range(5)
    ]
    pairs_import(project=project, records=gold)
    careful, careless, third = (
        labeler_create(username=name, password=PASSWORD) for name in ("careful", "careless", "x")
    )

    def decide(labeler, comparison):
        if labeler.username == "careless":
            return "b"
        return "a"

    label_all(project, [careful, careless, third], decide)
    snapshot = agreement_refresh(project_id=project.pk)
    rows = {row["username"]: row for row in snapshot.labelers}
    assert rows["careful"]["gold_accuracy"] == 1.0 and rows["careful"]["gold_items"] == 5
    assert rows["careless"]["gold_accuracy"] == 0.0 and rows["careless"]["excluded"]
    assert not rows["careful"]["excluded"]
    # Gold pairs are excluded from the agreement figures, and the careless votes from aggregation.
    assert snapshot.figures["votes"] == 30
    regular = AggregatedLabel.objects.filter(comparison__origin=Comparison.Origin.IMPORTED)
    assert all(aggregate.votes_b == 0 and aggregate.votes_a == 2 for aggregate in regular)


def test_adjudication_overrides_the_votes():
    project = make_project(pairs=1, overlap=1)
    alice = labeler_create(username="alice", password=PASSWORD)
    admin = labeler_create(username="boss", password=PASSWORD, admin=True)
    label_all(project, [alice], lambda labeler, comparison: "a")
    agreement_refresh(project_id=project.pk)
    comparison = Comparison.objects.get(project=project)
    aggregate = comparison_adjudicate(comparison=comparison, choice="b", admin=admin)
    assert (aggregate.final_choice, aggregate.confidence) == ("b", 1.0)
    agreement_refresh(project_id=project.pk)
    aggregate.refresh_from_db()
    assert aggregate.adjudicated_choice == "b" and aggregate.votes_a == 1


def test_one_snapshot_per_round_beside_the_project_one():
    project = make_project(pairs=4, overlap=2)
    Comparison.objects.filter(
        project=project, id__in=Comparison.objects.filter(project=project).values("id")[:2]
    ).update(round=1)
    labelers = [labeler_create(username=f"l{i}", password=PASSWORD) for i in range(2)]
    label_all(project, labelers, lambda labeler, comparison: "a")
    agreement_refresh(project_id=project.pk)
    assert AgreementSnapshot.objects.get(project=project, round=1).figures["votes"] == 4
    assert AgreementSnapshot.objects.get(project=project, round=None).figures["votes"] == 8


@override_settings(CELERY_TASK_ALWAYS_EAGER=True)
def test_pages_recompute_a_stale_snapshot_on_the_embedded_default():
    project = make_project(pairs=2, overlap=1)
    alice = labeler_create(username="alice", password=PASSWORD)
    first = snapshot_for_page(project=project)
    assert first.figures["votes"] == 0
    label_all(project, [alice], lambda labeler, comparison: "tie")
    assert snapshot_for_page(project=project).figures["votes"] == 2
