"""Admin pages: quality at a glance, the labeler table, the review queue with adjudication, and
import by upload. Pages only read stored snapshots, so they stay fast on big projects."""

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Q
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from annotation import ai_labeling, selectors, services
from annotation.agreement import CHOICES
from annotation.models import AggregatedLabel, AgreementSnapshot, Comparison, Project
from annotation.quality import REVIEW_BELOW_SHARE
from web.charts import line_chart
from web.pages import HtmxRequest, render_page

REVIEW_PAGE = 25
LABELER_COLUMNS = [
    ("username", "Labeler"),
    ("kind", "Kind"),
    ("votes", "Votes"),
    ("agreement", "Agreement (leave-one-out)"),
    ("agreement_with_humans", "AI: agreement with the human majority"),
    ("position_consistency", "AI: same verdict with the answers swapped"),
    ("gold_accuracy", "Gold accuracy"),
    ("trust", "Trust (Dawid-Skene)"),
    ("median_seconds", "Median s/vote"),
    ("left_share", "Left share"),
    ("tie_share", "Tie share"),
    ("both_bad_share", "Both-bad share"),
]


@require_GET
@login_required
def dashboard(request: HtmxRequest, slug: str) -> HttpResponse:
    selectors.admin_required(request.user)
    project = get_object_or_404(Project, slug=slug)
    snapshot = services.snapshot_for_page(project=project)
    sort = request.GET.get("sort", "votes")
    if sort not in dict(LABELER_COLUMNS):
        sort = "votes"
    descending = request.GET.get("dir", "desc") != "asc"
    rows = snapshot.labelers if snapshot else []
    labelers = sorted((row for row in rows if row.get(sort) is not None), key=lambda row: row[sort], reverse=descending)
    labelers += [row for row in rows if row.get(sort) is None]
    context = {
        "project": project,
        "snapshot": snapshot,
        "figures": snapshot.figures if snapshot else {},
        "labelers": labelers,
        "columns": LABELER_COLUMNS,
        "sort": sort,
        "descending": descending,
        "history": _history_chart(project),
        "rounds": _rounds_chart(project),
        "pairs": sorted(snapshot.labeler_pairs, key=lambda pair: pair["kappa"] if pair["kappa"] is not None else 9)[:20]
        if snapshot
        else [],
        # Counted when the snapshot was computed: counting here would scan every aggregate.
        "review_count": snapshot.figures.get("split_pairs", 0) if snapshot else 0,
        "members": selectors.project_member_names(project=project),
        "ai_runs": project.ai_runs.order_by("-created_at")[:10],
    }
    return render_page(request, "annotation/dashboard.html", context, partial="labelers")


def _history_chart(project: Project) -> Any:
    rows = list(
        AgreementSnapshot.objects.filter(project=project, round=None)
        .order_by("-computed_at")
        .values_list("computed_at", "figures")[:60]
    )[::-1]
    return line_chart(
        [moment.strftime("%m-%d %H:%M") for moment, _ in rows],
        {
            "Krippendorff's alpha (nominal)": [figures.get("alpha_nominal") for _, figures in rows],
            "Fleiss' kappa": [figures.get("fleiss_kappa") for _, figures in rows],
            "percent agreement": [figures.get("percent_agreement") for _, figures in rows],
        },
    )


def _rounds_chart(project: Project) -> Any:
    """Agreement per training round: the humans' among themselves, and each AI labeler's with the
    human majority, so an admin sees whether the AI agrees with people as often as they do."""
    latest: dict[int, tuple[dict, list]] = {}
    for round_number, figures, labelers in (
        AgreementSnapshot.objects.filter(project=project, round__isnull=False)
        .order_by("round", "computed_at")
        .values_list("round", "figures", "labelers")
    ):
        if round_number is not None:
            latest[round_number] = (figures, labelers)
    rounds = sorted(latest)
    series = {
        "Krippendorff's alpha (nominal)": [latest[number][0].get("alpha_nominal") for number in rounds],
        "percent agreement": [latest[number][0].get("percent_agreement") for number in rounds],
    }
    ai_names = sorted({row["username"] for _, rows in latest.values() for row in rows if row.get("kind") == "ai"})
    for name in ai_names:
        by_round = [{row["username"]: row for row in latest[number][1]}.get(name, {}) for number in rounds]
        series[f"{name} with the humans"] = [row.get("agreement_with_humans") for row in by_round]
    return line_chart([f"round {number}" for number in rounds], series)


def _review_queryset(project: Project) -> Any:
    return AggregatedLabel.objects.filter(comparison__project=project, adjudicated_choice="").filter(
        Q(majority_choice="") | Q(majority_share__lt=REVIEW_BELOW_SHARE)
    )


