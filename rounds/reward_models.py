"""Reward model versions: start one, and run it under a database lease so that exactly one worker
trains a project's model at a time and a killed worker's run is taken over from its checkpoint.

A training round's version is another matter: the round trains it itself, in its own task and
under its own lease (rounds.services), so no task of the version's own is ever queued for it, and
neither a stray task nor beat's reclaim touches it."""

import dataclasses
import itertools
import math
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Exists, Max, OuterRef, Q, QuerySet
from django.utils import timezone

from annotation.export import PreferenceFilters, encode_jsonl, preference_rows
from annotation.models import Project
from config.celery import delay_best_effort
from rounds import launching
from rounds.leases import Heartbeat, LeaseLost, kept_alive, lease_claim, lease_retry, worker_name
from rounds.models import LEASE, MAX_ATTEMPTS, RewardModel, TrainingRound
from training import reward_config  # torch-free: torch is imported where training runs


class TrainingBusy(Exception):
    """The project already has a reward model queued or training, or too few labels to train one."""


def labeled_pairs(project: Project, *, up_to: int) -> int:
    """The project's pairs with a decided preference (what a reward model trains on), counted up to `up_to`."""
    return sum(1 for _ in itertools.islice(preference_rows(project, PreferenceFilters()), up_to))


def data_shortfall(project: Project, config: Any) -> str | None:
    """Why the project's labels cannot train a reward model with this (resolved) config yet, or None
    when they can: it needs MIN_TRAIN_PAIRS pairs once `eval_fraction` of the prompts is held out."""
    needed = math.ceil(reward_config.MIN_TRAIN_PAIRS / (1 - config.eval_fraction))
    have = labeled_pairs(project, up_to=needed)
    if have >= needed:
        return None
    return (
        f"{have} labeled pairs with a preference (ties, both-bad and split votes do not count); a reward model needs "
        f"at least {needed}: {reward_config.MIN_TRAIN_PAIRS} to train on once {config.eval_fraction:.0%} of the "
        "prompts are held out"
    )


def resolved_config(overrides: dict[str, Any] | None) -> reward_config.RewardConfig:
    """The config a version trains with: the overrides on FLYWHEEL_REWARD_BACKBONE, the backbone's
    defaults filled in now, so that the version records the values it trains with."""
    fields = {spec.name for spec in dataclasses.fields(reward_config.RewardConfig)}
    unknown = sorted(set(overrides or {}) - fields)
    if unknown:
        raise ValueError(f"unknown reward model setting {unknown[0]!r}")
    config = reward_config.RewardConfig(**{"backbone": settings.FLYWHEEL_REWARD_BACKBONE, **(overrides or {})})
    return reward_config.resolve_defaults(config)[0]


def reward_model_create(*, project: Project, overrides: dict[str, Any] | None = None) -> RewardModel:
    """The project's next version, queued; whoever creates it has it trained."""
    config = resolved_config(overrides)
    if shortfall := data_shortfall(project, config):
        raise TrainingBusy(f"project {project.slug!r} cannot train a reward model yet: {shortfall}")
    try:
        with transaction.atomic():
            Project.objects.select_for_update().get(pk=project.pk)
            version = (RewardModel.objects.filter(project=project).aggregate(Max("version"))["version__max"] or 0) + 1
            return RewardModel.objects.create(project=project, version=version, config=dataclasses.asdict(config))
    except IntegrityError:
        raise TrainingBusy(f"project {project.slug!r} already has a reward model in training") from None


def reward_model_start(*, project: Project, overrides: dict[str, Any] | None = None) -> RewardModel:
    """Queue a new reward model version; the `gpu` queue's worker trains it."""
    from rounds.tasks import reward_model_train_task

    with transaction.atomic():
        model = reward_model_create(project=project, overrides=overrides)
        transaction.on_commit(lambda: delay_best_effort(reward_model_train_task, model.pk))
    return model


def without_rounds(rows: QuerySet[RewardModel]) -> QuerySet[RewardModel]:
    """The versions no training round owns: a round trains its own version."""
    return rows.exclude(Exists(TrainingRound.objects.filter(reward_model=OuterRef("pk"))))


