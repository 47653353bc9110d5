"""Training rounds: the collect-retrain-relabel loop.

A round moves through explicit states, each change recorded as a RoundTransition:

    waiting_for_labels -> training_reward_model -> training_policy -> sampling -> labeling -> done
                                (any of these may end in failed, with the error)

`round_start` opens a round; it waits until the project has `min_new_comparisons` aggregated
comparisons more than when the previous round's reward model started, then a gpu worker takes it
(`round_run`, under a lease with heartbeat, as for reward models): it trains the reward model on
all the labels, trains the next policy from the previous one with the project's algorithm (PPO, or
GRPO or RLOO against the reward model, or DPO, IPO or KTO on the pairs themselves, the reward model
then measuring the result), and has the new and the previous
policy answer the held-out prompts; those pairs go to the labelers. `rounds_check` (Celery beat)
starts rounds, re-enqueues the ones whose worker died, and closes a labeling round once all its
pairs are labeled and aggregated, with the humans' win rate of the new policy over the previous.

Held-out prompts are the project's `held_out_prompts` prompts with the smallest md5 of
"holdout:" + content hash: a fixed, deterministic set that the policy never trains on (importing new
prompts can change it for later rounds; each round stores the set it used).
"""

import dataclasses
import json
import logging
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Max, Q, Value
from django.db.models.functions import MD5, Concat
from django.utils import timezone

from annotation.importing import PairRecord
from annotation.models import AggregatedLabel, Comparison, Project, Prompt, Vote, content_hash
from annotation.selectors import latest_snapshot
from annotation.services import pairs_import
from config.celery import delay_best_effort
from rounds import launching
from rounds.leases import Heartbeat, LeaseLost, kept_alive, lease_claim, lease_retry, worker_name
from rounds.models import (
    LEASE,
    MAX_ATTEMPTS,
    OFFLINE_ALGORITHMS,
    Algorithm,
    PolicyVersion,
    RewardModel,
    RoundTransition,
    TrainingRound,
    TrainingSettings,
)
from rounds.reward_models import (
    TrainingBusy,
    data_shortfall,
    failed,
    resolved_config,
    reward_model_create,
    reward_model_train,
    succeeded,
)
from training.hacking import hacking_reason

State = TrainingRound.State
logger = logging.getLogger(__name__)
# Fields of the algorithm's config a round sets itself; the project's overrides may not change them.
ROUND_OWNED_FIELDS = {"policy", "reward_model", "reference"}


class RoundBusy(Exception):
    """The project already has a round that is not done or failed."""


class RoundFailed(Exception):
    pass


def training_settings(project: Project) -> TrainingSettings:
    return TrainingSettings.objects.get_or_create(project=project)[0]


def aggregated_count(project: Project) -> int:
    """Comparisons of the project that have an aggregated label (gold ones excluded)."""
    return (
        AggregatedLabel.objects.filter(comparison__project=project)
        .exclude(comparison__origin=Comparison.Origin.GOLD)
        .count()
    )


def new_aggregated_count(project: Project) -> int:
    """Aggregated comparisons since the reward model of the last round that did not fail started
    (all of them before the first): a failed round leaves its labels to the next."""
    last = (
        TrainingRound.objects.filter(project=project, aggregated_at_start__isnull=False)
        .exclude(state=State.FAILED)
        .order_by("-number")
        .values_list("aggregated_at_start", flat=True)
        .first()
    )
    return aggregated_count(project) - (last or 0)


def _transition(
    training_round: TrainingRound, to: str, *, worker: str = "", note: str = "", owned: bool = True, **fields: Any
) -> None:
    """Move the round from its current state to `to`, recording it. With `owned`, only while
    `worker` holds the lease (LeaseLost otherwise); without, only if nobody moved it meanwhile."""
    now = timezone.now()
    rows = TrainingRound.objects.filter(pk=training_round.pk, state=training_round.state)
    if owned:
        rows = rows.filter(lease_owner=worker)
    with transaction.atomic():
        if not rows.update(state=to, state_since=now, **fields):
            raise LeaseLost(f"round {training_round.pk} is no longer {training_round.state} under {worker or 'nobody'}")
        RoundTransition.objects.create(
            training_round=training_round, from_state=training_round.state, to_state=to, at=now, worker=worker,
            note=note,
        )  # fmt: skip
    training_round.state = to
    for name, value in fields.items():
        setattr(training_round, name, value)


