"""Labeling pages. htmx swaps the `pair` partial in place; without JavaScript the same forms post
and redirect, so the page works either way."""

import uuid

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from annotation import selectors, services
from annotation.models import Assignment, Project, Vote
from web.pages import HtmxRequest, render_page


def _assignment_for_labeler(request: HtmxRequest, assignment_id: int) -> Assignment:
    labeler = selectors.labeler_required(request.user)
    try:
        assignment = selectors.assignment_for_display(assignment_id=assignment_id)
    except Assignment.DoesNotExist:
        raise Http404("No such assignment.") from None
    if assignment.labeler_id != labeler.pk:
        raise Http404("No such assignment.")
    return assignment


def _pair_context(request: HtmxRequest, project: Project, assignment: Assignment | None, **extra: object) -> dict:
    return {
        "project": project,
        "progress": selectors.labeler_progress(project=project, labeler=selectors.labeler_required(request.user)),
        "assignment": assignment,
        "strengths": [(1, "Slightly", "q"), (2, "Clearly", "w"), (3, "Much", "e")],
        "flags": Vote.Flag.values,
        "idempotency_key": uuid.uuid4().hex,
        **extra,
    }


def _render_pair(request: HtmxRequest, context: dict, status: int = 200) -> HttpResponse:
    # An htmx swap of an error keeps status 200 so the message replaces the pair in place.
    return render_page(
        request, "annotation/label.html", context, partial="pair", status=200 if request.htmx else status
    )


@require_GET
@login_required
def home(request: HtmxRequest) -> HttpResponse:
    labeler = selectors.labeler_or_none(request.user)
    can_label = labeler is not None
    projects = selectors.projects_for_labeler(user=labeler) if labeler is not None else Project.objects.none()
    is_admin = selectors.admin_or_none(request.user) is not None
    return render(request, "annotation/home.html", {"projects": projects, "can_label": can_label, "is_admin": is_admin})


@require_http_methods(["GET", "POST"])
@login_required
def label(request: HtmxRequest, slug: str) -> HttpResponse:
    """GET shows the pair the labeler holds, or a "Start labeling" form that htmx posts on load;
    POST claims the next pair. A GET changes nothing, so a prefetch or a crawler burns no lease."""
    project = selectors.project_for_labeler(user=request.user, slug=slug)
    if request.method == "POST":
        return _next_pair(request, project, notice="")
    labeler = selectors.labeler_required(request.user)
    assignment = selectors.assignment_current(project=project, labeler=labeler)
    return _render_pair(request, _pair_context(request, project, assignment, start=assignment is None))


@require_POST
@login_required
def vote(request: HtmxRequest, assignment_id: int) -> HttpResponse:
    assignment = _assignment_for_labeler(request, assignment_id)
    project = assignment.comparison.project
    try:
        services.vote_submit(
            assignment_id=assignment.pk,
            labeler=selectors.labeler_required(request.user),
            choice=request.POST.get("choice", ""),
            strength=_int_or_none(request.POST.get("strength")) or 1,
            rationale=request.POST.get("rationale", "").strip(),
            flags=request.POST.getlist("flags"),
            time_spent_ms=_int_or_none(request.POST.get("time_spent_ms")),
            idempotency_key=request.POST.get("idempotency_key") or None,
        )
    except services.InvalidVote as error:
        message = "Pick left, right, tie or both bad first." if error.field == "choice" else str(error)
        return _render_pair(request, _pair_context(request, project, assignment, error=message), status=400)
    except services.LabelingError as error:
        return _next_pair(request, project, notice=str(error), status=409)
    return _next_pair(request, project, notice="Vote saved.")


@require_POST
@login_required
def skip(request: HtmxRequest, assignment_id: int) -> HttpResponse:
    assignment = _assignment_for_labeler(request, assignment_id)
    services.assignment_skip(assignment=assignment)
    return _next_pair(request, assignment.comparison.project, notice="Skipped.")


def _next_pair(request: HtmxRequest, project: Project, *, notice: str, status: int = 200) -> HttpResponse:
    """Claim the next pair; htmx gets it in place, a plain form a redirect to the page that shows it."""
    assignment = services.assignment_claim(project=project, labeler=selectors.labeler_required(request.user))
    if not request.htmx:
        if notice:
            messages.info(request, notice)
        return redirect("label", slug=project.slug)
    if assignment is not None:
        assignment = selectors.assignment_for_display(assignment_id=assignment.pk)
    return _render_pair(request, _pair_context(request, project, assignment, notice=notice), status=status)


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None
