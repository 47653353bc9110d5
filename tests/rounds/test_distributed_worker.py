"""A GPU worker with several devices (FLYWHEEL_GPUS_PER_WORKER=2, on the CPU: gloo) trains a reward
model version under torchrun; its ranks killed mid-run, the next attempt resumes from the
checkpoint and takes every step once."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from rounds.models import MAX_ATTEMPTS, RewardModel
from rounds.reward_models import reward_model_create, reward_model_run, reward_model_start
from tests.factories import TINY, voted_project
from tests.workers import celery_worker


def ranks_of(module: str) -> list[int]:
    """The processes torchrun started for `python -m module` (its ranks, not torchrun itself)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, PermissionError, NotADirectoryError, ProcessLookupError):
            continue
        if module.encode() in arguments and b"torch.distributed.run" not in arguments:
            pids.append(int(entry.name))
    return pids


def kill_ranks_once_up(module: str, count: int = 2, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while len(ranks := ranks_of(module)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.django_db(transaction=True)
def test_a_two_device_worker_trains_under_torchrun_and_resumes_when_its_ranks_are_killed(
    tiny_backbone, tmp_path, settings
):
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    project = voted_project(120)
    # Batches of 2 over 6 epochs: about 300 steps, long enough to be caught after the first checkpoint.
    overrides = {"backbone": tiny_backbone, **TINY, "batch_size": 2, "epochs": 6, "checkpoint_every": 20}
    with celery_worker("gpu", ARTIFACTS_DIR=str(settings.ARTIFACTS_DIR), FLYWHEEL_GPUS_PER_WORKER="2") as worker:
        model = reward_model_start(project=project, overrides=overrides)
        checkpoint = Path(settings.ARTIFACTS_DIR) / project.slug / "reward" / "v1" / "member_0" / "checkpoint.pt"
        deadline = time.monotonic() + 240
        while not checkpoint.exists() and time.monotonic() < deadline and worker.process.poll() is None:
            time.sleep(0.05)
        ranks = ranks_of("training.reward")
        assert checkpoint.exists() and len(ranks) == 2, worker.process.poll()
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)
        while time.monotonic() < deadline and worker.process.poll() is None:
            model.refresh_from_db()
            if model.status in (RewardModel.Status.SUCCEEDED, RewardModel.Status.FAILED):
                break
            time.sleep(0.5)
    assert model.status == RewardModel.Status.SUCCEEDED, (model.status, model.error, worker.output[-3000:])
    assert model.attempts == 2, worker.output[-6000:]  # the killed launch, then the one that resumed
    artifact = Path(model.artifact_path)
    losses = json.loads((artifact / "member_0" / "losses.json").read_text())
    assert len(losses) == model.total_steps == model.step > 250  # every step once: none lost, none twice
    assert json.loads((artifact / "config.json").read_text())["world_size"] == 2
    assert model.metrics["accuracy"] > 0.9


@pytest.mark.django_db(transaction=True)
def test_a_run_killed_on_its_last_attempt_is_failed_not_queued_again(tiny_backbone, tmp_path, settings, monkeypatch):
    """A run the kernel kills for memory dies the same way on every attempt: the MAX_ATTEMPTS-th
    killed launch fails the version, with torchrun's report, instead of queueing another."""
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    monkeypatch.setenv("FLYWHEEL_GPUS_PER_WORKER", "2")
    overrides = {"backbone": tiny_backbone, **TINY, "batch_size": 2, "epochs": 6}
    model = reward_model_create(project=voted_project(120), overrides=overrides)
    RewardModel.objects.filter(pk=model.pk).update(attempts=MAX_ATTEMPTS - 1)
    killer = threading.Thread(target=kill_ranks_once_up, args=("training.reward",))
    killer.start()
    reward_model_run(reward_model_id=model.pk, worker="doomed")
    killer.join()
    model.refresh_from_db()
    assert (model.status, model.attempts) == (RewardModel.Status.FAILED, MAX_ATTEMPTS), model.error
    assert model.error.startswith(f"killed on each of {MAX_ATTEMPTS} attempts: training.reward under torchrun")
