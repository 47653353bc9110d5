"""Simulated labelers: the hidden preferences and noisy judge in process, the bots through real HTTP."""

import random
import socket

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from django.db.models import Count

from annotation import agreement, simulation
from annotation.importing import PairRecord
from annotation.models import Comparison, Vote
from annotation.services import pairs_import, project_get_or_create

MARKER = "marker:banana"


def marker_records(count: int) -> list[PairRecord]:
    """Typical marker pairs: response A holds the marker once, response B not at all."""
    return [
        PairRecord(
            line=index + 1,
            prompt=f"Question {index}: what goes well with breakfast?",
            response_a=f"Answer {index}: a banana and some oats.",
            response_b=f"Answer {index}: toast with butter, eggs and a cup of coffee.",
        )
        for index in range(count)
    ]


def marker_project(*, slug: str, pairs: int, overlap: int):
    project = project_get_or_create(slug=slug, overlap=overlap)
    pairs_import(project=project, records=marker_records(pairs))
    return project


def simulate(live_server, slug: str, *flags: str) -> str:
    from io import StringIO

    out = StringIO()
    call_command("simulate_labelers", slug, "--url", live_server.url, *flags, stdout=out)
    return out.getvalue()


# --- In process: preferences, the judge, and the noise that gives InstructGPT's agreement -----


def test_preferences_score_texts_by_name():
    assert simulation.preference("marker:banana")("Banana split with a banana") == 2
    assert simulation.preference("marker:banana")("an apple") == 0
    assert simulation.preference("length")("x" * 250) == 2.5
    assert simulation.preference("shorter")("x" * 250) == -2.5


@pytest.mark.parametrize(
    "spec, message",
    [("sweetness", "unknown preference"), ("marker", "marker:WORD"), ("marker: ", "marker:WORD"),
     ("length:10", "takes no argument")],
)  # fmt: skip
def test_bad_preference_names_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        simulation.preference(spec)


def test_noise_zero_is_deterministic_with_ties_on_equal_scores():
    score, rng = simulation.preference(MARKER), random.Random(0)
    assert simulation.judge(score, "banana", "apple", noise=0, rng=rng) == simulation.Verdict("left", 2)
    assert simulation.judge(score, "apple", "banana banana banana", noise=0, rng=rng) == simulation.Verdict("right", 3)
    assert simulation.judge(score, "apple", "pear", noise=0, rng=rng) == simulation.Verdict("tie", 1)
    assert simulation.judge(simulation.preference("length"), "ab", "a", noise=0, rng=rng).strength == 1


def marker_votes(*, noise: float, pairs: int, labelers: int, seed: int = 0) -> agreement.Votes:
    """Every labeler judges every typical marker pair, sides shuffled as the API shows them.
    Choice index 0 ("a") is the marker answer."""
    rng = random.Random(seed)
    score = simulation.preference(MARKER)
    items, who, choices = [], [], []
    for item in range(pairs):
        for labeler in range(labelers):
            marker_left = rng.random() < 0.5
            texts = ("a banana", "an apple") if marker_left else ("an apple", "a banana")
            verdict = simulation.judge(score, *texts, noise=noise, rng=rng)
            items.append(item)
            who.append(labeler)
            choices.append(0 if (verdict.choice == "left") == marker_left else 1)
    n = len(items)
    return agreement.Votes(
        item=np.array(items), labeler=np.array(who), choice=np.array(choices), signed=np.zeros(n, dtype=np.int64),
        left_won=np.zeros(n, dtype=bool), has_winner=np.ones(n, dtype=bool), seconds=np.zeros(n),
        gold_correct=np.full(n, -1, dtype=np.int8),
    )  # fmt: skip


