"""Reward model versions: start one, and run it under a database lease so that exactly one worker
trains a project's model at a time and a killed worker's run is taken over from its checkpoint."""

import dataclasses
import traceback
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Max, Q
from django.utils import timezone

from annotation.export import PreferenceFilters, encode_jsonl, preference_rows
from annotation.models import Project
from rounds.leases import Heartbeat, LeaseLost, kept_alive, lease_claim, worker_name
from rounds.models import RewardModel


class TrainingBusy(Exception):
    """The project already has a reward model queued or training."""


def reward_model_start(*, project: Project, overrides: dict[str, Any] | None = None) -> RewardModel:
    """Queue a new reward model version; the `gpu` queue's worker trains it."""
    from rounds.tasks import reward_model_train_task
    from training import reward  # torch is imported where training runs, never in web processes

    fields = {spec.name for spec in dataclasses.fields(reward.RewardConfig)}
    unknown = sorted(set(overrides or {}) - fields)
    if unknown:
        raise ValueError(f"unknown reward model setting {unknown[0]!r}")
    config = reward.RewardConfig(**{"backbone": settings.FLYWHEEL_REWARD_BACKBONE, **(overrides or {})})
    try:
        with transaction.atomic():
            Project.objects.select_for_update().get(pk=project.pk)
            version = (RewardModel.objects.filter(project=project).aggregate(Max("version"))["version__max"] or 0) + 1
            model = RewardModel.objects.create(project=project, version=version, config=dataclasses.asdict(config))
            transaction.on_commit(lambda: reward_model_train_task.delay(model.pk))
    except IntegrityError:
        raise TrainingBusy(f"project {project.slug!r} already has a reward model in training") from None
    return model


def reward_model_claim(*, reward_model_id: int, worker: str) -> RewardModel | None:
    """Take the run's lease if it is queued, or running under a lease that ran out."""
    claimable = RewardModel.objects.filter(pk=reward_model_id).filter(
        Q(status=RewardModel.Status.QUEUED) | Q(status=RewardModel.Status.RUNNING, lease_expires_at__lt=timezone.now())
    )
    return lease_claim(claimable, worker=worker, status=RewardModel.Status.RUNNING)


def reward_model_run(*, reward_model_id: int, worker: str | None = None, stop_after: int | None = None) -> None:
    """Train a queued version (or take over one whose worker died). `stop_after` ends the run after
    that many steps without finishing it, as a killed worker would."""
    from training import reward

    worker = worker or worker_name()
    model = reward_model_claim(reward_model_id=reward_model_id, worker=worker)
    if model is None:
        return
    out = Path(settings.ARTIFACTS_DIR) / model.project.slug / "reward" / f"v{model.version}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        data_file = out / "train.jsonl"
        if not data_file.exists():  # a taken-over run trains on the same snapshot of the data
            partial = out / "train.jsonl.partial"
            with partial.open("wb") as handle:
                for chunk in encode_jsonl(preference_rows(model.project, PreferenceFilters())):
                    handle.write(chunk)
            partial.replace(data_file)
        pairs = reward.load_pairs(data_file)
        RewardModel.objects.filter(pk=model.pk).update(data={"pairs": len(pairs), "file": str(data_file)})
        config = reward.RewardConfig(**model.config)
        heartbeat = Heartbeat(model, worker)
        with kept_alive(heartbeat):
            summary = reward.train(pairs, config, out, progress=heartbeat, stop_after=stop_after)
        if "stopped_at" in summary:
            return
        RewardModel.objects.filter(pk=model.pk, lease_owner=worker).update(
            status=RewardModel.Status.SUCCEEDED, metrics=summary, artifact_path=str(out), finished_at=timezone.now(),
            lease_owner="", lease_expires_at=None,
        )  # fmt: skip
    except LeaseLost:
        return
    except Exception as error:  # noqa: BLE001 - a failed run is recorded, never left "running"
        RewardModel.objects.filter(pk=model.pk).update(
            status=RewardModel.Status.FAILED,
            error=f"{type(error).__name__}: {error}\n\n{traceback.format_exc()[-4000:]}",
            finished_at=timezone.now(), lease_owner="", lease_expires_at=None,
        )  # fmt: skip


def reward_models_reclaim() -> list[int]:
    """Re-enqueue runs whose worker stopped renewing its lease (beat calls this every minute)."""
    from rounds.tasks import reward_model_train_task

    stale = list(
        RewardModel.objects.filter(status=RewardModel.Status.RUNNING, lease_expires_at__lt=timezone.now()).values_list(
            "pk", flat=True
        )
    )
    for pk in stale:
        reward_model_train_task.delay(pk)
    return stale
