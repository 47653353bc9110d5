"""The labeling data model: projects of prompts, pairs of responses to compare, leases and votes."""

import hashlib
import json
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from annotation.importing import SOURCE_MAX_LENGTH

LABELERS_GROUP = "labelers"
ADMINS_GROUP = "admins"
# Labelers of kind "ai": a model judging by the project's constitution through the same API.
AI_LABELERS_GROUP = "ai-labelers"


def content_hash(*parts: Any) -> str:
    """A stable digest of JSON-serialisable parts, used to make imports and samples idempotent."""
    encoded = json.dumps(parts, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).hexdigest()


class Project(models.Model):
    slug = models.SlugField(unique=True)
    name = models.CharField(max_length=200)
    guidelines = models.TextField(blank=True, help_text="Markdown shown to labelers beside every pair.")
    overlap = models.PositiveSmallIntegerField(
        default=settings.FLYWHEEL_DEFAULT_OVERLAP, help_text="How many different labelers vote on each comparison."
    )
    lease_seconds = models.PositiveIntegerField(
        default=settings.FLYWHEEL_DEFAULT_LEASE_SECONDS,
        help_text="How long a claimed comparison is reserved for its labeler.",
    )
    gold_rate = models.FloatField(
        default=0.0, help_text="Share of claims that hand out a gold comparison (known answer) when one is left."
    )
    gold_min_accuracy = models.FloatField(
        null=True,
        blank=True,
        help_text="Labelers whose gold accuracy is below this are left out of aggregation and export.",
    )
    members_only = models.BooleanField(
        default=False, help_text="Only the members (and admins) see the project; otherwise every labeler does."
    )
    members = models.ManyToManyField(
        settings.AUTH_USER_MODEL, blank=True, related_name="member_projects", help_text="Read when members-only."
    )
    constitution = models.TextField(
        blank=True,
        help_text="Markdown list of the principles AI labelers judge by, one per item; tag a harm principle (harm).",
    )
    constitution_mode = models.CharField(
        max_length=10,
        choices=[("all", "All principles"), ("sampled", "One sampled principle per judgment")],
        default="all",
        help_text="Whether each AI judgment uses every principle or one sampled principle (Constitutional AI).",
    )
    ai_votes = models.CharField(
        max_length=10,
        choices=[("count", "Count like people's"), ("suggest", "Suggestions beside people's")],
        default="count",
        help_text="count: AI votes fill overlap slots and make labels; suggest: they take no slot, and "
        "aggregation and export leave them out unless asked (export source=ai or all).",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(overlap__gte=1), name="project_overlap_positive"),
            models.CheckConstraint(condition=Q(gold_rate__gte=0, gold_rate__lte=1), name="project_gold_rate_0_1"),
        ]

    def __str__(self) -> str:
        return self.slug


