"""The whole loop, as in production but with tiny models: simulated labelers vote over HTTP, a
real Celery worker on Redis runs the rounds (reward model, PPO, sampling back), PostgreSQL holds
everything; the first round's policy beats the start on the labelers' hidden preference, and the
second keeps that gain."""

import contextlib
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.management import call_command
from django.utils import timezone

from annotation.importing import PairRecord
from annotation.models import Comparison
from annotation.services import agreement_refresh, pairs_import, project_get_or_create
from annotation.simulation import preference
from rounds import services
from rounds.models import TrainingRound, TrainingSettings
from tests.factories import TINY
from tests.tiny_models import banana_answer
from tests.workers import Host, Worker, celery_worker, other_host
from training import ppo

ROOT = Path(__file__).resolve().parents[2]
State = TrainingRound.State
MAX_NEW_TOKENS = 16
PPO = {"steps": 16, "learning_rate": 1e-3, "batch_size": 16, "minibatches": 4, "max_new_tokens": MAX_NEW_TOKENS,
       "temperature": 1.0, "beta": 0.01, "checkpoint_every": 4, "reward_max_length": 32}  # fmt: skip
GOLD = preference("marker:banana")


def label(live_server, slug: str, seed: int = 1) -> None:
    """Three bots label whatever is in the queue, through the HTTP API, by the hidden preference."""
    call_command("simulate_labelers", slug, "--url", live_server.url, "--labelers", "3",
                 "--preference", "marker:banana", "--noise", "0.2", "--seed", str(seed))  # fmt: skip


def wait_for(training_round: TrainingRound, states: set[str], worker: Worker, seconds: int = 400) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and worker.process.poll() is None:
        training_round.refresh_from_db()
        if training_round.state in states:
            return
        time.sleep(1)
    raise AssertionError(f"round {training_round.number} is {training_round.state}: {training_round.error}")


def mean_gold(policy: str, prompts: list[str]) -> float:
    answers = [
        answer
        for seed in range(3)
        for answer in ppo.generate(policy, prompts, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, seed=seed)
    ]
    return sum(map(GOLD, answers)) / len(answers)


LOOPS = 3  # independent two-round loops: the claims are about their pooled figures, not one lucky run


def run_rounds(
    live_server, worker: Worker, *, slug: str, seed: int, policy: str, backbone: str, algorithm: str = "ppo",
    overrides: dict | None = None, count: int = 2,
) -> list[TrainingRound]:  # fmt: skip
    """One project's rounds, each labeled by the bots through HTTP and run by the worker."""
    # 120 prompts, each with a pair of answers that mention the marker word a different number of
    # times (0 to 8), at lengths that say nothing of the count.
    project = project_get_or_create(slug=slug, overlap=2)
    rng = random.Random(seed)
    records = [
        PairRecord(line=index + 1, prompt=f"question w{index % 20} w{index // 20}",
                   response_a=banana_answer(rng, a), response_b=banana_answer(rng, b))
        for index, (a, b) in enumerate(rng.sample(range(9), 2) for _ in range(120))
    ]  # fmt: skip
    pairs_import(project=project, records=records)
    TrainingSettings.objects.create(
        project=project, min_new_comparisons=10, policy=policy, held_out_prompts=32,
        reward_overrides={"backbone": backbone, **TINY, "epochs": 4, "seed": 42 + seed}, algorithm=algorithm,
        optimizer_overrides={**(PPO if overrides is None else overrides), "seed": 42 + seed},
    )  # fmt: skip
    label(live_server, project.slug, seed=1 + seed)
    agreement_refresh(project_id=project.pk)
    for number in range(1, count + 1):
        # Beat's check starts the round once enough labels are in; the worker takes it from there.
        assert services.rounds_check()["started"], f"round {number} did not start"
        training_round = TrainingRound.objects.get(project=project, number=number)
        wait_for(training_round, {State.LABELING, State.FAILED}, worker)
        assert training_round.state == State.LABELING, training_round.error
        samples = Comparison.objects.filter(project=project, origin=Comparison.Origin.ROUND_SAMPLE, round=number)
        assert samples.count() == training_round.samples > 0
        label(live_server, project.slug, seed=1 + seed)
        agreement_refresh(project_id=project.pk)
        assert services.rounds_check()["completed"] == [training_round.pk]
        training_round.refresh_from_db()
        assert training_round.state == State.DONE and training_round.win_rate is not None
    rounds = list(TrainingRound.objects.filter(project=project).order_by("number"))
    for earlier, later in zip(rounds, rounds[1:], strict=False):
        assert later.policy is not None and later.policy.parent_id == earlier.policy_id
    assert {r.policy.algorithm for r in rounds if r.policy} == {algorithm}
    return rounds