def _enqueue(training_round: TrainingRound) -> None:
    from rounds.tasks import round_run_task

    transaction.on_commit(lambda: delay_best_effort(round_run_task, training_round.pk))


def round_shortfall(project: Project, *, new: int | None = None) -> str | None:
    """What a round of the project waits for, or None when it can train: enough new aggregated
    comparisons (the trigger; `new` when the caller counted them), and labeled pairs enough for its
    reward model."""
    settings_row = training_settings(project)
    needed = settings_row.min_new_comparisons
    new = new_aggregated_count(project) if new is None else new
    missing = [f"{new} of {needed} new aggregated comparisons"] if new < needed else []
    try:
        shortfall = data_shortfall(project, resolved_config(settings_row.reward_overrides))
    except ValueError as error:  # a typo in the settings: the round waits until it is fixed
        shortfall = f"the training settings: {error}"
    return "; ".join(missing + ([shortfall] if shortfall else [])) or None


def promote_if_ready(training_round: TrainingRound, *, worker: str) -> bool:
    """waiting_for_labels -> training_reward_model once the project has enough new labels."""
    project = training_round.project
    new = new_aggregated_count(project)
    if round_shortfall(project, new=new) is not None:
        return False
    needed = training_settings(project).min_new_comparisons
    try:
        with transaction.atomic():
            _transition(
                training_round, State.TRAINING_REWARD_MODEL, worker=worker, owned=False,
                note=f"{new} new aggregated comparisons (at least {needed} needed)",
                aggregated_at_start=aggregated_count(project),
            )  # fmt: skip
            _enqueue(training_round)
    except LeaseLost:  # the start button and beat promoted it at once: the other one did
        return False
    return True


def round_start(*, project: Project) -> TrainingRound:
    """Open the project's next round: it trains as soon as enough new labels exist (at once if they do)."""
    worker = worker_name()
    try:
        with transaction.atomic():
            Project.objects.select_for_update().get(pk=project.pk)
            number = (TrainingRound.objects.filter(project=project).aggregate(Max("number"))["number__max"] or 0) + 1
            training_round = TrainingRound.objects.create(project=project, number=number)
            RoundTransition.objects.create(
                training_round=training_round, to_state=State.WAITING_FOR_LABELS, worker=worker, note="round opened"
            )
    except IntegrityError:
        raise RoundBusy(f"project {project.slug!r} already has a round in progress") from None
    promote_if_ready(training_round, worker=worker)
    return training_round


def _policy_zero(project: Project) -> PolicyVersion:
    """The starting policy, recorded as version 0 so that round 1 has a predecessor."""
    name = training_settings(project).starting_policy
    return PolicyVersion.objects.get_or_create(
        project=project, version=0, defaults={"artifact_path": name, "config": {"policy": name}}
    )[0]


def _latest_policy(project: Project) -> PolicyVersion:
    return PolicyVersion.objects.filter(project=project).order_by("-version").first() or _policy_zero(project)


def held_out_prompts(project: Project, count: int) -> list[int]:
    return list(
        Prompt.objects.filter(project=project)
        .annotate(key=MD5(Concat(Value("holdout:"), "content_hash")))
        .order_by("key", "id")
        .values_list("id", flat=True)[:count]
    )


def _round_dir(training_round: TrainingRound) -> Path:
    return Path(settings.ARTIFACTS_DIR) / training_round.project.slug / "rounds" / str(training_round.number)


class _RewardModelHeartbeat(Heartbeat):
    """The round's lease, renewed as its reward model trains; the steps are the version's progress
    (for the reward models' table), the round's own progress counts PPO steps."""

    def __init__(self, training_round: TrainingRound, worker: str, model: RewardModel) -> None:
        super().__init__(training_round, worker)
        self.reward_model_id = model.pk

    def renew(self, **fields: Any) -> None:
        super().renew()
        RewardModel.objects.filter(pk=self.reward_model_id).update(**fields)