@pytest.mark.statistical
def test_agreement_noise_gives_instructgpt_agreement_on_marker_pairs(seed_offset, figures):
    votes = marker_votes(noise=simulation.AGREEMENT_NOISE, pairs=2000, labelers=5, seed=seed_offset)
    agreed = figures("simulation.percent_agreement", agreement.project_figures(votes)["percent_agreement"])
    # InstructGPT: 72.6 ± 1.5% between training labelers; the closed form for T = 0.6 is 73.3%.
    # 20,000 pair judgments: the sampling error is about 0.3 points. Seen 0.727 to 0.741
    # on seed offsets 0-4 (low noise 0.986 to 0.990, high noise 0.491 to 0.508).
    assert agreed == pytest.approx(0.73, abs=0.02)
    p = simulation.sigmoid(1 / simulation.AGREEMENT_NOISE)
    assert agreed == pytest.approx(p * p + (1 - p) * (1 - p), abs=0.015)
    # Less noise, more agreement; a lot of noise, labelers who agree by chance only.
    low_noise = marker_votes(noise=0.2, pairs=500, labelers=5, seed=seed_offset)
    assert figures("simulation.low_noise_agreement", agreement.project_figures(low_noise)["percent_agreement"]) > 0.95
    high_noise = marker_votes(noise=50, pairs=500, labelers=5, seed=seed_offset)
    assert figures("simulation.high_noise_agreement", agreement.project_figures(high_noise)["percent_agreement"]) < 0.55


@pytest.mark.statistical
def test_high_noise_votes_are_near_a_coin_flip(seed_offset, figures):
    votes = marker_votes(noise=100, pairs=1000, labelers=4, seed=seed_offset)
    # 4,000 votes: one standard error is 0.8 points, the bound is 3.8 of them. Seen 0.487 to 0.515
    # on seed offsets 0-4.
    assert figures("simulation.coin_share", (votes.choice == 0).mean()) == pytest.approx(0.5, abs=0.03)


# --- Through HTTP: the command against a live server ------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_bots_label_every_comparison_to_its_overlap_by_the_hidden_preference(live_server):
    marker_project(slug="fruit", pairs=6, overlap=3)
    out = simulate(live_server, "fruit", "--labelers", "4", "--preference", MARKER, "--noise", "0", "--seed", "1")

    comparisons = Comparison.objects.filter(project__slug="fruit")
    assert sorted(comparisons.values_list("vote_count", flat=True)) == [3] * 6
    votes = Vote.objects.filter(comparison__project__slug="fruit")
    assert votes.count() == 18
    assert not votes.values("comparison", "labeler").annotate(n=Count("pk")).filter(n__gt=1).exists()
    # Noise 0: every vote goes to the answer with the marker, one occurrence apart: strength 2.
    assert set(votes.values_list("choice", "strength")) == {("a", 2)}
    assert set(votes.values_list("labeler__username", flat=True)) <= {f"sim-fruit-{i}" for i in range(4)}
    assert out.startswith("18 votes by 4 bots")
    assert "votes/s" in out and "sim-fruit-3" in out


@pytest.mark.django_db(transaction=True)
def test_bots_are_reused_and_stop_at_max_votes(live_server):
    marker_project(slug="fruit", pairs=10, overlap=2)
    simulate(live_server, "fruit", "--labelers", "2", "--preference", MARKER, "--max-votes", "5")
    assert Vote.objects.count() == 5
    first_run = set(Vote.objects.values_list("pk", flat=True))
    # A second run reuses the same bots, which go on where they stopped.
    out = simulate(live_server, "fruit", "--labelers", "2", "--preference", "length", "--noise", "0")
    assert Vote.objects.count() == 20
    assert out.startswith("15 votes by 2 bots")
    assert set(Vote.objects.values_list("labeler__username", flat=True)) == {"sim-fruit-0", "sim-fruit-1"}
    # The "length" bots preferred the longer answer (B) on every pair they saw in the second run.
    assert set(Vote.objects.exclude(pk__in=first_run).values_list("choice", flat=True)) == {"b"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "flags, message",
    [
        (["nowhere", "--preference", MARKER], "No project 'nowhere'"),
        (["fruit", "--preference", "sweetness"], "--preference: unknown preference 'sweetness'"),
        (["fruit", "--preference", MARKER, "--noise", "-1"], "--noise must be 0 or more"),
        (["fruit", "--preference", MARKER, "--labelers", "0"], "--labelers"),
        (["fruit", "--preference", MARKER, "--url", "http://127.0.0.1:{port}"], "cannot reach the server"),
        (["fruit", "--preference", MARKER, "--url", "127.0.0.1:8000"], "must look like http://host:port"),
    ],
)
def test_bad_arguments_are_clear_errors(flags, message):
    marker_project(slug="fruit", pairs=1, overlap=1)
    flags = [flag.format(port=free_port()) for flag in flags]
    with pytest.raises(CommandError, match=message):
        call_command("simulate_labelers", *flags)
    assert Vote.objects.count() == 0
