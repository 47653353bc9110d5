"""Django's own error answers (a URL that matches no route, a bad request, a refusal, an error) in
JSON under /api/, as DRF gives them inside the API's views, so an API client never has to parse an
HTML page. An error outside any view (a session saved after it) that is the database's answers
503 with Retry-After, as one inside a view does (DatabaseUnavailableMiddleware)."""

import sys

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults

from config.middleware import DATABASE_ERRORS, database_unavailable


def _json_under_api(request: HttpRequest, status: int, detail: str) -> JsonResponse | None:
    return JsonResponse({"detail": detail}, status=status) if request.path.startswith("/api/") else None


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    return _json_under_api(request, 404, "Not found.") or defaults.page_not_found(request, exception)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    return _json_under_api(request, 400, "Bad request.") or defaults.bad_request(request, exception)


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    return _json_under_api(request, 403, "Permission denied.") or defaults.permission_denied(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    # Django calls this while it handles the exception, so the exception is the one being handled.
    api = request.path.startswith("/api/")
    if isinstance(sys.exc_info()[1], DATABASE_ERRORS):
        return database_unavailable(api=api)
    return _json_under_api(request, 500, "Internal server error.") or defaults.server_error(request)