def _train_reward_model(training_round: TrainingRound, worker: str) -> None:
    """The round trains its own version, here in its own task and under its own lease: the gpu
    worker is busy with the round anyway, and PPO must wait for the model. No task of the version's
    own is queued and beat's reclaim leaves it alone, so the worker that takes a round over resumes
    its reward model too, from the version's checkpoint."""
    optimizer_overrides(training_round.project)
    model = training_round.reward_model
    if model is None:
        overrides = training_settings(training_round.project).reward_overrides
        try:
            with transaction.atomic():
                model = reward_model_create(project=training_round.project, overrides=overrides)
                if not TrainingRound.objects.filter(pk=training_round.pk, lease_owner=worker).update(
                    reward_model=model
                ):
                    raise LeaseLost(f"{worker} lost the lease on round {training_round.pk}")
        except TrainingBusy as error:
            raise RoundFailed(f"{error}; the round needs its own") from None
        training_round.reward_model = model
    summary = model.metrics
    if model.status != RewardModel.Status.SUCCEEDED:
        started = model.started_at or timezone.now()
        RewardModel.objects.filter(pk=model.pk).update(
            status=RewardModel.Status.RUNNING, attempts=model.attempts + 1, started_at=started
        )
        try:
            summary = reward_model_train(model, progress=_RewardModelHeartbeat(training_round, worker, model))
        except LeaseLost:
            raise
        except Exception as error:
            raise RoundFailed(f"reward model v{model.version} failed: {type(error).__name__}: {error}") from error
    # The version succeeds with the round's move on, both under the round's lease.
    with transaction.atomic():
        RewardModel.objects.filter(pk=model.pk, status=RewardModel.Status.RUNNING).update(**succeeded(model, summary))
        _transition(
            training_round, State.TRAINING_POLICY, worker=worker,
            note=f"reward model v{model.version}: held-out accuracy {summary.get('accuracy')}",
        )  # fmt: skip
    model.refresh_from_db()


def _write_prompts(path: Path, prompts: Iterator[Prompt]) -> None:
    partial = path.with_suffix(".partial")
    with partial.open("w") as handle:
        for prompt in prompts:
            handle.write(json.dumps({"prompt": prompt.content}, ensure_ascii=False) + "\n")
    partial.replace(path)


# What an offline round samples with: the previous and the new policy answer the held-out prompts
# (and the proxy measurement's prompts) with these, the project's overrides changing them.
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "max_prompt_length", "reward_max_length")
PROXY_EPISODES = 32  # answers an offline round's proxy reward is measured on, for each policy


def _config_class(algorithm: str) -> type:
    from training import dpo, grpo, ppo

    if algorithm == Algorithm.PPO:
        return ppo.PPOConfig
    return dpo.DPOConfig if algorithm in OFFLINE_ALGORITHMS else grpo.GRPOConfig


def optimizer_overrides(project: Project) -> dict[str, Any]:
    """The project's settings of its algorithm, checked before any training: a typo, or a setting
    the algorithm does not have, fails the round at once."""
    settings_row = training_settings(project)
    # Flat fields apply to every algorithm; a key named after one ({"ppo": {...}}) holds its own.
    raw = settings_row.optimizer_overrides
    section = raw.get(settings_row.algorithm, {})
    if not isinstance(section, dict):
        raise ValueError(f"the {settings_row.algorithm!r} section of the training settings must be an object")
    overrides = {name: value for name, value in raw.items() if name not in Algorithm.values} | section
    known = {field.name for field in dataclasses.fields(_config_class(settings_row.algorithm))} - ROUND_OWNED_FIELDS
    if settings_row.algorithm in OFFLINE_ALGORITHMS:
        known |= set(SAMPLING_FIELDS)
    unknown = sorted(set(overrides) - known)
    if unknown:
        name = settings_row.get_algorithm_display()
        raise ValueError(f"unknown {name} setting {unknown[0]!r} in the project's training settings")
    return dict(overrides)