class Prompt(models.Model):
    """A single text, or a conversation whose last message is the user's turn to answer."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="prompts")
    text = models.TextField(blank=True)
    messages = models.JSONField(null=True, blank=True, help_text='[{"role": ..., "content": ...}, ...]')
    content_hash = models.CharField(max_length=64)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "content_hash"], name="prompt_unique_content")]
        # Export asks whether a project has any conversation; on a million prompts, only this answers fast.
        indexes = [
            models.Index(fields=["project"], condition=Q(messages__isnull=False), name="prompt_conversations"),
        ]

    def __str__(self) -> str:
        return (self.text or self.turns[-1]["content"])[:60]

    @property
    def content(self) -> str | list[dict[str, str]]:
        """The prompt as imported and exported: a string or a list of chat messages."""
        return self.messages if self.messages is not None else self.text

    @property
    def turns(self) -> list[dict[str, str]]:
        return self.messages if self.messages is not None else [{"role": "user", "content": self.text}]


class Response(models.Model):
    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="responses")
    text = models.TextField()
    source = models.CharField(max_length=SOURCE_MAX_LENGTH, blank=True, help_text="Model name, policy version or file.")

    def __str__(self) -> str:
        return f"{self.source or 'response'} #{self.pk}"


class Comparison(models.Model):
    class Origin(models.TextChoices):
        IMPORTED = "imported"
        GOLD = "gold"
        ROUND_SAMPLE = "round_sample"
        CONSTITUTIONAL = "constitutional"  # a policy's answer against its own revision by a principle

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="comparisons")
    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="comparisons")
    response_a = models.ForeignKey(Response, on_delete=models.CASCADE, related_name="+")
    response_b = models.ForeignKey(Response, on_delete=models.CASCADE, related_name="+")
    origin = models.CharField(max_length=20, choices=Origin.choices, default=Origin.IMPORTED)
    round = models.PositiveIntegerField(null=True, blank=True, help_text="The training round that produced the pair.")
    gold_choice = models.CharField(
        max_length=10, blank=True, help_text="The known answer of a gold comparison (a, b, tie, both_bad)."
    )
    meta = models.JSONField(default=dict, blank=True)
    content_hash = models.CharField(max_length=64)
    # Kept in step with the Vote rows under the comparison's row lock, so that handing out work
    # never has to count votes.
    vote_count = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "content_hash"], name="comparison_unique_content"),
        ]
        indexes = [
            models.Index(fields=["project", "-vote_count", "id"], name="comparison_queue"),
            models.Index(fields=["project", "id"], name="comparison_by_project"),  # exports walk a project in order
        ]

    def __str__(self) -> str:
        return f"comparison #{self.pk}"


class Assignment(models.Model):
    """A lease: one labeler may vote on one comparison until expires_at."""

    class Status(models.TextChoices):
        OPEN = "open"
        VOTED = "voted"
        SKIPPED = "skipped"

    comparison = models.ForeignKey(Comparison, on_delete=models.CASCADE, related_name="assignments")
    labeler = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="assignments")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.OPEN)
    left_is_a = models.BooleanField(help_text="Whether response A was shown on the left (randomized).")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["comparison", "labeler"], name="assignment_one_per_labeler"),
        ]
        indexes = [
            models.Index(fields=["comparison", "status", "expires_at"], name="assignment_live"),
            models.Index(fields=["labeler", "status"], name="assignment_by_labeler"),
            # The claim's NOT IN (annotation/sql.py CANDIDATE): what a labeler is done with, index-only.
            models.Index(
                fields=["labeler", "comparison"],
                condition=Q(status__in=["voted", "skipped"]),
                name="assignment_done_by_labeler",
            ),
        ]

    def __str__(self) -> str:
        return f"assignment #{self.pk} ({self.status})"

    def is_live(self, now: Any = None) -> bool:
        return self.status == self.Status.OPEN and self.expires_at > (now or timezone.now())

    @property
    def left(self) -> Response:
        return self.comparison.response_a if self.left_is_a else self.comparison.response_b

    @property
    def right(self) -> Response:
        return self.comparison.response_b if self.left_is_a else self.comparison.response_a


class Vote(models.Model):
    class Choice(models.TextChoices):
        A = "a", "A better"
        B = "b", "B better"
        TIE = "tie", "Tie"
        BOTH_BAD = "both_bad", "Both bad"

    class Flag(models.TextChoices):
        HARMFUL = "harmful"
        UNSURE = "unsure"

    comparison = models.ForeignKey(Comparison, on_delete=models.CASCADE, related_name="votes")
    labeler = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="votes")
    assignment = models.OneToOneField(Assignment, on_delete=models.SET_NULL, null=True, related_name="vote")
    choice = models.CharField(max_length=10, choices=Choice.choices)
    winner = models.ForeignKey(
        Response, on_delete=models.CASCADE, null=True, related_name="+", help_text="Empty for tie and both bad."
    )
    strength = models.PositiveSmallIntegerField(default=1)
    shown_left = models.ForeignKey(Response, on_delete=models.CASCADE, related_name="+")
    rationale = models.TextField(blank=True)
    flags = models.JSONField(default=list, blank=True)
    time_spent_ms = models.PositiveIntegerField()
    # NULL, not "", means "no key", so the partial unique constraint below ignores keyless votes.
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    source = models.CharField(
        max_length=5,
        choices=[("human", "Human"), ("ai", "AI")],
        default="human",
        help_text="Whose vote: the account's kind.",
    )
    judgment = models.JSONField(
        null=True,
        blank=True,
        help_text="An AI vote's judgment: judge, template_version, constitution_version, probability_a, consistent, "
        "parse_failed, principles.",
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["comparison", "labeler"], name="vote_once_per_labeler"),
            models.UniqueConstraint(
                fields=["labeler", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="vote_idempotency_key",
            ),
            models.CheckConstraint(condition=Q(strength__gte=1, strength__lte=3), name="vote_strength_1_3"),
        ]
        indexes = [models.Index(fields=["labeler", "id"], name="vote_by_labeler")]

    def __str__(self) -> str:
        return f"vote #{self.pk} ({self.choice})"


class AgreementSnapshot(models.Model):
    """Agreement figures of a project (or of one round of it) at one moment, kept for the history plot."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="agreement_snapshots")
    round = models.PositiveIntegerField(null=True, blank=True, help_text="Empty: the whole project.")
    computed_at = models.DateTimeField(default=timezone.now)
    figures = models.JSONField(help_text="Percent agreement, Fleiss' kappa, alpha, position bias, counts.")
    labelers = models.JSONField(help_text="One row per labeler: votes, agreement, gold accuracy, trust, ...")
    labeler_pairs = models.JSONField(default=list, help_text="Cohen's kappa of labeler pairs with enough shared items.")

    class Meta:
        indexes = [models.Index(fields=["project", "round", "-computed_at"], name="snapshot_latest")]

    def __str__(self) -> str:
        return f"agreement of {self.project_id} at {self.computed_at:%Y-%m-%d %H:%M}"


