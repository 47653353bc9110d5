"""AI labelers (RLAIF): an account of kind "ai" whose judge, a model reading the project's
constitution, works the queue through the same HTTP API as people: claim, then vote with an
idempotency key. Leases, overlap, idempotency and agreement hold for it unchanged; its votes carry
their judgment (judge, template and constitution versions, probabilities), and the agreement
snapshot measures it against the humans (annotation.agreement.ai_rows)."""

import hashlib
import random
import re
import secrets
from typing import TYPE_CHECKING, Any

from django.contrib.auth.models import Group, User
from django.db import transaction

if TYPE_CHECKING:
    from judging import judges

from annotation import auth, simulation
from annotation.models import AI_LABELERS_GROUP, Project
from annotation.services import InvalidInput, labeler_create

MAX_NAME_LENGTH = 150  # User.username


def ai_labeler_name(judge: str) -> str:
    """A default account name for a judge spec: `ai-` and the spec's letters, digits and dashes."""
    return ("ai-" + re.sub(r"[^A-Za-z0-9]+", "-", judge.split("#")[-1]).strip("-").lower())[:MAX_NAME_LENGTH]


def ai_labeler_create(*, name: str) -> User:
    """The AI labeler's account (created when missing): a labeler in the AI labelers group, with no
    password a person could log in with."""
    existing = User.objects.filter(username=name).first()
    if existing is not None and not existing.groups.filter(name=AI_LABELERS_GROUP).exists():
        raise InvalidInput("name", f"{name!r} is a person's account, not an AI labeler's")
    with transaction.atomic():
        user = existing or labeler_create(username=name, password=secrets.token_urlsafe(24))
        user.set_unusable_password()
        user.save(update_fields=["password"])
        user.groups.add(Group.objects.get_or_create(name=AI_LABELERS_GROUP)[0])
    return user


def constitution_version(text: str) -> str:
    """The constitution as judged: a digest of its text, stored with every AI vote."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


SCREEN = {"a": "left", "b": "right", "tie": "tie"}


def ai_decider(
    judge: "judges.Judge", project: Project, *, chain_of_thought: bool = False, seed: int = 0
) -> simulation.Decide:
    """The vote an AI labeler casts on a claim: the judge reads the pair as shown (left as A), in
    both orders, by the project's constitution (every principle, or one sampled)."""
    from judging import judges  # torch comes with the judge, never into a web process

    principles = judges.parse_constitution(project.constitution)
    if not principles:
        raise InvalidInput("constitution", f"project {project.slug!r} has none: give it principles to judge by")
    version = constitution_version(project.constitution)
    rng = random.Random(seed)

    def decide(claim: dict[str, Any]) -> dict[str, Any]:
        used = judges.choose_principles(principles, mode=project.constitution_mode, rng=rng)
        judgment = judge.judge(
            prompt=claim["prompt"], response_a=claim["left"]["text"], response_b=claim["right"]["text"],
            principles=used, guidelines=project.guidelines, chain_of_thought=chain_of_thought,
        )  # fmt: skip
        return {
            "choice": SCREEN[judgment.choice],
            "strength": judgment.strength,
            "rationale": judgment.rationale,
            "flags": judgment.flags,
            "judgment": {
                "judge": judgment.judge,
                "template_version": judgment.template_version,
                "constitution_version": version,
                # Of the left answer, as shown: the vote itself maps the screen to the pair's order.
                "probability_left": judgment.probability_a,
                "consistent": judgment.consistent,
                "parse_failed": judgment.parse_failed,
                # Of the left answer read with it shown first, then second: both orders were judged.
                "order_probabilities": list(judgment.order_probabilities),
                "principles": judgment.principles,
                "chain_of_thought": chain_of_thought,
            },
        }

    return decide


def ai_label(
    *,
    project: Project,
    judge: str,
    base_url: str,
    name: str | None = None,
    max_votes: int | None = None,
    chain_of_thought: bool = False,
    timeout: float = 60.0,
) -> simulation.Summary:
    """Run the AI labeler until the queue is empty for it or `max_votes` votes are cast. A judge
    that fails (bad key, timeout, an endpoint error) stops the run with JudgeError before that
    vote is sent, so no vote is ever half written."""
    from judging import judges

    user = ai_labeler_create(name=name or ai_labeler_name(judge))
    decide = ai_decider(judges.load_judge(judge, timeout=timeout), project, chain_of_thought=chain_of_thought)
    token = auth.token_issue(user=user).key
    return simulation.run_labelers(
        base_url=base_url, project_slug=project.slug, labelers={user.username: (token, decide)}, max_votes=max_votes
    )