def optimizer_config(training_round: TrainingRound, previous: PolicyVersion) -> Any:
    """The config the round trains with: the algorithm's, from the previous policy, against this
    round's reward model, with the first policy as the KL reference."""
    from training import ppo

    project = training_round.project
    algorithm = training_settings(project).algorithm
    overrides = optimizer_overrides(project)
    if algorithm in OFFLINE_ALGORITHMS:
        offline = {name: value for name, value in overrides.items() if name not in SAMPLING_FIELDS}
        # DPO's reference is its starting policy: each round pulls toward the previous one.
        return _config_class(algorithm)(**offline, loss=algorithm, policy=previous.artifact_path)
    assert training_round.reward_model is not None
    online = {"estimator": algorithm} if algorithm != Algorithm.PPO else {}
    config = _config_class(algorithm)(
        **overrides, **online, policy=previous.artifact_path, reward_model=training_round.reward_model.artifact_path,
        reference=_policy_zero(project).artifact_path,
    )  # fmt: skip
    assert isinstance(config, ppo.OnlineConfig)
    return config


def _sampling(project: Project, config: Any) -> dict[str, Any]:
    """How the round's policies answer: an online run's own sampling, or for an offline one the
    online defaults with the project's overrides."""
    from training import ppo

    if isinstance(config, ppo.OnlineConfig):
        return {name: getattr(config, name) for name in SAMPLING_FIELDS}
    defaults = ppo.OnlineConfig()
    overrides = optimizer_overrides(project)
    return {name: overrides.get(name, getattr(defaults, name)) for name in SAMPLING_FIELDS}


def _round_prompts(training_round: TrainingRound, directory: Path) -> Path:
    """The prompts the policy trains on, all but the held-out ones; written once, so that a
    taken-over round trains on the same prompts."""
    project = training_round.project
    prompts_file = directory / "prompts.jsonl"
    if not prompts_file.exists():
        held_out = held_out_prompts(project, training_settings(project).held_out_prompts)
        TrainingRound.objects.filter(pk=training_round.pk).update(held_out_prompt_ids=held_out)
        training_round.held_out_prompt_ids = held_out
        _write_prompts(prompts_file, Prompt.objects.filter(project=project).exclude(pk__in=held_out).iterator())
    return prompts_file


def _round_preferences(training_round: TrainingRound, directory: Path) -> Path:
    """An offline round's data: the project's aggregated pairs (the reward model's, in the export
    format) less those on held-out prompts, which the policy must not have seen."""
    assert training_round.reward_model is not None
    preferences_file = directory / "preferences.jsonl"
    if not preferences_file.exists():
        held_out = set(
            Comparison.objects.filter(prompt_id__in=training_round.held_out_prompt_ids).values_list("pk", flat=True)
        )
        source = Path(training_round.reward_model.data["file"])
        partial = preferences_file.with_suffix(".partial")
        with source.open() as rows, partial.open("w") as handle:
            for row in rows:
                if row.strip() and json.loads(row)["comparison_id"] not in held_out:
                    handle.write(row)
        partial.replace(preferences_file)
    return preferences_file


def _train_offline(
    training_round: TrainingRound, config: Any, previous: PolicyVersion, prompts: Sequence[Any], directory: Path,
    out: Path, lease: Heartbeat, stop_after: int | None,
) -> dict[str, Any]:  # fmt: skip
    """DPO, IPO or KTO on the pairs, then the proxy figures of the previous and the new policy under
    this round's reward model: the baseline is what PPO's first step would have measured."""
    from training import dpo, evaluation, ppo

    data = _round_preferences(training_round, directory)
    summary = launching.train(
        "dpo", config, ["--data", str(data)], out, progress=lease, stop_after=stop_after,
        in_process=lambda: dpo.train(config, dpo.load_preferences(data), out, progress=lease, stop_after=stop_after),
    )  # fmt: skip
    if "stopped_at" in summary:
        return summary
    assert training_round.reward_model is not None
    sampling = _sampling(training_round.project, config)
    measure = lambda policy: evaluation.proxy_figures(  # noqa: E731
        ppo.OnlineConfig(**sampling, policy=policy, reward_model=training_round.reward_model.artifact_path,
                         reference=_policy_zero(training_round.project).artifact_path, seed=training_round.number),
        prompts, episodes=PROXY_EPISODES,
    )  # fmt: skip
    baseline, after = measure(previous.artifact_path), measure(str(out))
    return {
        **summary, "training_kl": summary["kl"], "score": after["objective/score"], "kl": after["objective/kl"],
        "response_length": after["policy/response_length"], "baseline": baseline,
    }  # fmt: skip


