"""Reward model versions on PostgreSQL: train from votes, one at a time, failures recorded,
a killed worker taken over from its checkpoint, and a real Celery worker on the gpu queue."""

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from rounds.models import RewardModel
from rounds.reward_models import TrainingBusy, reward_model_run, reward_model_start
from tests.factories import TINY, voted_project
from tests.workers import celery_worker

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def artifacts(tmp_path, settings):
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    return settings.ARTIFACTS_DIR


@pytest.mark.django_db(transaction=True)
def test_a_version_trains_from_the_votes_and_records_its_metrics(tiny_backbone, artifacts):
    project = voted_project()
    model = reward_model_start(project=project, overrides={"backbone": tiny_backbone, **TINY})  # eager: runs on commit
    model.refresh_from_db()
    assert model.status == RewardModel.Status.SUCCEEDED, model.error
    assert model.version == 1 and model.data["pairs"] == 120
    assert model.metrics["accuracy"] is not None and model.metrics["held_out_pairs"] > 0
    assert model.step == model.total_steps > 0
    assert (Path(model.artifact_path) / "member_0" / "config.json").exists()
    assert json.loads((Path(model.artifact_path) / "config.json").read_text())["backbone"] == tiny_backbone


@pytest.mark.django_db
def test_one_training_per_project_at_a_time(tiny_backbone, artifacts, monkeypatch):
    monkeypatch.setattr("rounds.tasks.reward_model_train_task.delay", lambda pk: None)  # nobody consumes
    # One labeled pair is no training set: refused at the start, with what is missing, nothing queued.
    few = voted_project(30)
    with pytest.raises(TrainingBusy, match="30 labeled pairs with a preference .* needs at least 56: 50 to train on"):
        reward_model_start(project=few, overrides={"backbone": tiny_backbone})
    assert not RewardModel.objects.filter(project=few).exists()
    project = voted_project(60)
    reward_model_start(project=project, overrides={"backbone": tiny_backbone})
    with pytest.raises(TrainingBusy):
        reward_model_start(project=project, overrides={"backbone": tiny_backbone})
    with pytest.raises(ValueError, match="unknown reward model setting 'speed'"):
        reward_model_start(project=project, overrides={"speed": 11})


@pytest.mark.django_db(transaction=True)
def test_a_failed_run_is_marked_failed_with_its_error(artifacts):
    project = voted_project(60)
    model = reward_model_start(project=project, overrides={"backbone": "/nonexistent/model"})
    model.refresh_from_db()
    assert model.status == RewardModel.Status.FAILED
    assert "nonexistent" in model.error and model.lease_owner == "" and model.finished_at is not None
    with pytest.raises(CommandError, match="failed"):
        call_command("train_reward_model", project.slug, "--backbone", "/nonexistent/model")


@pytest.mark.django_db
def test_a_killed_worker_is_taken_over_from_its_checkpoint(tiny_backbone, artifacts, monkeypatch):
    monkeypatch.setattr("rounds.tasks.reward_model_train_task.delay", lambda pk: None)
    project = voted_project()
    model = reward_model_start(project=project, overrides={"backbone": tiny_backbone, **TINY})
    reward_model_run(reward_model_id=model.pk, worker="doomed", stop_after=4)  # dies after step 4
    model.refresh_from_db()
    assert (model.status, model.lease_owner) == (RewardModel.Status.RUNNING, "doomed")
    checkpoint = Path(artifacts) / project.slug / "reward" / "v1" / "member_0" / "checkpoint.pt"
    assert checkpoint.exists()
    reward_model_run(reward_model_id=model.pk, worker="eager")  # the lease is still live: nothing happens
    model.refresh_from_db()
    assert model.lease_owner == "doomed"
    RewardModel.objects.filter(pk=model.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    reward_model_run(reward_model_id=model.pk, worker="rescuer")
    model.refresh_from_db()
    assert model.status == RewardModel.Status.SUCCEEDED, model.error
    assert model.attempts == 2
    losses = json.loads((checkpoint.parent / "losses.json").read_text())
    assert len(losses) == model.total_steps  # steps 1-4 from the first worker, the rest from the second


@pytest.mark.django_db(transaction=True)
def test_command_trains_on_the_embedded_default(tiny_backbone, artifacts, capsys):
    project = voted_project(80)
    call_command("train_reward_model", project.slug, "--backbone", tiny_backbone, "--max-length", "32")
    assert "reward model v1: accuracy" in capsys.readouterr().out


@pytest.mark.django_db
def test_command_flags_left_out_keep_the_settings_backbone_and_the_config_defaults(settings, capsys):
    settings.FLYWHEEL_REWARD_BACKBONE = "settings-backbone"
    project = voted_project(60)  # not committed: the queued task never runs
    call_command("train_reward_model", project.slug, "--max-length", "32", "--lora", "--no-gradient-checkpointing")
    assert "reward model v1 is queued" in capsys.readouterr().out
    config = RewardModel.objects.get(project=project).config
    assert (config["backbone"], config["max_length"], config["lora"], config["gradient_checkpointing"]) == (
        "settings-backbone", 32, True, False,
    )  # fmt: skip
    assert (config["epochs"], config["seed"]) == (1, 42)  # RewardConfig's own defaults


@pytest.mark.django_db(transaction=True)
def test_a_celery_worker_on_the_gpu_queue_trains_from_votes_in_postgresql(tiny_backbone, artifacts):
    project = voted_project(80)
    with celery_worker("gpu", ARTIFACTS_DIR=str(artifacts)) as worker:
        model = reward_model_start(project=project, overrides={"backbone": tiny_backbone, **TINY})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and worker.process.poll() is None:
            model.refresh_from_db()
            if model.status in (RewardModel.Status.SUCCEEDED, RewardModel.Status.FAILED):
                break
            time.sleep(1)
    assert model.status == RewardModel.Status.SUCCEEDED, (model.status, model.error, worker.output[-3000:])
    assert "reward_model_train_task" in worker.output
    assert model.metrics["accuracy"] is not None


@pytest.mark.django_db(transaction=True)
def test_dashboard_button_trains_and_the_table_shows_progress(tiny_backbone, artifacts, admin_user, alice, settings):
    from django.test import Client

    settings.FLYWHEEL_REWARD_BACKBONE = tiny_backbone
    project = voted_project(80)
    client = Client()
    client.force_login(admin_user)
    response = client.post(f"/projects/{project.slug}/reward-models/train/")
    assert response.status_code == 302
    table = client.get(f"/projects/{project.slug}/reward-models/", HTTP_HX_REQUEST="true").content.decode()
    assert table.lstrip().startswith('<div id="reward-models"') and "v1" in table and "succeeded" in table
    assert "<progress" in table and 'hx-trigger="every 2s"' not in table  # nothing left to poll
    labeler = Client()
    labeler.force_login(alice)
    assert labeler.post(f"/projects/{project.slug}/reward-models/train/").status_code == 403


@pytest.mark.django_db
def test_too_few_pairs_are_refused_on_the_dashboard_with_what_is_missing(tiny_backbone, admin_user, settings):
    """The dashboard once trained on the one voted pair and said "succeeded"."""
    from django.test import Client

    settings.FLYWHEEL_REWARD_BACKBONE = tiny_backbone
    project = voted_project(20)
    client = Client()
    client.force_login(admin_user)
    page = client.post(f"/projects/{project.slug}/reward-models/train/", follow=True).content.decode()
    assert "cannot train a reward model yet: 20 labeled pairs with a preference" in page
    assert "needs at least 56: 50 to train on once 10% of the prompts are held out" in page
    assert not RewardModel.objects.filter(project=project).exists()
