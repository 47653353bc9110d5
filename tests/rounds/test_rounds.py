"""Training rounds on PostgreSQL with the real reward model and PPO on tiny models: every state
change recorded, one round per project, a killed worker resumed from its checkpoint, samples
back to the labelers exactly once, the humans' win rate, the reward-hacking flag, the pages."""

import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone

from annotation.importing import PairRecord
from annotation.models import Comparison, Prompt, content_hash
from annotation.services import agreement_refresh, labeler_create, pairs_import
from rounds import reward_models, services
from rounds.leases import Heartbeat, LeaseLost, kept_alive
from rounds.models import PolicyVersion, RewardModel, RoundTransition, TrainingRound, TrainingSettings
from tests.factories import PASSWORD, TINY, label_all, make_project, voted_project
from training.hacking import hacking_reason

State = TrainingRound.State
# A high learning rate so that three steps change what the tiny policy says.
TINY_PPO = {"steps": 3, "learning_rate": 3e-2, "batch_size": 4, "minibatches": 2, "ppo_epochs": 1, "max_new_tokens": 6,
            "lora": False, "checkpoint_every": 1, "max_prompt_length": 16, "reward_max_length": 32}  # fmt: skip


@pytest.fixture
def artifacts(tmp_path, settings):
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    return settings.ARTIFACTS_DIR


@pytest.fixture
def no_queue(monkeypatch):
    """Tasks are recorded, not run: the tests drive round_run themselves, as workers would."""
    queued: list[int] = []
    monkeypatch.setattr("rounds.tasks.round_run_task.delay", queued.append)
    monkeypatch.setattr("rounds.tasks.reward_model_train_task.delay", lambda pk: None)
    return queued


def loop_project(tiny_backbone: str, tiny_policy: str, *, pairs: int = 60, **ppo):
    project = voted_project(pairs)
    TrainingSettings.objects.create(
        project=project, min_new_comparisons=pairs // 2, policy=tiny_policy, held_out_prompts=6,
        reward_overrides={"backbone": tiny_backbone, **TINY}, optimizer_overrides={**TINY_PPO, **ppo},
    )  # fmt: skip
    return project


def states(training_round: TrainingRound) -> list[tuple[str, str]]:
    return list(training_round.transitions.values_list("from_state", "to_state"))


def expire_lease(training_round: TrainingRound) -> None:
    TrainingRound.objects.filter(pk=training_round.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))


def round_samples(training_round: TrainingRound):
    return Comparison.objects.filter(
        project=training_round.project, origin=Comparison.Origin.ROUND_SAMPLE, round=training_round.number
    )