@pytest.mark.statistical
@pytest.mark.django_db(transaction=True)
def test_two_rounds_driven_by_simulated_labelers_improve_the_policy(
    live_server, tiny_backbone, tiny_policy, tmp_path, settings, seed_offset, figures
):
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    held_out = [f"question w{i} w{j}" for i in range(20) for j in (5, 9)]
    win_rates: list[list[float]] = [[], []]
    gold_gains: list[list[float]] = [[], []]
    with celery_worker("gpu,default", ARTIFACTS_DIR=str(settings.ARTIFACTS_DIR)) as worker:
        for loop in range(LOOPS):
            seed = LOOPS * seed_offset + loop
            rounds = run_rounds(live_server, worker, slug=f"loop-{loop}", seed=seed, policy=tiny_policy,
                                backbone=tiny_backbone)  # fmt: skip
            golds = [mean_gold(policy, held_out) for policy in (tiny_policy, *(r.policy.artifact_path for r in rounds))]
            for number, training_round in enumerate(rounds):
                win_rates[number].append(training_round.win_rate)
                gold_gains[number].append(golds[number + 1] - golds[number])
    assert "round_run_task" in worker.output
    win_rate, gold_gain = ([figures(f"loop.round{n + 1}.{name}", sum(values[n]) / LOOPS) for n in (0, 1)]
                           for name, values in (("win_rate", win_rates), ("gold_gain", gold_gains)))  # fmt: skip
    # Round 1: the labelers preferred the new policy, and it beats the start on the hidden gold.
    # Seen: win rates 0.67 to 0.99, gold gains +0.24 to +3.7 (seed offsets 0-4, 1 and 2 threads).
    assert win_rate[0] > 0.5 and gold_gain[0] > 0, (win_rates, gold_gains)
    # Round 2 starts near the ceiling when round 1 landed there, so its margin over round 1 is
    # thin, and which bot labels which pair (three concurrent bots over HTTP) changes the labels
    # from run to run: at seed offset 0 three runs gave win rates 0.70, 0.81, 0.48 and gold gains
    # +1.30, +1.58, +0.18, so neither is asserted above 0.5 / 0 (both are recorded). What holds
    # with margin: round 2 keeps most of round 1's gain (the two rounds together gained +2.2 to
    # +5.1 gold, round 1 alone +1.7 to +3.5); a round 2 that trained on noise or inverted labels
    # would give back more than half of it.
    assert gold_gain[1] > -gold_gain[0] / 2, (win_rates, gold_gains)


