"""GET /healthz, for docker compose and load balancers: no login, two cheap checks with short timeouts."""

import redis
from django.conf import settings
from django.db import DatabaseError, connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from config.middleware import RETRY_AFTER_SECONDS


@never_cache
@require_safe
def healthz(request: HttpRequest) -> JsonResponse:
    """200 while the database answers; 503 when it does not. Redis being down is reported, not
    failed on: votes are still saved without it (agreement catches up when it returns)."""
    state = {"database": _database_state(), "broker": _broker_state()}
    response = JsonResponse(state, status=200 if state["database"] == "ok" else 503)
    if response.status_code == 503:
        response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def _database_state() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError:
        return "unavailable"
    return "ok"


def _broker_state() -> str:
    if not settings.REDIS_URL:
        return "none"  # tasks run in-process
    client = redis.Redis.from_url(settings.REDIS_URL, **settings.REDIS_SOCKET_OPTIONS)
    try:
        client.ping()
    except redis.RedisError:
        return "unavailable"
    finally:
        client.close()
    return "ok"