@pytest.mark.django_db
def test_a_round_runs_resumes_after_a_killed_worker_and_closes_on_the_human_verdict(
    tiny_backbone, tiny_policy, artifacts, no_queue, django_capture_on_commit_callbacks
):
    project = loop_project(tiny_backbone, tiny_policy)
    with django_capture_on_commit_callbacks(execute=True):
        training_round = services.round_start(project=project)
    assert training_round.state == State.TRAINING_REWARD_MODEL and no_queue == [training_round.pk]
    assert training_round.aggregated_at_start == 60

    services.round_run(round_id=training_round.pk, worker="doomed", stop_after=1)  # dies after PPO step 1
    training_round.refresh_from_db()
    assert (training_round.state, training_round.lease_owner, training_round.step) == (
        State.TRAINING_POLICY,
        "doomed",
        1,
    )
    assert training_round.reward_model.status == RewardModel.Status.SUCCEEDED
    policy_dir = Path(artifacts) / project.slug / "rounds" / "1" / "policy"
    assert (policy_dir / "checkpoint.pt").exists()
    services.round_run(round_id=training_round.pk, worker="eager")  # the lease is live: nothing happens
    training_round.refresh_from_db()
    assert training_round.lease_owner == "doomed"

    expire_lease(training_round)
    with django_capture_on_commit_callbacks(execute=True):
        assert services.rounds_check()["reclaimed"] == [training_round.pk]
    assert no_queue == [training_round.pk, training_round.pk]
    services.round_run(round_id=training_round.pk, worker="rescuer")
    training_round.refresh_from_db()
    assert training_round.state == State.LABELING, training_round.error
    assert states(training_round) == [
        ("", State.WAITING_FOR_LABELS), (State.WAITING_FOR_LABELS, State.TRAINING_REWARD_MODEL),
        (State.TRAINING_REWARD_MODEL, State.TRAINING_POLICY), (State.TRAINING_POLICY, State.SAMPLING),
        (State.SAMPLING, State.LABELING),
    ]  # fmt: skip
    assert list(training_round.transitions.values_list("worker", flat=True))[-2:] == ["rescuer", "rescuer"]
    assert training_round.attempts == 2 and training_round.lease_owner == "" and training_round.step == 3

    policy = training_round.policy
    assert (policy.version, policy.parent.version, policy.parent.artifact_path) == (1, 0, tiny_policy)
    assert policy.config["reference"] == tiny_policy and policy.config["steps"] == 3
    steps = [json.loads(line) for line in (policy_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 3 and "objective/score" in steps[0]  # step 1 from the dead worker, 2-3 from the rescuer
    assert set(policy.metrics) >= {"score", "kl", "response_length", "metrics_file"}

    # The held-out prompts were never trained on, and both policies answered exactly those.
    held_out = set(training_round.held_out_prompt_ids)
    assert len(held_out) == 6
    trained_on = {json.loads(line)["prompt"] for line in (policy_dir.parent / "prompts.jsonl").read_text().splitlines()}
    assert not trained_on & set(Prompt.objects.filter(pk__in=held_out).values_list("text", flat=True))
    assert len(trained_on) == Prompt.objects.filter(project=project).count() - 6
    samples = list(round_samples(training_round).select_related("response_a", "response_b"))
    assert len(samples) == training_round.samples > 0
    assert {sample.prompt_id for sample in samples} <= held_out
    for sample in samples:
        new = sample.response_a if sample.meta["new_side"] == "a" else sample.response_b
        assert new.source == "policy v1"

    # A redelivered task adds nothing.
    no_queue.clear()
    services.round_run(round_id=training_round.pk, worker="redelivered")
    assert round_samples(training_round).count() == len(samples)
    assert services.rounds_check() == {"started": [], "promoted": [], "completed": [], "reclaimed": [], "failed": []}

    # The humans vote: it closes once every pair is labeled and aggregated.
    labelers = [labeler_create(username=f"judge{i}", password=PASSWORD) for i in range(2)]
    label_all(project, labelers, lambda labeler, comparison: comparison.meta["new_side"])
    assert services.rounds_check()["completed"] == []  # voted, not yet aggregated
    agreement_refresh(project_id=project.pk)
    assert services.rounds_check()["completed"] == [training_round.pk]
    training_round.refresh_from_db()
    assert (training_round.state, training_round.win_rate) == (State.DONE, 1.0)
    assert training_round.transitions.last().note.startswith("human win rate 1.000")


@pytest.mark.django_db
def test_a_round_whose_ppo_step_raises_is_marked_failed_with_its_error(tiny_backbone, tiny_policy, artifacts, no_queue):
    project = loop_project(tiny_backbone, tiny_policy, batch_size=3)  # not a multiple of 2 minibatches
    training_round = services.round_start(project=project)
    services.round_run(round_id=training_round.pk, worker="w1")
    training_round.refresh_from_db()
    assert training_round.state == State.FAILED
    assert "batch_size 3 is not a multiple of minibatches 2" in training_round.error
    assert (training_round.lease_owner, training_round.lease_expires_at) == ("", None)
    assert training_round.finished_at is not None and training_round.policy is None
    assert states(training_round)[-1] == (State.TRAINING_POLICY, State.FAILED)
    assert services.rounds_check()["started"] == []  # no retry loop on a broken configuration
    TrainingSettings.objects.filter(project=project).update(optimizer_overrides={**TINY_PPO, "batch_size": 4})
    retry = services.round_start(project=project)  # the admin, once it is fixed: the labels still count
    assert (retry.number, retry.state) == (2, State.TRAINING_REWARD_MODEL)


@pytest.mark.django_db
def test_unknown_ppo_settings_fail_the_round_naming_the_setting(tiny_backbone, tiny_policy, artifacts, no_queue):
    project = loop_project(tiny_backbone, tiny_policy, speed=11)
    training_round = services.round_start(project=project)
    services.round_run(round_id=training_round.pk, worker="w1")
    training_round.refresh_from_db()
    assert training_round.state == State.FAILED
    assert training_round.error.startswith("ValueError: unknown PPO setting 'speed'")
    assert states(training_round)[-1] == (State.TRAINING_REWARD_MODEL, State.FAILED)
    assert training_round.reward_model is None  # failed before spending time on a reward model


@pytest.mark.django_db
def test_a_round_waits_for_enough_new_labels(no_queue, django_capture_on_commit_callbacks):
    project = make_project(pairs=60, overlap=1)
    TrainingSettings.objects.create(project=project, min_new_comparisons=4)
    training_round = services.round_start(project=project)
    assert training_round.state == State.WAITING_FOR_LABELS and no_queue == []
    assert services.rounds_check()["promoted"] == []
    # It says what it waits for: the trigger, and the labeled pairs its reward model needs.
    progress = services.round_progress(training_round)
    assert progress is not None and progress.phase == "waiting for labels"
    assert progress.detail.startswith("0 of 4 new aggregated comparisons; 0 labeled pairs with a preference")
    assert "a reward model needs at least 56" in progress.detail
    solo = labeler_create(username="solo", password=PASSWORD)
    label_all(project, [solo], lambda labeler, comparison: "a")
    agreement_refresh(project_id=project.pk)
    assert services.new_aggregated_count(project) == 60
    with django_capture_on_commit_callbacks(execute=True):
        assert services.rounds_check()["promoted"] == [training_round.pk]
    training_round.refresh_from_db()
    assert training_round.state == State.TRAINING_REWARD_MODEL and no_queue == [training_round.pk]
    assert training_round.aggregated_at_start == 60
    assert services.new_aggregated_count(project) == 0  # counted from this round's reward model on


@pytest.mark.django_db
def test_the_agreement_refresh_task_moves_a_round_on_without_waiting_for_beat(
    no_queue, django_capture_on_commit_callbacks
):
    from annotation.tasks import agreement_refresh_task

    project = make_project(pairs=60, overlap=1)
    TrainingSettings.objects.create(project=project, min_new_comparisons=60)
    waiting = services.round_start(project=project)
    label_all(project, [labeler_create(username="solo", password=PASSWORD)], lambda labeler, comparison: "a")
    with django_capture_on_commit_callbacks(execute=True):
        agreement_refresh_task(project.pk)  # what a worker runs 30 s after the votes
    waiting.refresh_from_db()
    assert waiting.state == State.TRAINING_REWARD_MODEL and no_queue == [waiting.pk]

    # A labeling round: done once the refresh after its last vote aggregated its pairs.
    other = make_project(pairs=0, overlap=1)
    labeling = labeling_round(other)
    prompts = [make_prompt(other, f"q{i}") for i in range(4)]
    answers = services.sample_records(labeling, prompts, [f"n{i}" for i in range(4)], [f"o{i}" for i in range(4)])
    services.samples_insert(training_round=labeling, records=answers)
    agreement_refresh_task(other.pk)
    labeling.refresh_from_db()
    assert labeling.state == State.LABELING  # nothing labeled yet
    label_all(other, [labeler_create(username="judge", password=PASSWORD)], lambda labeler, comparison: "a")
    agreement_refresh_task(other.pk)
    labeling.refresh_from_db()
    assert labeling.state == State.DONE and labeling.win_rate is not None


@pytest.mark.django_db(transaction=True)
def test_one_round_per_project_even_when_two_workers_race(no_queue):
    project = make_project(pairs=2)
    TrainingSettings.objects.create(project=project, min_new_comparisons=1000)
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        try:
            outcomes.append(f"round {services.round_start(project=project).number}")
        except services.RoundBusy:
            outcomes.append("busy")
        finally:
            connection.close()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["busy", "busy", "busy", "round 1"]
    assert TrainingRound.objects.filter(project=project).count() == 1

    # Two workers claiming the same round: one gets the lease.
    training_round = TrainingRound.objects.get(project=project)
    TrainingRound.objects.filter(pk=training_round.pk).update(state=State.TRAINING_POLICY)
    claims: list[str] = []
    barrier = threading.Barrier(2)

    def claim(worker: str) -> None:
        barrier.wait()
        if services.round_claim(round_id=training_round.pk, worker=worker) is not None:
            claims.append(worker)
        connection.close()

    threads = [threading.Thread(target=claim, args=(name,)) for name in ("gpu-1", "gpu-2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claims) == 1
    training_round.refresh_from_db()
    assert training_round.lease_owner == claims[0] and training_round.attempts == 1


def test_the_hacking_rule_on_hand_values():
    rule = dict(previous_score=1.0, previous_length=20.0, length_factor=1.5)
    assert hacking_reason(score=2.0, win_rate=0.6, length=25.0, **rule) == ""  # reward up, humans agree
    assert hacking_reason(score=0.5, win_rate=0.3, length=25.0, **rule) == ""  # worse, but not hacking
    assert hacking_reason(score=2.0, win_rate=None, length=30.0, **rule) == ""  # exactly 1.5x: allowed
    reason = hacking_reason(score=2.0, win_rate=0.4, length=25.0, **rule)
    assert reason == "proxy reward rose from 1.000 to 2.000 while the human win rate is 40%"
    reason = hacking_reason(score=0.9, win_rate=0.7, length=30.5, **rule)
    assert reason == "mean response length grew from 20.0 to 30.5 tokens (over 1.5 times)"
    assert "; " in hacking_reason(score=2.0, win_rate=0.2, length=50.0, **rule)


def make_prompt(project, text: str) -> Prompt:
    return Prompt.objects.create(project=project, text=text, content_hash=content_hash(text))


def labeling_round(project, *, new_metrics=None, old_metrics=None) -> TrainingRound:
    """A round that reached labeling, built by hand (no training)."""
    training_round = TrainingRound.objects.create(project=project, number=1, state=State.LABELING)
    base = PolicyVersion.objects.create(project=project, version=0, artifact_path="base", metrics=old_metrics or {})
    training_round.policy = PolicyVersion.objects.create(
        project=project, version=1, parent=base, round=training_round, artifact_path="v1",
        metrics=new_metrics or {"score": 1.0, "kl": 0.1, "response_length": 10.0},
    )  # fmt: skip
    training_round.save(update_fields=["policy"])
    return training_round


@pytest.mark.django_db
def test_sampling_back_is_idempotent_with_randomized_sides():
    project = make_project(pairs=0, overlap=2)
    training_round = labeling_round(project)
    prompts = [make_prompt(project, f"q{i}") for i in range(20)]
    new = [f"new answer {i}" for i in range(20)]
    old = [f"old answer {i}" if i else "new answer 0" for i in range(20)]  # prompt 0: identical, no pair
    records = services.sample_records(training_round, prompts, new, old)
    assert len(records) == 19
    assert services.samples_insert(training_round=training_round, records=records) == 19
    first = sorted(round_samples(training_round).values_list("pk", "content_hash"))
    assert services.samples_insert(training_round=training_round, records=records) == 0
    again = services.sample_records(training_round, prompts, new, old)  # a redelivery draws the same sides
    assert services.samples_insert(training_round=training_round, records=again) == 0
    assert sorted(round_samples(training_round).values_list("pk", "content_hash")) == first
    sides = [comparison.meta["new_side"] for comparison in round_samples(training_round)]
    assert 4 <= sides.count("a") <= 15  # both sides used
    for comparison in round_samples(training_round).select_related("response_a", "response_b"):
        new_text = comparison.response_a.text if comparison.meta["new_side"] == "a" else comparison.response_b.text
        assert new_text.startswith("new answer")


@pytest.mark.django_db
def test_win_rate_comes_from_the_aggregated_labels_and_sets_the_flag(tmp_path, no_queue):
    project = make_project(pairs=0, overlap=1)
    # Round 1 compares with its own first PPO step: the starting policy under this reward model.
    metrics_file = tmp_path / "metrics.jsonl"
    metrics_file.write_text(json.dumps({"objective/score": 1.0, "policy/response_length": 10.0}) + "\n")
    training_round = labeling_round(
        project, new_metrics={"score": 2.0, "kl": 0.5, "response_length": 12.0, "metrics_file": str(metrics_file)}
    )
    prompts = [make_prompt(project, f"q{i}") for i in range(8)]
    records = services.sample_records(training_round, prompts, [f"n{i}" for i in range(8)], [f"o{i}" for i in range(8)])
    services.samples_insert(training_round=training_round, records=records)
    pairs_import(project=project, records=[PairRecord(line=1, prompt="other", response_a="x", response_b="y")])
    # New wins 2, loses 4, one tie and one both-bad (half each): (2 + 1) / 8.
    verdicts = {
        prompt.pk: verdict
        for prompt, verdict in zip(prompts, ["new"] * 2 + ["old"] * 4 + ["tie", "both_bad"], strict=True)
    }

    def decide(labeler, comparison):
        if comparison.origin != Comparison.Origin.ROUND_SAMPLE:
            return "a"
        verdict = verdicts[comparison.prompt_id]
        other = "b" if comparison.meta["new_side"] == "a" else "a"
        return {"new": comparison.meta["new_side"], "old": other}.get(verdict, verdict)

    label_all(project, [labeler_create(username="judge", password=PASSWORD)], decide)
    assert services.win_rate(training_round) == (None, 0)  # nothing aggregated yet
    agreement_refresh(project_id=project.pk)
    assert services.win_rate(training_round) == (3 / 8, 8)
    assert services.round_complete(training_round=training_round)
    training_round.refresh_from_db()
    assert training_round.state == State.DONE and training_round.win_rate == 3 / 8
    assert training_round.flagged
    assert training_round.flag_reason == "proxy reward rose from 1.000 to 2.000 while the human win rate is 38%"


@pytest.mark.django_db
def test_a_worker_that_lost_its_lease_cannot_move_the_round():
    project = make_project(pairs=0)
    training_round = TrainingRound.objects.create(project=project, number=1, state=State.TRAINING_POLICY)
    assert services.round_claim(round_id=training_round.pk, worker="first") is not None
    expire_lease(training_round)
    assert services.round_claim(round_id=training_round.pk, worker="second") is not None
    with pytest.raises(LeaseLost):
        services._transition(training_round, State.SAMPLING, worker="first")
    training_round.refresh_from_db()
    assert training_round.state == State.TRAINING_POLICY and not RoundTransition.objects.exists()


@pytest.mark.django_db
def test_round_pages_for_admins_only_with_plots_transitions_and_escaped_output(
    tmp_path, admin_user, alice, charlie, no_queue
):
    project = make_project(pairs=0, overlap=1)
    training_round = labeling_round(project)
    metrics_file = tmp_path / "metrics.jsonl"
    metrics_file.write_text(
        "".join(json.dumps({"step": s, "objective/score": 0.1 * s, "objective/kl": 0.01 * s,
                            "policy/response_length": 5 + s, "objective/entropy": 2 - 0.1 * s}) + "\n"
                for s in range(1, 6))
    )  # fmt: skip
    PolicyVersion.objects.filter(pk=training_round.policy_id).update(
        algorithm="grpo", metrics={"score": 0.5, "kl": 0.05, "response_length": 10, "metrics_file": str(metrics_file)}
    )
    RoundTransition.objects.create(training_round=training_round, from_state="sampling", to_state="labeling")
    prompt = make_prompt(project, "say hi")
    records = services.sample_records(training_round, [prompt], ["<script>alert(1)</script>"], ["hello"])
    services.samples_insert(training_round=training_round, records=records)

    client = Client()
    client.force_login(admin_user)
    page = client.get(f"/projects/{project.slug}/rounds/1/").content.decode()
    assert page.count("<polyline") >= 5  # four per-step plots + the across-rounds ones with data
    assert "Reward-model score per step" in page and "Human win rate over the predecessor" in page
    assert "per GRPO step" in page and "round 1 (grpo)" in page, "which algorithm produced the policy"
    assert "Implicit reward accuracy" not in page, "charts only for what the run logged"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page
    assert "<td>sampling</td><td>labeling</td>" in page
    listing = client.get(f"/projects/{project.slug}/rounds/").content.decode()
    assert f'href="/projects/{project.slug}/rounds/1/"' in listing and "Start round" in listing
    assert "<td>GRPO</td>" in listing
    dashboard = client.get(f"/projects/{project.slug}/dashboard/").content.decode()
    assert f'href="/projects/{project.slug}/rounds/"' in dashboard
    assert client.get(f"/projects/{project.slug}/rounds/2/").status_code == 404
    assert client.get("/projects/nope/rounds/").status_code == 404

    TrainingRound.objects.filter(pk=training_round.pk).update(
        state=State.DONE, flagged=True, flag_reason="mean response length grew <a lot>"
    )
    page = client.get(f"/projects/{project.slug}/rounds/1/").content.decode()
    assert "Likely reward hacking:</strong> mean response length grew &lt;a lot&gt;" in page

    for user in (alice, charlie):
        other = Client()
        other.force_login(user)
        assert other.get(f"/projects/{project.slug}/rounds/").status_code == 403
        assert other.get(f"/projects/{project.slug}/rounds/1/").status_code == 403
        assert other.post(f"/projects/{project.slug}/rounds/start/").status_code == 403
    assert Client().get(f"/projects/{project.slug}/rounds/").status_code == 302  # to the login page


@pytest.mark.django_db
def test_the_start_button_opens_a_round_once(admin_user, no_queue):
    project = make_project(pairs=0)
    client = Client()
    client.force_login(admin_user)
    table = client.post(f"/projects/{project.slug}/rounds/start/", HTTP_HX_REQUEST="true").content.decode()
    assert table.lstrip().startswith('<div id="rounds"') and "Round 1 opened." in table
    assert "waiting_for_labels" in table and 'hx-trigger="every 3s"' not in table  # waits for people: no polling
    again = client.post(f"/projects/{project.slug}/rounds/start/", HTTP_HX_REQUEST="true").content.decode()
    assert "already has a round in progress" in again
    assert TrainingRound.objects.filter(project=project).count() == 1


@pytest.mark.django_db
def test_beat_requeues_a_round_nobody_holds_and_fails_one_that_kills_its_workers(no_queue):
    project = voted_project(60)  # labels enough for a reward model
    TrainingSettings.objects.create(project=project, min_new_comparisons=0)
    training_round = services.round_start(project=project)
    # Its task message was lost: nobody ever claimed it. Within a lease period that is normal...
    assert training_round.state == State.TRAINING_REWARD_MODEL and training_round.lease_expires_at is None
    assert services.rounds_check()["reclaimed"] == []
    # ...after one, beat sends it again.
    TrainingRound.objects.filter(pk=training_round.pk).update(state_since=timezone.now() - timedelta(minutes=3))
    assert services.rounds_check()["reclaimed"] == [training_round.pk]
    # Workers that die before their error handling (out of memory) leave only expired leases behind.
    TrainingRound.objects.filter(pk=training_round.pk).update(attempts=services.MAX_ATTEMPTS)
    expire_lease(training_round)
    assert services.rounds_check()["failed"] == [training_round.pk]
    training_round.refresh_from_db()
    assert training_round.state == State.FAILED and "5 workers died on it" in training_round.error
    assert training_round.transitions.last().to_state == State.FAILED


@pytest.mark.django_db
def test_an_admin_abandons_a_round_nobody_will_finish_labeling(admin_user, alice, no_queue):
    project = make_project(pairs=0, overlap=1)
    training_round = labeling_round(project)
    url = f"/projects/{project.slug}/rounds/1/abandon/"
    labeler = Client()
    labeler.force_login(alice)
    assert labeler.post(url).status_code == 403
    client = Client()
    client.force_login(admin_user)
    assert "Abandon this round" in client.get(f"/projects/{project.slug}/rounds/1/").content.decode()
    response = client.post(url, follow=True)
    training_round.refresh_from_db()
    assert training_round.state == State.FAILED and training_round.error == "abandoned by admin"
    page = response.content.decode()
    assert "Round 1 abandoned." in page and "Abandon this round" not in page
    assert "already failed" in client.post(url, follow=True).content.decode()
    assert services.round_start(project=project).number == 2  # the project is free again


@pytest.mark.django_db(transaction=True)
def test_the_lease_is_kept_alive_between_steps_and_a_stolen_one_stops_the_worker(no_queue):
    project = voted_project(60)  # labels enough for a reward model
    TrainingSettings.objects.create(project=project, min_new_comparisons=0)
    training_round = services.round_claim(round_id=services.round_start(project=project).pk, worker="loader")
    lease = Heartbeat(training_round, "loader")
    claimed_until = training_round.lease_expires_at
    with kept_alive(lease, every=0.05):
        time.sleep(0.3)  # loading four models: no training step to beat on
        training_round.refresh_from_db()
        assert training_round.lease_expires_at > claimed_until and not lease.lost
        TrainingRound.objects.filter(pk=training_round.pk).update(lease_owner="thief")
        time.sleep(0.3)
    assert lease.lost
    with pytest.raises(LeaseLost):
        lease(1, 10, {})


class WorkerKilled(BaseException):
    """Ends a worker as SIGKILL would: past its error handling, which catches Exception."""


@pytest.mark.django_db
def test_a_rounds_reward_model_is_trained_by_the_round_never_by_its_own_task_or_beat(
    tiny_backbone, tiny_policy, artifacts, monkeypatch, django_capture_on_commit_callbacks
):
    from training import reward

    queued_models: list[int] = []
    queued_rounds: list[int] = []
    monkeypatch.setattr("rounds.tasks.reward_model_train_task.delay", queued_models.append)
    monkeypatch.setattr("rounds.tasks.round_run_task.delay", queued_rounds.append)
    project = loop_project(tiny_backbone, tiny_policy)
    with django_capture_on_commit_callbacks(execute=True):
        training_round = services.round_start(project=project)

    # The round's worker dies after four steps of its reward model.
    train = reward.train

    def dies_after_four_steps(*args, **kwargs):
        train(*args, **{**kwargs, "stop_after": 4})
        raise WorkerKilled

    monkeypatch.setattr(reward, "train", dies_after_four_steps)
    with pytest.raises(WorkerKilled):
        services.round_run(round_id=training_round.pk, worker="doomed")
    monkeypatch.setattr(reward, "train", train)
    training_round.refresh_from_db()
    model = training_round.reward_model
    assert (training_round.state, training_round.lease_owner) == (State.TRAINING_REWARD_MODEL, "doomed")
    assert (model.status, model.attempts) == (RewardModel.Status.RUNNING, 1) and model.step >= 1
    checkpoint = Path(artifacts) / project.slug / "reward" / "v1" / "member_0" / "checkpoint.pt"
    assert checkpoint.exists()

    # Both leases ran out. Beat re-enqueues a stale version of its own (another project's), never
    # the round's, and fails one that MAX_ATTEMPTS workers died on; a stray task for the round's
    # version does nothing.
    expire_lease(training_round)
    stale = {"status": RewardModel.Status.RUNNING, "lease_owner": "doomed",
             "lease_expires_at": timezone.now() - timedelta(seconds=1)}  # fmt: skip
    RewardModel.objects.filter(pk=model.pk).update(**stale)
    other = RewardModel.objects.create(project=make_project(pairs=0), version=1, config={}, **stale)
    exhausted = RewardModel.objects.create(
        project=make_project(pairs=0), version=1, config={}, attempts=services.MAX_ATTEMPTS, **stale
    )
    assert reward_models.reward_models_reclaim() == [other.pk]
    exhausted.refresh_from_db()
    assert exhausted.status == RewardModel.Status.FAILED and exhausted.error == "5 workers died on it"
    reward_models.reward_model_run(reward_model_id=model.pk, worker="stray")
    model.refresh_from_db()
    assert (model.status, model.attempts, model.lease_owner) == (RewardModel.Status.RUNNING, 1, "doomed")

    # Beat re-enqueues the round, and the round's next worker finishes the reward model from its
    # checkpoint before PPO (stopped after its first step here).
    with django_capture_on_commit_callbacks(execute=True):
        assert services.rounds_check()["reclaimed"] == [training_round.pk]
    assert queued_rounds == [training_round.pk, training_round.pk]
    services.round_run(round_id=training_round.pk, worker="rescuer", stop_after=1)
    training_round.refresh_from_db()
    model.refresh_from_db()
    assert (training_round.state, training_round.lease_owner) == (State.TRAINING_POLICY, "rescuer"), (
        training_round.error
    )
    assert model.status == RewardModel.Status.SUCCEEDED, model.error
    assert model.attempts == 2 and model.step == model.total_steps > 4 and model.finished_at is not None
    assert model.metrics["accuracy"] is not None and model.data["pairs"] == 60
    assert Path(model.artifact_path, "member_0", "config.json").exists() and not checkpoint.exists()
    losses = json.loads((checkpoint.parent / "losses.json").read_text())
    assert len(losses) == model.total_steps  # steps 1-4 from the dead worker, the rest from the rescuer
    assert states(training_round)[-1] == (State.TRAINING_REWARD_MODEL, State.TRAINING_POLICY)
    assert queued_models == [other.pk]  # nothing ever queued the round's version


@pytest.mark.django_db
def test_a_failed_round_fails_its_unfinished_reward_model(tiny_policy, artifacts, no_queue):
    project = loop_project("/nonexistent/model", tiny_policy)
    training_round = services.round_start(project=project)
    services.round_run(round_id=training_round.pk, worker="w1")
    training_round.refresh_from_db()
    assert training_round.state == State.FAILED
    assert training_round.error.startswith("RoundFailed: reward model v1 failed: ")
    assert "nonexistent" in training_round.error.splitlines()[0]
    model = training_round.reward_model
    assert model.status == RewardModel.Status.FAILED and model.error.startswith("round 1 failed: RoundFailed")

    # Abandoned while its reward model trains (its worker gone): the version fails with it, and
    # the project may train another.
    retry = services.round_start(project=project)
    version = reward_models.reward_model_create(project=project)
    TrainingRound.objects.filter(pk=retry.pk).update(reward_model=version)
    RewardModel.objects.filter(pk=version.pk).update(status=RewardModel.Status.RUNNING)
    services.round_abandon(training_round=retry, note="abandoned by admin")
    version.refresh_from_db()
    assert (version.status, version.error) == (RewardModel.Status.FAILED, "round 2 failed: abandoned by admin")
    assert version.finished_at is not None
    assert reward_models.reward_model_start(project=project).version == 3