# A round of each kind of algorithm the loop offers besides PPO: offline on the labeled pairs, and
# critic-free online against the round's reward model.
DPO = {"learning_rate": 3e-3, "epochs": 3, "batch_size": 8, "max_length": 64, "beta": 0.1,
       "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "reward_max_length": 32}  # fmt: skip
GRPO = {"steps": 16, "learning_rate": 5e-3, "batch_size": 4, "group_size": 4, "max_new_tokens": MAX_NEW_TOKENS,
        "temperature": 1.0, "beta": 0.05, "checkpoint_every": 4, "reward_max_length": 32}  # fmt: skip


@pytest.mark.statistical
@pytest.mark.django_db(transaction=True)
# One-round projects per algorithm, their figures pooled: GRPO learns less reliably from one seed
# (at seed offset 2 alone it gained +0.01 gold, win rate 0.53), so it pools two.
@pytest.mark.parametrize(("algorithm", "overrides", "seeds"), [("dpo", DPO, 1), ("grpo", GRPO, 2)])
def test_a_dpo_round_and_a_grpo_round_each_beat_their_predecessor(
    live_server, tiny_backbone, tiny_policy, tmp_path, settings, seed_offset, figures, algorithm, overrides, seeds
):
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    held_out = [f"question w{i} w{j}" for i in range(20) for j in (5, 9)]
    gains, win_rates = [], []
    with celery_worker("gpu,default", ARTIFACTS_DIR=str(settings.ARTIFACTS_DIR)) as worker:
        for run in range(seeds):
            (training_round,) = run_rounds(
                live_server, worker, slug=f"{algorithm}-{run}", seed=seeds * seed_offset + run, policy=tiny_policy,
                backbone=tiny_backbone, algorithm=algorithm, overrides=overrides, count=1,
            )  # fmt: skip
            gains.append(mean_gold(training_round.policy.artifact_path, held_out) - mean_gold(tiny_policy, held_out))
            win_rates.append(training_round.win_rate)
            metrics = training_round.policy.metrics
            assert metrics["score"] is not None and metrics["kl"] is not None, "proxy figures for the charts"
    gain = figures(f"loop.{algorithm}.gold_gain", sum(gains) / seeds)
    win_rate = figures(f"loop.{algorithm}.win_rate", sum(win_rates) / seeds)
    # Seen on seed offsets 0-4 (1 and 2 threads): dpo gold +2.91 to +3.17, win rate 0.90 to 1.00;
    # grpo (2 seeds pooled) gold +1.77 to +3.18, win rate 0.83 to 0.97. Margins: 1.77 and 0.33.
    assert gain > 0, gains
    assert win_rate > 0.5, win_rates


@pytest.fixture(params=["one host", "two hosts"])
def hosts(request) -> Iterator[tuple[Host | None, Host | None]]:
    """Where the doomed worker and its rescuer run: both here, or each on a host of its own (a
    network namespace reaching PostgreSQL and Redis over a veth link)."""
    if request.param == "one host":
        yield None, None
        return
    with contextlib.ExitStack() as stack:
        try:
            pair = stack.enter_context(other_host(1)), stack.enter_context(other_host(2))
        except OSError as error:
            pytest.skip(f"two hosts need network namespaces, which this machine forbids ({error})")
        yield pair


@pytest.mark.django_db(transaction=True)
def test_a_round_whose_worker_is_killed_mid_ppo_resumes_on_another_worker(
    live_server, tiny_backbone, tiny_policy, tmp_path, settings, hosts
):
    first_host, second_host = hosts
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    project = project_get_or_create(slug="killed", overlap=1)
    rng = random.Random(1)
    pairs_import(
        project=project,
        records=[PairRecord(line=index + 1, prompt=f"question w{index % 20} w{index // 20}",
                            response_a=banana_answer(rng, 2), response_b=banana_answer(rng, 0))
                 for index in range(70)],
    )  # fmt: skip
    TrainingSettings.objects.create(
        project=project, min_new_comparisons=10, policy=tiny_policy, held_out_prompts=8,
        reward_overrides={"backbone": tiny_backbone, **TINY},
        optimizer_overrides={**PPO, "steps": 40, "checkpoint_every": 2},
    )  # fmt: skip
    environment = {"ARTIFACTS_DIR": str(settings.ARTIFACTS_DIR)}
    with celery_worker("gpu", first_host, **environment) as doomed:
        label(live_server, project.slug)
        agreement_refresh(project_id=project.pk)
        training_round = TrainingRound.objects.get(pk=services.rounds_check()["started"][0])
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and training_round.step < 5:
            time.sleep(0.2)
            training_round.refresh_from_db()
        assert training_round.state == State.TRAINING_POLICY and training_round.step >= 5, training_round.error
        os.kill(doomed.process.pid, signal.SIGKILL)  # no clean shutdown, no chance to record anything
        doomed.process.wait()
    metrics_file = settings.ARTIFACTS_DIR / project.slug / "rounds" / "1" / "policy" / "metrics.jsonl"
    before = metrics_file.read_text().splitlines()
    training_round.refresh_from_db()
    assert (
        training_round.state == State.TRAINING_POLICY and training_round.lease_live()
    )  # stuck until the lease runs out
    TrainingRound.objects.filter(pk=training_round.pk).update(lease_expires_at=timezone.now())  # two minutes later
    with celery_worker("gpu", second_host, **environment) as rescuer:
        assert services.rounds_check()["reclaimed"] == [training_round.pk]
        wait_for(training_round, {State.LABELING, State.FAILED}, rescuer)
    assert training_round.state == State.LABELING, training_round.error
    assert training_round.attempts == 2 and training_round.lease_owner == ""
    assert "round_run_task" in rescuer.output
    after = metrics_file.read_text().splitlines()
    assert [json.loads(row)["step"] for row in after] == list(range(1, 41))  # every step exactly once
    assert after[:4] == before[:4]  # resumed from a checkpoint: the first steps, timings included, were not redone
    samples = Comparison.objects.filter(project=project, origin=Comparison.Origin.ROUND_SAMPLE)
    assert samples.count() == training_round.samples > 0
    assert samples.values("content_hash").distinct().count() == samples.count()
