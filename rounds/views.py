"""Admin pages of training rounds: the list with its start button, and one round with its plots."""

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.views.decorators.http import require_GET, require_POST

from annotation import selectors
from annotation.models import Comparison, Project
from rounds import reward_models, services
from rounds.models import RewardModel, TrainingRound, TrainingSettings
from web.charts import LineChart, line_chart
from web.pages import HtmxRequest, render_page

# What each step of a run logged that is worth a chart: the online trainers' rollouts, the offline
# ones' implicit rewards; a chart is drawn for the keys a run has.
STEP_CHARTS = [
    ("objective/score", "Reward-model score per step"),
    ("objective/kl", "KL from the reference per step"),
    ("policy/response_length", "Response length per step"),
    ("objective/entropy", "Entropy per step"),
    ("rewards/accuracy", "Implicit reward accuracy per step"),
    ("rewards/margin", "Implicit reward margin per step"),
]
SHOWN_SAMPLES = 10


def _chart(labels: list[str], series: dict[str, list[float | None]], **bounds: float) -> LineChart:
    """A line chart scaled to its values unless bounds are given."""
    values = [value for points in series.values() for value in points if value is not None]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    margin = (high - low) * 0.1 or abs(high) * 0.1 or 1.0
    return line_chart(labels, series, **{"low": low - margin, "high": high + margin, **bounds})


def _across_rounds(project: Project) -> list[tuple[str, LineChart]]:
    finished = list(
        TrainingRound.objects.filter(project=project, policy__isnull=False).select_related("policy").order_by("number")
    )
    labels = [
        f"round {item.number} ({item.policy.algorithm})" if item.policy else str(item.number) for item in finished
    ]
    metric = lambda key: [item.policy.metrics.get(key) if item.policy else None for item in finished]  # noqa: E731
    return [
        ("Proxy reward (mean reward-model score, last steps)", _chart(labels, {"score": metric("score")})),
        ("KL from the first policy", _chart(labels, {"KL": metric("kl")})),
        ("Mean response length", _chart(labels, {"tokens": metric("response_length")})),
        (
            "Human win rate over the predecessor",
            _chart(labels, {"win rate": [item.win_rate for item in finished]}, low=0.0, high=1.0),
        ),
    ]


def _poll_every(rounds: list[TrainingRound]) -> int | None:
    """Seconds between refreshes of a page that shows these rounds: often while a worker moves one,
    now and then while one waits for people, not at all once they are over."""
    if any(item.state in TrainingRound.WORKER_STATES for item in rounds):
        return 2
    return 10 if any(item.active for item in rounds) else None


def _list_context(project: Project) -> dict[str, Any]:
    listed = list(TrainingRound.objects.filter(project=project).select_related("policy").order_by("-number")[:50])
    for item in listed:
        item.now = services.round_progress(item) if item.active else None  # type: ignore[attr-defined]
    configured = TrainingSettings.objects.filter(project=project).first() or TrainingSettings(project=project)
    return {
        "project": project,
        "rounds": listed,
        "algorithm": configured.get_algorithm_display(),
        "poll_every": _poll_every(listed),
        "shown": _shown(listed),
    }


def _shown(rounds: list[TrainingRound]) -> str:
    """What a polled page was drawn for: when it changes (a round moved on), the page reloads whole,
    charts and samples with it."""
    return ",".join(f"{item.number}:{item.state}" for item in rounds if item.active or item is rounds[0])


def _moved_on(request: HtmxRequest, shown: str) -> HttpResponse | None:
    """htmx's answer to a poll of a page that is out of date: reload it."""
    if request.htmx and request.GET.get("shown") not in (None, shown):
        response = HttpResponse(status=204)
        response["HX-Refresh"] = "true"
        return response
    return None


def _render_list(request: HtmxRequest, project: Project) -> HttpResponse:
    context = _list_context(project)
    if moved_on := _moved_on(request, context["shown"]):
        return moved_on
    if not request.htmx:  # the charts change only when a round ends: the polled table leaves them out
        context["charts"] = _across_rounds(project)
    return render_page(request, "rounds/rounds.html", context, partial="round-table")