def _train_policy(training_round: TrainingRound, worker: str, lease: Heartbeat, stop_after: int | None) -> bool:
    """The round's algorithm from the previous policy; False when stopped early (`stop_after`), the
    checkpoint kept."""
    from training import grpo, ppo

    project = training_round.project
    algorithm = training_settings(project).algorithm
    previous = _latest_policy(project)
    config = optimizer_config(training_round, previous)
    directory = _round_dir(training_round)
    directory.mkdir(parents=True, exist_ok=True)
    prompts_file = _round_prompts(training_round, directory)
    prompts = ppo.load_prompts(prompts_file)
    out = directory / "policy"
    if algorithm in OFFLINE_ALGORITHMS:
        summary = _train_offline(training_round, config, previous, prompts, directory, out, lease, stop_after)
    else:
        trainer = ppo if algorithm == Algorithm.PPO else grpo
        summary = launching.train(
            trainer.__name__.removeprefix("training."), config, ["--prompts", str(prompts_file)], out,
            progress=lease, stop_after=stop_after,
            in_process=lambda: trainer.train(config, prompts, out, progress=lease, stop_after=stop_after),
        )  # fmt: skip
    if "stopped_at" in summary:
        return False
    with transaction.atomic():
        Project.objects.select_for_update().get(pk=project.pk)
        version = PolicyVersion.objects.filter(project=project).aggregate(Max("version"))["version__max"] + 1
        policy = PolicyVersion.objects.create(
            project=project, version=version, parent=previous, round=training_round, algorithm=algorithm,
            config={**dataclasses.asdict(config), "sampling": _sampling(project, config)},
            metrics={**summary, "metrics_file": str(out / "metrics.jsonl")}, artifact_path=str(out),
        )  # fmt: skip
        _transition(
            training_round, State.SAMPLING, worker=worker, policy=policy,
            note=f"policy v{version} ({algorithm}): score {summary['score']:.3f}, KL {summary['kl']:.3f}",
        )  # fmt: skip
    return True


def sample_records(
    training_round: TrainingRound, prompts: Sequence[Prompt], new_answers: Sequence[str], old_answers: Sequence[str]
) -> list[PairRecord]:
    """New vs previous answer per prompt, sides drawn from the pair's hash (random, yet the same on a
    redelivery); identical answers are no comparison and are left out."""
    assert training_round.policy is not None and training_round.policy.parent is not None
    new, old = training_round.policy, training_round.policy.parent
    records = []
    for index, (prompt, new_answer, old_answer) in enumerate(zip(prompts, new_answers, old_answers, strict=True)):
        if new_answer == old_answer:
            continue
        new_side = "a" if int(content_hash(prompt.content, new_answer, old_answer)[:8], 16) % 2 else "b"
        old_side = "b" if new_side == "a" else "a"
        texts = {new_side: new_answer, old_side: old_answer}
        sources = {new_side: f"policy v{new.version}", old_side: f"policy v{old.version}"}
        records.append(
            PairRecord(
                line=index, prompt=prompt.content, response_a=texts["a"], response_b=texts["b"],
                source_a=sources["a"], source_b=sources["b"],
                meta={"round": training_round.number, "new_side": new_side, "new_policy": new.version,
                      "previous_policy": old.version},
            )
        )  # fmt: skip
    return records


def samples_insert(*, training_round: TrainingRound, records: Sequence[PairRecord]) -> int:
    """Add the round's pairs to the labeling queue as round samples; pairs already there (by content
    hash) are left alone, so inserting twice adds nothing. Returns how many were new."""
    imported = pairs_import(project=training_round.project, records=list(records), round_number=training_round.number)
    return imported.created


