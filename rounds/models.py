"""The Django side of training: versioned reward models and policies, and the training rounds that
produce them, each run under a lease with progress and metrics."""

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from annotation.models import Project


class LeasedRun(models.Model):
    """GPU work that a worker owns while lease_expires_at is ahead; it renews the lease as it goes
    (heartbeat), with its progress. A killed worker's lease runs out and another worker takes over
    from the last checkpoint."""

    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    lease_owner = models.CharField(max_length=200, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True

    @property
    def progress(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0

    @property
    def time_left(self) -> str:
        """ "about 3 min left" at the pace since it started; empty before there is a pace or once done."""
        from training.cli import time_left

        if self.started_at is None or self.finished_at is not None:
            return ""
        return time_left((timezone.now() - self.started_at).total_seconds(), self.step, self.total_steps)

    def lease_live(self, now: datetime | None = None) -> bool:
        return self.lease_expires_at is not None and self.lease_expires_at > (now or timezone.now())


class RewardModel(LeasedRun):
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

    def summary(self) -> dict[str, Any]:
        return {key: self.metrics.get(key) for key in ("accuracy", "ece", "length_spearman", "held_out_pairs")}


LEASE = timedelta(minutes=2)
# Workers or launched runs that may die on one row (out of memory, a CUDA fault, a kill) before it is failed.
MAX_ATTEMPTS = 5


class Algorithm(models.TextChoices):
    """How a round improves the policy: online against the round's reward model (PPO with a critic;
    GRPO and RLOO with a group of samples per prompt as the baseline), or offline on the project's
    aggregated pairs (DPO, IPO, KTO), the reward model then only measuring the result."""

    PPO = "ppo", "PPO"
    GRPO = "grpo", "GRPO"
    RLOO = "rloo", "RLOO"
    DPO = "dpo", "DPO"
    IPO = "ipo", "IPO"
    KTO = "kto", "KTO"


OFFLINE_ALGORITHMS = (Algorithm.DPO, Algorithm.IPO, Algorithm.KTO)


class TrainingSettings(models.Model):
    """How a project's training rounds run; created with the defaults on first use."""

    project = models.OneToOneField(Project, on_delete=models.CASCADE, related_name="training_settings")
    min_new_comparisons = models.PositiveIntegerField(
        default=200, help_text="A round starts once this many comparisons were aggregated since the last round's."
    )
    policy = models.CharField(
        max_length=500,
        blank=True,
        help_text="The starting policy (model id, local path or smollm2-135m); empty: FLYWHEEL_POLICY.",
    )
    held_out_prompts = models.PositiveIntegerField(
        default=32,
        help_text="Prompts kept out of the policy's training; both policies answer them for the humans to compare.",
    )
    hacking_length_factor = models.FloatField(
        default=1.5, help_text="A round whose mean response length grew by more than this factor is flagged."
    )
    algorithm = models.CharField(
        max_length=10, choices=Algorithm.choices, default=Algorithm.PPO, help_text="How a round trains the policy."
    )
    optimizer_overrides = models.JSONField(
        default=dict,
        blank=True,
        help_text="Fields of the algorithm's config to change: training.ppo.PPOConfig, training.grpo.GRPOConfig or "
        "training.dpo.DPOConfig (offline algorithms also take max_new_tokens, temperature, top_p and "
        "max_prompt_length for the samples).",
    )
    reward_overrides = models.JSONField(
        default=dict, blank=True, help_text="training.reward.RewardConfig fields for the rounds' reward models."
    )

    class Meta:
        verbose_name_plural = "training settings"
        constraints = [models.CheckConstraint(condition=Q(hacking_length_factor__gt=1), name="length_factor_above_1")]

    def __str__(self) -> str:
        return f"training settings of {self.project_id}"

    @property
    def starting_policy(self) -> str:
        return self.policy or settings.FLYWHEEL_POLICY


class PolicyVersion(models.Model):
    """A policy: version 0 is the project's starting policy (untrained); each round adds the next."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="policy_versions")
    version = models.PositiveIntegerField()
    parent = models.ForeignKey("self", on_delete=models.PROTECT, null=True, blank=True, related_name="children")
    round = models.OneToOneField(
        "TrainingRound", on_delete=models.SET_NULL, null=True, blank=True, related_name="produced_policy"
    )
    algorithm = models.CharField(max_length=10, choices=Algorithm.choices, blank=True, help_text="Empty: version 0.")
    config = models.JSONField(default=dict, help_text="The algorithm's config as trained, and how it sampled.")
    metrics = models.JSONField(default=dict, blank=True, help_text="The run's summary and its metrics.jsonl's path.")
    artifact_path = models.CharField(max_length=500, help_text="What ppo.train and ppo.generate take as `policy`.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "version"], name="policy_version_unique")]

    def __str__(self) -> str:
        return f"{self.project_id} policy v{self.version}"

    def step_metrics(self) -> list[dict[str, Any]]:
        """The rows of its run's metrics.jsonl, one per step (none for version 0)."""
        path = Path(self.metrics.get("metrics_file", ""))
        if not path.is_file():
            return []
        with path.open() as handle:
            return [json.loads(line) for line in handle if line.strip()]


class TrainingRound(LeasedRun):
    """One turn of the loop: reward model, the policy's training, its samples back to the labelers."""

    class State(models.TextChoices):
        WAITING_FOR_LABELS = "waiting_for_labels"
        TRAINING_REWARD_MODEL = "training_reward_model"
        TRAINING_POLICY = "training_policy"
        SAMPLING = "sampling"
        LABELING = "labeling"
        DONE = "done"
        FAILED = "failed"

    # The states a gpu worker drives; the others wait for people (labels) or are over.
    WORKER_STATES = (State.TRAINING_REWARD_MODEL, State.TRAINING_POLICY, State.SAMPLING)
    TERMINAL_STATES = (State.DONE, State.FAILED)

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="training_rounds")
    number = models.PositiveIntegerField()
    state = models.CharField(max_length=30, choices=State.choices, default=State.WAITING_FOR_LABELS)
    state_since = models.DateTimeField(default=timezone.now)
    aggregated_at_start = models.PositiveIntegerField(
        null=True, blank=True, help_text="Aggregated comparisons of the project when its reward model started."
    )
    reward_model = models.ForeignKey(RewardModel, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    policy = models.ForeignKey(
        PolicyVersion,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="+",
        help_text="What the round trained.",
    )
    held_out_prompt_ids = models.JSONField(
        default=list, blank=True, help_text="Fixed when the policy's training starts."
    )
    samples = models.PositiveIntegerField(default=0, help_text="Comparisons sent back to the labelers.")
    win_rate = models.FloatField(null=True, blank=True, help_text="Humans' verdict: new policy over previous.")
    flagged = models.BooleanField(default=False)
    flag_reason = models.TextField(blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "number"], name="training_round_number"),
            models.UniqueConstraint(
                fields=["project"], condition=~Q(state__in=["done", "failed"]), name="training_round_one_active"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.project_id} round {self.number} ({self.state})"

    @property
    def active(self) -> bool:
        return self.state not in self.TERMINAL_STATES


class RoundTransition(models.Model):
    training_round = models.ForeignKey(TrainingRound, on_delete=models.CASCADE, related_name="transitions")
    from_state = models.CharField(max_length=30, blank=True)
    to_state = models.CharField(max_length=30)
    at = models.DateTimeField(default=timezone.now)
    worker = models.CharField(max_length=200, blank=True)
    note = models.TextField(blank=True)

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"round {self.training_round_id}: {self.from_state or '-'} -> {self.to_state}"