@require_GET
@login_required
def round_list(request: HtmxRequest, slug: str) -> HttpResponse:
    selectors.admin_required(request.user)
    return _render_list(request, get_object_or_404(Project, slug=slug))


@require_POST
@login_required
def round_start(request: HtmxRequest, slug: str) -> HttpResponse:
    selectors.admin_required(request.user)
    project = get_object_or_404(Project, slug=slug)
    try:
        started = services.round_start(project=project)
        messages.info(request, f"Round {started.number} opened.")
    except services.RoundBusy as error:
        messages.error(request, str(error))
    if request.htmx:
        return _render_list(request, project)
    return redirect("rounds", slug=slug)


@require_POST
@login_required
def round_abandon(request: HtmxRequest, slug: str, number: int) -> HttpResponse:
    """Give up on a round that cannot finish (pairs nobody will label), so the next one can start."""
    selectors.admin_required(request.user)
    training_round = get_object_or_404(TrainingRound, project__slug=slug, number=number)
    admin = str(request.user)
    try:
        services.round_abandon(training_round=training_round, note=f"abandoned by {admin}", worker=admin)
        messages.info(request, f"Round {number} abandoned.")
    except (services.RoundBusy, services.LeaseLost) as error:  # over already, or it moved on meanwhile
        messages.error(request, str(error))
    return redirect("round", slug=slug, number=number)


@require_GET
@login_required
def round_detail(request: HtmxRequest, slug: str, number: int) -> HttpResponse:
    selectors.admin_required(request.user)
    training_round = get_object_or_404(
        TrainingRound.objects.select_related("project", "reward_model", "policy__parent"),
        project__slug=slug,
        number=number,
    )
    if moved_on := _moved_on(request, training_round.state):
        return moved_on
    if request.htmx:  # the polled status: state, progress and figures
        return render_page(request, "rounds/round.html", _status_context(training_round), partial="status")
    steps = training_round.policy.step_metrics() if training_round.policy else []
    step_labels = [str(row.get("step", index + 1)) for index, row in enumerate(steps)]
    samples = (
        Comparison.objects.filter(
            project=training_round.project, origin=Comparison.Origin.ROUND_SAMPLE, round=training_round.number
        )
        .select_related("prompt", "response_a", "response_b", "aggregate")
        .order_by("id")[:SHOWN_SAMPLES]
    )
    context = {
        **_status_context(training_round),
        "step_charts": [
            (title, _chart(step_labels, {key: [row.get(key) for row in steps]}))
            for key, title in STEP_CHARTS
            if any(key in row for row in steps)
        ],
        "charts": _across_rounds(training_round.project),
        "transitions": training_round.transitions.all(),
        "samples": samples,
    }
    return render_page(request, "rounds/round.html", context)


def _status_context(training_round: TrainingRound) -> dict[str, Any]:
    return {
        "project": training_round.project,
        "round": training_round,
        "progress": services.round_progress(training_round),
        "poll_every": _poll_every([training_round]),
        # While labeling, the verdict so far: (win rate, pairs aggregated).
        "so_far": services.win_rate(training_round) if training_round.state == TrainingRound.State.LABELING else None,
    }


@require_GET
@login_required
def reward_model_list(request: HtmxRequest, slug: str) -> HttpResponse:
    """The project's latest reward models: the dashboard loads this table, and it polls itself
    while a version trains."""
    selectors.admin_required(request.user)
    project = get_object_or_404(Project, slug=slug)
    listed = RewardModel.objects.filter(project=project).order_by("-version")[:10]
    return render_page(
        request, "rounds/reward_models.html", {"project": project, "reward_models": listed}, partial="table"
    )


@require_POST
@login_required
def reward_model_train(request: HtmxRequest, slug: str) -> HttpResponse:
    selectors.admin_required(request.user)
    project = get_object_or_404(Project, slug=slug)
    try:
        configured = TrainingSettings.objects.filter(project=project).first()  # the rounds' reward settings
        overrides = configured.reward_overrides if configured else None
        model = reward_models.reward_model_start(project=project, overrides=overrides)
        messages.info(request, f"Reward model v{model.version} queued.")
    except reward_models.TrainingBusy as error:
        messages.error(request, str(error))
    return redirect("dashboard", slug=slug)