def _sample(training_round: TrainingRound, worker: str) -> None:
    """Both policies answer the held-out prompts (kept_alive holds the lease meanwhile)."""
    from training import ppo

    assert training_round.policy is not None and training_round.policy.parent is not None
    by_id = Prompt.objects.in_bulk(training_round.held_out_prompt_ids)
    prompts = [by_id[pk] for pk in training_round.held_out_prompt_ids if pk in by_id]
    sampling = training_round.policy.config["sampling"]  # both policies answer as the round sampled
    answers = {
        key: ppo.generate(
            policy.artifact_path,
            [prompt.content for prompt in prompts],
            max_new_tokens=sampling["max_new_tokens"],
            temperature=sampling["temperature"],
            top_p=sampling["top_p"],
            seed=training_round.number,
            max_prompt_length=sampling["max_prompt_length"],
        )  # fmt: skip
        for key, policy in (("new", training_round.policy), ("old", training_round.policy.parent))
    }
    records = sample_records(training_round, prompts, answers["new"], answers["old"])
    # The pairs and the move to labeling commit together: a worker that dies before adds nothing,
    # and a redelivered task finds the round labeling and samples nothing again.
    with transaction.atomic():
        added = samples_insert(training_round=training_round, records=records)
        _transition(
            training_round, State.LABELING, worker=worker, samples=added, lease_owner="", lease_expires_at=None,
            note=f"{added} pairs to label ({len(prompts) - len(records)} prompts answered identically)",
        )  # fmt: skip


def round_claim(*, round_id: int, worker: str) -> TrainingRound | None:
    """Take the round's lease when it is in a worker state and nobody holds a live lease."""
    claimable = TrainingRound.objects.filter(pk=round_id, state__in=TrainingRound.WORKER_STATES).filter(
        Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=timezone.now())
    )
    return lease_claim(claimable.select_related("project", "reward_model", "policy__parent"), worker=worker)


def round_run(*, round_id: int, worker: str | None = None, stop_after: int | None = None) -> None:
    """Drive a round from where it stands to labeling (or failed). `stop_after` ends PPO after that
    many steps with the lease still held, as a killed worker would; the lease then runs out and
    another worker resumes from the checkpoint."""
    worker = worker or worker_name()
    training_round = round_claim(round_id=round_id, worker=worker)
    if training_round is None:
        return
    lease = Heartbeat(training_round, worker)
    try:
        with kept_alive(lease):
            if training_round.state == State.TRAINING_REWARD_MODEL:
                _train_reward_model(training_round, worker)
            if training_round.state == State.TRAINING_POLICY and not _train_policy(
                training_round, worker, lease, stop_after
            ):
                return
            if training_round.state == State.SAMPLING:
                _sample(training_round, worker)
    except LeaseLost:
        return
    except launching.ChildKilled as error:  # the next attempt resumes from the checkpoint, as after a killed worker
        if lease_retry(training_round, worker=worker, error=error):
            from rounds.tasks import round_run_task

            delay_best_effort(round_run_task, training_round.pk)
        else:
            message = f"killed on each of {training_round.attempts} attempts: {error}"
            _fail_on(training_round, worker, RoundFailed(message))
    except Exception as error:  # noqa: BLE001 - a failed round is recorded, never left running
        _fail_on(training_round, worker, error)


def _fail_on(training_round: TrainingRound, worker: str, error: Exception) -> None:
    """Fail the round on the error being handled, its traceback kept."""
    message = f"{type(error).__name__}: {error}"
    training_round.refresh_from_db(fields=["state"])
    try:
        _fail(training_round, worker=worker, note=message, error=f"{message}\n\n{traceback.format_exc()[-4000:]}")
    except LeaseLost:
        return


def win_rate(training_round: TrainingRound) -> tuple[float | None, int]:
    """The humans' verdict on the round's pairs: the new policy's share of wins, a tie or "both bad"
    (or a split vote) counting half; and how many pairs it rests on."""
    labels = AggregatedLabel.objects.filter(
        comparison__project_id=training_round.project_id,
        comparison__origin=Comparison.Origin.ROUND_SAMPLE,
        comparison__round=training_round.number,
    ).select_related("comparison")
    points = []
    for label in labels:
        new_side = label.comparison.meta.get("new_side")
        old_side = {"a": "b", "b": "a"}.get(new_side)
        points.append(1.0 if label.final_choice == new_side else 0.0 if label.final_choice == old_side else 0.5)
    return (sum(points) / len(points) if points else None), len(points)