class AggregatedLabel(models.Model):
    """What the votes on one comparison add up to; export reads this."""

    comparison = models.OneToOneField(Comparison, on_delete=models.CASCADE, related_name="aggregate")
    votes_a = models.PositiveIntegerField(default=0)
    votes_b = models.PositiveIntegerField(default=0)
    votes_tie = models.PositiveIntegerField(default=0)
    votes_both_bad = models.PositiveIntegerField(default=0)
    mean_strength = models.FloatField(null=True)
    majority_choice = models.CharField(max_length=10, blank=True, help_text="Empty when the top is shared.")
    majority_share = models.FloatField(default=0.0)
    ds_choice = models.CharField(max_length=10, blank=True)
    ds_confidence = models.FloatField(null=True)
    adjudicated_choice = models.CharField(max_length=10, blank=True)
    adjudicated_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True)
    adjudicated_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [models.Index(fields=["majority_share"], name="aggregate_by_share")]

    def __str__(self) -> str:
        return f"aggregate of comparison #{self.comparison_id}"

    @property
    def final_choice(self) -> str:
        return self.adjudicated_choice or self.ds_choice or self.majority_choice

    @property
    def confidence(self) -> float:
        if self.adjudicated_choice:
            return 1.0
        return self.ds_confidence if self.ds_choice and self.ds_confidence is not None else self.majority_share


class AILabelingRun(models.Model):
    """An AI labeler at work, started from the dashboard and run by a worker of the `ai` queue."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="ai_runs")
    judge = models.CharField(max_length=500, help_text="The judge spec (annotation.ai_labeling.ai_label).")
    name = models.CharField(max_length=150, help_text="The AI labeler's account.")
    chain_of_thought = models.BooleanField(default=False)
    max_votes = models.PositiveIntegerField(null=True, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    votes = models.PositiveIntegerField(default=0, help_text="Cast so far.")
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name} on {self.project_id} ({self.status})"
