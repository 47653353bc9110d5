"""The Django side of training: versioned reward models with their lease, progress and metrics."""

from datetime import datetime, timedelta
from typing import Any

from django.db import models
from django.db.models import Q
from django.utils import timezone

from annotation.models import Project


class RewardModel(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="reward_models")
    version = models.PositiveIntegerField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    config = models.JSONField(help_text="training.reward.RewardConfig, as trained.")
    data = models.JSONField(default=dict, help_text="What it was trained on: pairs, round, export filters.")
    metrics = models.JSONField(default=dict, blank=True)
    artifact_path = models.CharField(max_length=500, blank=True)
    error = models.TextField(blank=True)
    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    # The lease: a worker owns the run while lease_expires_at is ahead; it renews it as it goes
    # (heartbeat). A killed worker's lease runs out and another worker takes over from the
    # last checkpoint.
    lease_owner = models.CharField(max_length=200, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "version"], name="reward_model_version"),
            # One training per project at a time.
            models.UniqueConstraint(
                fields=["project"], condition=Q(status__in=["queued", "running"]), name="reward_model_one_active"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.project_id} reward model v{self.version} ({self.status})"

    @property
    def progress(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0

    def lease_live(self, now: datetime | None = None) -> bool:
        return self.lease_expires_at is not None and self.lease_expires_at > (now or timezone.now())

    def summary(self) -> dict[str, Any]:
        return {key: self.metrics.get(key) for key in ("accuracy", "ece", "length_spearman", "held_out_pairs")}


LEASE = timedelta(minutes=2)