def _labeled_and_aggregated(training_round: TrainingRound) -> bool:
    """Every pair of the round has all its votes, and agreement was recomputed after the last one."""
    pairs = Comparison.objects.filter(
        project_id=training_round.project_id, origin=Comparison.Origin.ROUND_SAMPLE, round=training_round.number
    )
    if pairs.filter(Q(vote_count__lt=training_round.project.overlap) | Q(aggregate__isnull=True)).exists():
        return False
    last_vote = Vote.objects.filter(comparison__in=pairs).aggregate(Max("created_at"))["created_at__max"]
    snapshot = latest_snapshot(project=training_round.project)
    return last_vote is None or (snapshot is not None and snapshot.computed_at >= last_vote)


def round_complete(*, training_round: TrainingRound) -> bool:
    """labeling -> done once every pair is labeled and aggregated: stores the win rate and the
    reward-hacking flag."""
    if training_round.state != State.LABELING or not _labeled_and_aggregated(training_round):
        return False
    rate, pairs = win_rate(training_round)
    policy = training_round.policy
    assert policy is not None
    # The baseline is the previous policy, sampled as the round samples and scored by this round's
    # reward model: an online run's first step, or what an offline round measured. Another round's
    # scores come from another reward model, whose offset and scale are its own.
    first = policy.metrics.get("baseline") or next(iter(policy.step_metrics()), {})
    reason = ""
    if first.get("objective/score") is not None and first.get("policy/response_length") is not None:
        reason = hacking_reason(
            score=policy.metrics["score"], previous_score=first["objective/score"], win_rate=rate,
            length=policy.metrics["response_length"], previous_length=first["policy/response_length"],
            length_factor=training_settings(training_round.project).hacking_length_factor,
        )  # fmt: skip
    try:
        _transition(
            training_round, State.DONE, worker=worker_name(), owned=False, win_rate=rate, flagged=bool(reason),
            flag_reason=reason, finished_at=timezone.now(),
            note=f"human win rate {'–' if rate is None else f'{rate:.3f}'} over {pairs} pairs",
        )  # fmt: skip
    except LeaseLost:  # another check finished it first
        return False
    return True


def rounds_check() -> dict[str, list[int]]:
    """Beat, every few minutes: start rounds where labels suffice (unless the last one failed),
    close labeled ones, re-enqueue worker rounds that nobody holds (a worker died, or the task
    message was lost), and fail a round whose workers died MAX_ATTEMPTS times. One project's
    trouble is logged and does not stop the others."""
    done: dict[str, list[int]] = {"started": [], "promoted": [], "completed": [], "reclaimed": [], "failed": []}
    worker = worker_name()
    active = {
        training_round.project_id: training_round
        for training_round in TrainingRound.objects.exclude(state__in=TrainingRound.TERMINAL_STATES).select_related(
            "project", "policy__parent"
        )
    }
    for project in Project.objects.all():
        try:
            _check_project(project, active.get(project.pk), worker, done)
        except Exception:  # noqa: BLE001 - logged; the next check tries again
            logger.exception("rounds check failed for project %s", project.slug)
    return done


def _check_project(
    project: Project, training_round: TrainingRound | None, worker: str, done: dict[str, list[int]]
) -> None:
    if training_round is None:
        # After a failure an admin starts the next round, once the cause is fixed: no retry loop.
        latest = TrainingRound.objects.filter(project=project).order_by("-number").values_list("state").first()
        enough = new_aggregated_count(project) >= training_settings(project).min_new_comparisons
        if latest != (State.FAILED,) and enough:
            try:
                done["started"].append(round_start(project=project).pk)
            except RoundBusy:
                pass
    elif training_round.state == State.WAITING_FOR_LABELS:
        if promote_if_ready(training_round, worker=worker):
            done["promoted"].append(training_round.pk)
    elif training_round.state == State.LABELING:
        if round_complete(training_round=training_round):
            done["completed"].append(training_round.pk)
    elif _abandoned_by_workers(training_round):
        # A process that dies (out of memory, a CUDA fault) never reaches its own error handling.
        if training_round.attempts >= MAX_ATTEMPTS:
            round_abandon(training_round=training_round, note=f"{training_round.attempts} workers died on it")
            done["failed"].append(training_round.pk)
        else:
            _enqueue(training_round)
            done["reclaimed"].append(training_round.pk)