def reward_model_claim(*, reward_model_id: int, worker: str) -> RewardModel | None:
    """Take the run's lease if it is queued, or running under a lease that ran out."""
    claimable = without_rounds(RewardModel.objects.filter(pk=reward_model_id)).filter(
        Q(status=RewardModel.Status.QUEUED) | Q(status=RewardModel.Status.RUNNING, lease_expires_at__lt=timezone.now())
    )
    return lease_claim(claimable, worker=worker, status=RewardModel.Status.RUNNING)


def artifact_dir(model: RewardModel) -> Path:
    return Path(settings.ARTIFACTS_DIR) / model.project.slug / "reward" / f"v{model.version}"


def reward_model_train(
    model: RewardModel, *, progress: Callable[..., None], stop_after: int | None = None
) -> dict[str, Any]:
    """Train the version and return its summary (with "stopped_at" when `stop_after` ended it early).
    The caller holds the lease that guards the run and records how it ended."""
    from training import reward

    out = artifact_dir(model)
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
    return launching.train(
        "reward", config, ["--data", str(data_file)], out, progress=progress, stop_after=stop_after,
        in_process=lambda: reward.train(pairs, config, out, progress=progress, stop_after=stop_after),
    )  # fmt: skip


def succeeded(model: RewardModel, summary: dict[str, Any]) -> dict[str, Any]:
    """The fields of a version that finished training."""
    return {"status": RewardModel.Status.SUCCEEDED, "metrics": summary, "artifact_path": str(artifact_dir(model)),
            "finished_at": timezone.now(), "lease_owner": "", "lease_expires_at": None}  # fmt: skip


def failed(error: str) -> dict[str, Any]:
    """The fields of a version that failed, with the error (and its traceback)."""
    return {"status": RewardModel.Status.FAILED, "error": error, "finished_at": timezone.now(), "lease_owner": "",
            "lease_expires_at": None}  # fmt: skip


def reward_model_run(*, reward_model_id: int, worker: str | None = None, stop_after: int | None = None) -> None:
    """Train a queued version (or take over one whose worker died). `stop_after` ends the run after
    that many steps without finishing it, as a killed worker would."""
    worker = worker or worker_name()
    model = reward_model_claim(reward_model_id=reward_model_id, worker=worker)
    if model is None:
        return
    try:
        heartbeat = Heartbeat(model, worker)
        with kept_alive(heartbeat):
            summary = reward_model_train(model, progress=heartbeat, stop_after=stop_after)
        if "stopped_at" in summary:
            return
        RewardModel.objects.filter(pk=model.pk, lease_owner=worker).update(**succeeded(model, summary))
    except LeaseLost:
        return
    except launching.ChildKilled as error:
        if lease_retry(model, worker=worker, error=error):
            from rounds.tasks import reward_model_train_task

            delay_best_effort(reward_model_train_task, model.pk)
        else:
            message = f"killed on each of {model.attempts} attempts: {error}"
            RewardModel.objects.filter(pk=model.pk).update(**failed(message))
    except Exception as error:  # noqa: BLE001 - a failed run is recorded, never left "running"
        message = f"{type(error).__name__}: {error}\n\n{traceback.format_exc()[-4000:]}"
        RewardModel.objects.filter(pk=model.pk).update(**failed(message))


def reward_models_reclaim() -> list[int]:
    """Re-enqueue runs whose worker stopped renewing its lease (failing one that MAX_ATTEMPTS
    workers died on), and versions that no worker took up within a lease period (their task was
    never queued: the broker was down when they were started). Beat calls this every minute; a
    message sent twice is harmless, as the second finds the version claimed. A round's version is
    left to the round: beat's rounds_check re-enqueues the round itself."""
    from rounds.tasks import reward_model_train_task

    now = timezone.now()
    abandoned = Q(status=RewardModel.Status.RUNNING, lease_expires_at__lt=now)
    never_started = Q(status=RewardModel.Status.QUEUED, started_at__isnull=True, created_at__lt=now - LEASE)
    # A process that dies (out of memory, a CUDA fault) never reaches its own error handling.
    without_rounds(RewardModel.objects.filter(abandoned, attempts__gte=MAX_ATTEMPTS)).update(
        **failed(f"{MAX_ATTEMPTS} workers died on it")
    )
    stale = list(without_rounds(RewardModel.objects.filter(abandoned | never_started)).values_list("pk", flat=True))
    for pk in stale:
        delay_best_effort(reward_model_train_task, pk)
    return stale