@require_GET
@login_required
def review(request: HtmxRequest, slug: str) -> HttpResponse:
    selectors.admin_required(request.user)
    project = get_object_or_404(Project, slug=slug)
    after = request.GET.get("after", "")
    queue = _review_queryset(project).select_related(
        "comparison__prompt", "comparison__response_a", "comparison__response_b"
    )
    if after.isdigit():
        queue = queue.filter(comparison_id__gt=int(after))
    items = list(queue.order_by("comparison_id")[: REVIEW_PAGE + 1])
    context = {
        "project": project,
        "items": items[:REVIEW_PAGE],
        "next_after": items[REVIEW_PAGE - 1].comparison_id if len(items) > REVIEW_PAGE else None,
        "choices": CHOICES,
    }
    return render(request, "annotation/review.html", context)


@require_POST
@login_required
def adjudicate(request: HtmxRequest, comparison_id: int) -> HttpResponse:
    admin = selectors.admin_required(request.user)
    comparison = get_object_or_404(Comparison.objects.select_related("project"), pk=comparison_id)
    choice = request.POST.get("choice", "")
    if choice not in CHOICES:
        return HttpResponse(f"choice must be one of {', '.join(CHOICES)}", status=400)
    aggregate = services.comparison_adjudicate(comparison=comparison, choice=choice, admin=admin)
    if request.htmx:
        return render(request, "annotation/review.html#adjudicated", {"aggregate": aggregate})
    messages.info(request, f"Comparison {comparison_id} adjudicated: {choice}.")
    return redirect("review", slug=comparison.project.slug)


@require_POST
@login_required
def import_upload(request: HtmxRequest, slug: str) -> HttpResponse:
    selectors.admin_required(request.user)
    project = get_object_or_404(Project, slug=slug)
    upload = request.FILES.get("file")
    context: dict[str, Any] = {"project": project}
    if upload is None:
        context["import_errors"] = ["Choose a JSON Lines file first."]
    else:
        try:
            _, result = services.pairs_import_upload(
                project_slug=project.slug,
                upload=upload,
                skip_invalid=request.POST.get("skip_invalid") == "on",
            )
        except services.ImportRejected as error:
            context["import_errors"] = error.errors
        else:
            context["import_result"] = result
    if request.htmx:
        return render(request, "annotation/dashboard.html#import-result", context)
    for line in context.get("import_errors", []):
        messages.error(request, line)
    if "import_result" in context:
        result = context["import_result"]
        messages.info(request, f"{result.created} comparisons created, {result.duplicates} duplicates skipped.")
    return redirect("dashboard", slug=slug)


@require_POST
@login_required
def refresh(request: HtmxRequest, slug: str) -> HttpResponse:
    selectors.admin_required(request.user)
    project = get_object_or_404(Project, slug=slug)
    if services.agreement_refresh_request(project_id=project.pk):
        messages.info(request, "Agreement is being recomputed.")
    else:
        messages.error(
            request,
            "The refresh could not be scheduled (the task queue is unreachable); figures catch up once it is back.",
        )
    return redirect("dashboard", slug=slug)


@require_POST
@login_required
def access(request: HtmxRequest, slug: str) -> HttpResponse:
    """Members-only or open, and members added (usernames separated by spaces or commas) or removed."""
    selectors.admin_required(request.user)
    project = get_object_or_404(Project, slug=slug)
    chosen = request.POST.get("access")
    try:
        services.project_access_set(
            project=project,
            members_only={"members_only": True, "open": False}.get(chosen or ""),
            add=request.POST.get("add", "").replace(",", " ").split(),
            remove=request.POST.getlist("remove"),
        )
    except services.InvalidInput as error:
        messages.error(request, str(error))
    else:
        messages.info(
            request, "Access saved: " + ("members-only." if project.members_only else "open to every labeler.")
        )
    return redirect("dashboard", slug=slug)


@require_POST
@login_required
def ai_labeler_add(request: HtmxRequest, slug: str) -> HttpResponse:
    """Queue an AI labeler on the project: a worker of the `ai` queue works the queue with it."""
    selectors.admin_required(request.user)
    project = get_object_or_404(Project, slug=slug)
    max_votes = request.POST.get("max_votes", "").strip()
    try:
        if max_votes and (not max_votes.isdigit() or int(max_votes) < 1):
            raise services.InvalidInput("max_votes", f"{max_votes!r} is not a positive whole number")
        run = ai_labeling.ai_run_start(
            project=project, judge=request.POST.get("judge", ""), max_votes=int(max_votes) if max_votes else None,
            chain_of_thought=request.POST.get("chain_of_thought") == "on",
        )  # fmt: skip
    except services.InvalidInput as error:
        messages.error(request, str(error))
    else:
        messages.info(request, f"AI labeler {run.name} queued.")
    return redirect("dashboard", slug=slug)
