import logging
from collections.abc import Callable

import psycopg
from django.conf import settings
from django.contrib.messages import middleware as messages_middleware
from django.core.exceptions import BadRequest, PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.db import InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.template.loader import render_to_string

logger = logging.getLogger(__name__)

# The database failed (refused, timed out, cancelled): Django's wrappers, and psycopg's own where code
# reads through the raw connection (the export's server-side cursor).
DATABASE_ERRORS = (OperationalError, InterfaceError, psycopg.OperationalError, psycopg.InterfaceError)

# What a client is told to wait before trying again when the database cannot be reached.
RETRY_AFTER_SECONDS = 10

# Model text reaches our pages, so no inline script may ever run and nothing outside this origin
# may be fetched: an image URL in a response could otherwise leak what the labeler is looking at.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        response.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        return response


# Django answers these itself with a 4xx; everything else would be its 500 page.
_CLIENT_ERRORS = (Http404, PermissionDenied, BadRequest, SuspiciousOperation, MultiPartParserError)


class DatabaseUnavailableMiddleware:
    """A request that cannot reach the database (refused, or no answer within DB_CONNECT_TIMEOUT, or
    cancelled by DB_STATEMENT_TIMEOUT) answers 503 with Retry-After instead of a 500. Under /api/ every
    answer is JSON, an unexpected error's 500 included."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        api = request.path.startswith("/api/")
        if isinstance(exception, RequestDataTooBig):
            limit = f"{settings.DATA_UPLOAD_MAX_MEMORY_SIZE:,} bytes (DATA_UPLOAD_MAX_MEMORY_SIZE)"
            message = f"The request body is over the limit of {limit}."
            return JsonResponse({"detail": message}, status=413) if api else HttpResponse(message, status=413)
        if isinstance(exception, DATABASE_ERRORS):
            logger.error("503 for %s, the database failed: %s", request.path, exception)
            return database_unavailable(api=api)
        if api and not isinstance(exception, _CLIENT_ERRORS):
            logger.error("Internal Server Error: %s", request.path, exc_info=exception)
            return JsonResponse({"detail": "Internal server error."}, status=500)
        return None


def database_unavailable(*, api: bool) -> HttpResponse:
    if api:
        response: HttpResponse = JsonResponse({"detail": "The database is unavailable; try again shortly."}, status=503)
    else:
        # Rendered without the request: its context processors would ask the database for the user.
        response = HttpResponse(render_to_string("503.html"), status=503)
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


class MessageMiddleware(messages_middleware.MessageMiddleware):
    """Django's, for the pages only: the API shows no messages, and setting up their storage was a few
    per cent of a labeling request's CPU (bench/labeling_load.py)."""

    def process_request(self, request: HttpRequest) -> None:
        if not request.path.startswith("/api/"):
            super().process_request(request)
