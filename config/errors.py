"""Django's own error answers (a URL that matches no route, a bad request, a refusal) in JSON under
/api/, as DRF gives them inside the API's views, so an API client never has to parse an HTML page."""

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults


def _json_under_api(request: HttpRequest, status: int, detail: str) -> JsonResponse | None:
    return JsonResponse({"detail": detail}, status=status) if request.path.startswith("/api/") else None


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    return _json_under_api(request, 404, "Not found.") or defaults.page_not_found(request, exception)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    return _json_under_api(request, 400, "Bad request.") or defaults.bad_request(request, exception)


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    return _json_under_api(request, 403, "Permission denied.") or defaults.permission_denied(request, exception)