def _abandoned_by_workers(training_round: TrainingRound) -> bool:
    """In a worker state with nobody on it: the lease ran out, or no worker claimed the round for
    a whole lease period (its task message was lost)."""
    if training_round.lease_expires_at is not None:
        return not training_round.lease_live()
    return training_round.state_since < timezone.now() - LEASE


def round_abandon(*, training_round: TrainingRound, note: str, worker: str = "") -> None:
    """Fail a round that is not over, whatever its state: an admin giving up on pairs nobody will
    label, or beat giving up on a round that kills its workers. A worker still on it loses its
    lease and stops at its next heartbeat."""
    if training_round.state in TrainingRound.TERMINAL_STATES:
        raise RoundBusy(f"round {training_round.number} is already {training_round.state}")
    _fail(training_round, worker=worker, owned=False, note=note, error=note)


def _fail(training_round: TrainingRound, *, worker: str, note: str, error: str, owned: bool = True) -> None:
    """Move the round to failed, and its reward model with it if that never finished: nobody else
    trains a round's version, and one left running would keep the project from training another."""
    with transaction.atomic():
        _transition(
            training_round, State.FAILED, worker=worker, owned=owned, note=note[:500], error=error,
            finished_at=timezone.now(), lease_owner="", lease_expires_at=None,
        )  # fmt: skip
        RewardModel.objects.filter(
            pk__in=TrainingRound.objects.filter(pk=training_round.pk).values("reward_model"),
            status__in=[RewardModel.Status.QUEUED, RewardModel.Status.RUNNING],
        ).update(**failed(f"round {training_round.number} failed: {error}"))


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where a round stands, for its pages and `run_round`: the phase, its steps when it counts
    them, and the time left at the pace since the phase began."""

    phase: str
    detail: str = ""
    step: int = 0
    total: int = 0
    left: str = ""  # "about 3 min left"

    def line(self) -> str:
        steps = f" {self.step}/{self.total}" if self.total else ""
        return ", ".join(part for part in (f"{self.phase}{steps}", self.detail, self.left) if part)


def round_progress(training_round: TrainingRound, state: str | None = None) -> Progress | None:
    """None once the round is over. `state`, one the round has left, gives that phase's last
    figures: a training phase's final step count (the heartbeat always stores the last step)."""
    from training.cli import time_left

    state = state or training_round.state
    elapsed = lambda: (timezone.now() - training_round.state_since).total_seconds()  # noqa: E731
    if state == State.WAITING_FOR_LABELS:
        return Progress("waiting for labels", round_shortfall(training_round.project) or "enough: training starts")
    if state == State.TRAINING_REWARD_MODEL:
        model = training_round.reward_model  # refresh_from_db drops it: read afresh after one
        if model is None or not model.total_steps:
            return Progress("reward model", "loading the labels and the backbone")
        return Progress(
            f"reward model v{model.version}", "", model.step, model.total_steps,
            time_left(elapsed(), model.step, model.total_steps),
        )  # fmt: skip
    if state == State.TRAINING_POLICY:
        name = training_settings(training_round.project).get_algorithm_display()
        if not training_round.total_steps:
            return Progress(name, "loading the models")
        return Progress(
            f"{name} steps", "", training_round.step, training_round.total_steps,
            time_left(elapsed(), training_round.step, training_round.total_steps),
        )  # fmt: skip
    if state == State.SAMPLING:
        count = len(training_round.held_out_prompt_ids)
        return Progress("sampling", f"both policies answer {count} held-out prompts")
    if state == State.LABELING:
        _, aggregated = win_rate(training_round)
        return Progress("labeling", f"{aggregated} of {training_round.samples} pairs labeled and aggregated")
    return None


def round_after_refresh(*, project_id: int, **_: Any) -> None:
    """After an agreement refresh (the annotation.services.agreement_refreshed signal), without
    waiting for beat's next check: the project's waiting round trains once its labels suffice, and
    its labeling round is done once its last pair is aggregated."""
    training_round = (
        TrainingRound.objects.filter(project_id=project_id, state__in=[State.WAITING_FOR_LABELS, State.LABELING])
        .select_related("project", "policy__parent")
        .first()
    )
    if training_round is None:
        return
    if training_round.state == State.WAITING_FOR_LABELS:
        promote_if_ready(training_round, worker=worker_name())
    else:
        round_complete(training_round=training_round)
