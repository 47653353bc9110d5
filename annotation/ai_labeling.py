"""AI labelers (RLAIF): an account of kind "ai" whose judge, a model reading the project's
constitution, works the queue through the same HTTP API as people: claim, then vote with an
idempotency key. Leases, overlap, idempotency and agreement hold for it unchanged; its votes carry
their judgment (judge, template and constitution versions, probabilities), and the agreement
snapshot measures it against the humans (annotation.agreement.ai_rows)."""

import hashlib
import random
import re
import secrets
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.contrib.auth.models import Group, User
from django.db import transaction
from django.db.models import F
from django.utils import timezone

if TYPE_CHECKING:
    from judging import judges

from annotation import auth, simulation
from annotation.importing import PairRecord
from annotation.models import AI_LABELERS_GROUP, AILabelingRun, Comparison, Project
from annotation.services import ImportResult, InvalidInput, labeler_create, pairs_import, vote_on
from config.celery import delay_best_effort

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
    on_vote: Callable[[], None] = lambda: None,
) -> simulation.Summary:
    """Run the AI labeler until the queue is empty for it or `max_votes` votes are cast. A judge
    that fails (bad key, timeout, an endpoint error) stops the run with JudgeError before that
    vote is sent, so no vote is ever half written."""
    from judging import judges

    user = ai_labeler_create(name=name or ai_labeler_name(judge))
    decide = ai_decider(judges.load_judge(judge, timeout=timeout), project, chain_of_thought=chain_of_thought)
    token = auth.token_issue(user=user).key
    return simulation.run_labelers(
        base_url=base_url,
        project_slug=project.slug,
        labelers={user.username: (token, decide)},
        max_votes=max_votes,
        on_vote=on_vote,
    )


def constitutional_records(
    *, policy: str, prompts: Sequence[Any], principles: Sequence["judges.Principle"], n: int = 1, seed: int = 0,
    max_new_tokens: int = 128,
) -> list[PairRecord]:  # fmt: skip
    """The supervised stage of Constitutional AI (Bai et al. 2022): the policy answers each prompt
    (`n` answers each), critiques its answer by a sampled principle, then revises it in light of
    the critique. Each (revision, original) pair is a record; a revision that changed nothing is no
    comparison and is left out."""
    from judging import judges
    from training import ppo

    rng = random.Random(seed)
    asked = [prompt for prompt in prompts for _ in range(n)]
    originals = ppo.generate(policy, asked, max_new_tokens=max_new_tokens, seed=seed)
    used = [judges.choose_principles(principles, mode="sampled", rng=rng)[0] for _ in asked]

    def ask(template: str, answers: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
        questions = [
            [{"role": "user", "content": template.format(
                conversation=judges.conversation_text(prompt), answer=answer, principle=principle.text,
                critique=extra[index] if extra else "",
            )}]
            for index, (prompt, answer, principle) in enumerate(zip(asked, answers, used, strict=True))
        ]  # fmt: skip
        return ppo.generate(policy, questions, max_new_tokens=max_new_tokens, seed=seed)

    critiques = ask(CRITIQUE, originals)
    revisions = ask(REVISION, originals, critiques)
    return [
        PairRecord(
            line=index + 1, prompt=prompt, response_a=revision, response_b=original, source_a="revision",
            source_b="original",
            meta={"principle": principle.text, "critique": critique[:MAX_META_TEXT], "revision_side": "a"},
        )
        for index, (prompt, original, critique, revision, principle) in enumerate(
            zip(asked, originals, critiques, revisions, used, strict=True)
        )
        if revision.strip() and revision.strip() != original.strip()
    ]  # fmt: skip


def constitutional_import(
    *, project: Project, records: list[PairRecord], policy: str, label_revision: bool = False
) -> ImportResult:
    """The pairs into the project's queue as comparisons of origin constitutional (once each, by
    content hash). With `label_revision`, an AI labeler of the policy's votes for each revision, as
    Constitutional AI takes the revision to be the better answer."""
    result = pairs_import(project=project, records=records, origin=Comparison.Origin.CONSTITUTIONAL)
    if label_revision:
        labeler = ai_labeler_create(name=ai_labeler_name(f"constitutional {policy}"))
        pending = (
            Comparison.objects.filter(project=project, origin=Comparison.Origin.CONSTITUTIONAL)
            .exclude(votes__labeler=labeler)
            .select_related("project")
        )
        for comparison in pending:
            principle = comparison.meta.get("principle", "")
            vote_on(
                comparison=comparison, labeler=labeler, choice="a", rationale=comparison.meta.get("critique", ""),
                judgment={"judge": f"constitutional:{policy}", "template_version": REVISION_VERSION,
                          "constitution_version": constitution_version(principle), "principles": [principle]},
            )  # fmt: skip
    return result


REVISION_VERSION = "cai-revision-v1"  # bump with CRITIQUE or REVISION
MAX_META_TEXT = 2000
CRITIQUE = (
    "{conversation}\n\nAnswer: {answer}\n\nCritique this answer by the principle: {principle}\n"
    "Say what it does wrong, briefly."
)
REVISION = (
    '{conversation}\n\nAnswer: {answer}\n\nCritique by the principle "{principle}": {critique}\n\n'
    "Rewrite the answer so that it follows the principle. Give only the new answer."
)


def ai_run_start(
    *, project: Project, judge: str, max_votes: int | None = None, chain_of_thought: bool = False
) -> AILabelingRun:
    """Queue an AI labeler for the dashboard; a worker of the `ai` queue runs it (ai_run)."""
    from annotation.tasks import ai_label_task

    if not judge.strip():
        raise InvalidInput("judge", "name a model or an openai: endpoint")
    if not project.constitution.strip():
        raise InvalidInput("constitution", f"project {project.slug!r} has none: give it principles to judge by")
    with transaction.atomic():
        run = AILabelingRun.objects.create(
            project=project, judge=judge.strip(), name=ai_labeler_name(judge.strip()), max_votes=max_votes,
            chain_of_thought=chain_of_thought,
        )  # fmt: skip
        transaction.on_commit(lambda: delay_best_effort(ai_label_task, run.pk))
    return run


def ai_run(*, run_id: int) -> None:
    """Work the queue as the run says, counting votes as they are cast; the run ends succeeded or
    failed with the judge's or the server's error."""
    claimed = AILabelingRun.objects.filter(pk=run_id, status=AILabelingRun.Status.QUEUED).update(
        status=AILabelingRun.Status.RUNNING
    )
    if not claimed:
        return  # run already, or running elsewhere
    run = AILabelingRun.objects.select_related("project").get(pk=run_id)

    def counted() -> None:
        AILabelingRun.objects.filter(pk=run_id).update(votes=F("votes") + 1)

    try:
        ai_label(
            project=run.project, judge=run.judge, base_url=settings.FLYWHEEL_API_URL, name=run.name,
            max_votes=run.max_votes, chain_of_thought=run.chain_of_thought,
            on_vote=counted,
        )  # fmt: skip
    except Exception as error:  # noqa: BLE001 - a failed run is recorded, never left running
        AILabelingRun.objects.filter(pk=run_id).update(
            status=AILabelingRun.Status.FAILED, error=f"{type(error).__name__}: {error}", finished_at=timezone.now()
        )
        return
    AILabelingRun.objects.filter(pk=run_id).update(status=AILabelingRun.Status.SUCCEEDED, finished_at=timezone.now())
