"""Export: Hugging Face preference rows and raw votes, JSONL and Parquet, filters, permissions."""

import io
import json

import pyarrow.parquet as pq
import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from annotation.export import pseudonym
from annotation.importing import PairRecord
from annotation.models import Comparison, Vote
from annotation.services import (
    agreement_refresh,
    assignment_claim,
    comparison_adjudicate,
    labeler_create,
    pairs_import,
    vote_submit,
)
from tests.factories import PASSWORD, api_client_for, make_project

pytestmark = pytest.mark.django_db


def vote_as(labeler, project, canonical_by_prompt: dict[str, str], strength: int = 2) -> None:
    while (assignment := assignment_claim(project=project, labeler=labeler)) is not None:
        canonical = canonical_by_prompt.get(assignment.comparison.prompt.text, "a")
        screen = {"a": "left", "b": "right"} if assignment.left_is_a else {"a": "right", "b": "left"}
        vote_submit(
            assignment_id=assignment.pk, labeler=labeler, choice=screen.get(canonical, canonical), strength=strength
        )


@pytest.fixture
def labeled():
    """Three pairs: one clear A (3-0), one B by 2-1, one tie; and a 1-1 split that cannot be decided."""
    project = make_project(pairs=0, overlap=3)
    pairs_import(
        project=project,
        records=[
            PairRecord(line=1, prompt="p-a", response_a="good a", response_b="bad b", source_a="m1", source_b="m2"),
            PairRecord(line=2, prompt="p-b", response_a="bad a", response_b="good b", source_a="m1", source_b="m2"),
            PairRecord(line=3, prompt="p-tie", response_a="same a", response_b="same b"),
        ],
    )
    labelers = [labeler_create(username=f"l{i}", password=PASSWORD) for i in range(3)]
    vote_as(labelers[0], project, {"p-a": "a", "p-b": "b", "p-tie": "tie"})
    vote_as(labelers[1], project, {"p-a": "a", "p-b": "b", "p-tie": "tie"}, strength=3)
    vote_as(labelers[2], project, {"p-a": "a", "p-b": "a", "p-tie": "tie"})
    agreement_refresh(project_id=project.pk)
    return project


def export(project, tmp_path, *args) -> list[dict]:
    out = tmp_path / "out.jsonl"
    call_command("export_pairs", project.slug, str(out), *args)
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_preference_rows_put_the_winner_in_chosen(labeled, tmp_path):
    rows = {row["prompt"]: row for row in export(labeled, tmp_path)}
    assert set(rows) == {"p-a", "p-b"}  # ties are left out by default
    assert (rows["p-a"]["chosen"], rows["p-a"]["rejected"]) == ("good a", "bad a".replace("bad a", "bad b"))
    assert (rows["p-b"]["chosen"], rows["p-b"]["rejected"]) == ("good b", "bad a")
    assert (rows["p-b"]["votes_chosen"], rows["p-b"]["votes_rejected"]) == (2, 1)
    assert rows["p-b"]["confidence"] == pytest.approx(2 / 3)
    assert (rows["p-b"]["source_chosen"], rows["p-b"]["source_rejected"]) == ("m2", "m1")
    assert rows["p-a"]["mean_strength"] == pytest.approx(7 / 3)
    assert rows["p-a"]["label_source"] == "majority" and rows["p-a"]["round"] is None


def test_filters_min_confidence_ties_and_round(labeled, tmp_path):
    assert {row["prompt"] for row in export(labeled, tmp_path, "--min-confidence", "0.9")} == {"p-a"}
    with_ties = {row["prompt"]: row for row in export(labeled, tmp_path, "--include-ties")}
    assert with_ties["p-tie"]["label"] == "tie"
    Comparison.objects.filter(prompt__text="p-a").update(round=2)
    assert [row["prompt"] for row in export(labeled, tmp_path, "--round", "2")] == ["p-a"]


def test_adjudication_wins_over_the_votes(labeled, tmp_path):
    comparison = Comparison.objects.get(prompt__text="p-b")
    comparison_adjudicate(comparison=comparison, choice="a", admin=labeler_create(username="boss", password=PASSWORD))
    row = next(row for row in export(labeled, tmp_path) if row["prompt"] == "p-b")
    assert (row["chosen"], row["label_source"], row["confidence"]) == ("bad a", "adjudicated", 1.0)


def test_labelers_below_the_gold_threshold_are_left_out(labeled, tmp_path):
    snapshot = labeled.agreement_snapshots.latest("computed_at")
    l2 = next(row for row in snapshot.labelers if row["username"] == "l2")
    l2["gold_accuracy"] = 0.2  # as if l2 had failed the gold checks
    snapshot.save()
    row = next(row for row in export(labeled, tmp_path, "--min-gold-accuracy", "0.5") if row["prompt"] == "p-b")
    assert (row["votes_chosen"], row["votes_rejected"]) == (2, 0)


def test_parquet_holds_the_same_rows(labeled, tmp_path):
    jsonl = export(labeled, tmp_path)
    out = tmp_path / "out.parquet"
    call_command("export_pairs", labeled.slug, str(out))
    assert pq.read_table(out).to_pylist() == jsonl


def test_conversations_export_in_the_conversational_format(tmp_path):
    project = make_project(pairs=0, overlap=1)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hey"},
        {"role": "user", "content": "2+2?"},
    ]
    pairs_import(project=project, records=[
        PairRecord(line=1, prompt=messages, response_a="4", response_b="5"),
        PairRecord(line=2, prompt="plain text", response_a="x", response_b="y"),
    ])  # fmt: skip
    vote_as(labeler_create(username="solo", password=PASSWORD), project, {})
    rows = export(project, tmp_path)
    assert {json.dumps(row["prompt"]) for row in rows} == {
        json.dumps(messages),
        json.dumps([{"role": "user", "content": "plain text"}]),
    }
    assert all(row["chosen"][0]["role"] == "assistant" for row in rows)


def test_raw_votes_are_pseudonymised_unless_asked(labeled, tmp_path):
    rows = export(labeled, tmp_path, "--votes")
    assert len(rows) == Vote.objects.count() == 9
    ids = set(Vote.objects.values_list("labeler_id", flat=True))
    assert {row["labeler"] for row in rows} == {pseudonym(i) for i in ids}
    assert {row["labeler"] for row in export(labeled, tmp_path, "--votes", "--no-pseudonymize")} == {
        str(i) for i in ids
    }
    assert {row["shown_left"] for row in rows} <= {"a", "b"}


def test_export_api_streams_for_admins_only(labeled, alice, admin_user, charlie):
    url = f"/api/v1/projects/{labeled.slug}/export/"
    response = api_client_for(admin_user).get(url, {"format": "parquet"})
    assert response.status_code == 200 and response.streaming
    table = pq.read_table(io.BytesIO(b"".join(response.streaming_content)))
    assert table.num_rows == 2
    jsonl = api_client_for(admin_user).get(url, {"kind": "votes"})
    assert len(b"".join(jsonl.streaming_content).splitlines()) == 9
    assert api_client_for(admin_user).get(url, {"format": "csv"}).status_code == 400
    assert api_client_for(alice).get(url).status_code == 403
    assert api_client_for(charlie).get(url).status_code == 403
    assert APIClient().get(url).status_code == 401
