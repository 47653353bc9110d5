"""Django's PostgreSQL backend, with the health check of a persistent connection skipped while the
connection has just proved itself.

With CONN_HEALTH_CHECKS, Django sends `SELECT 1` on the first query of every request that reuses a
connection: a round trip, and a few per cent of a labeling request's CPU on both sides
(bench/labeling_load.py). A connection that finished a request without a database error less than
DB_HEALTH_CHECK_GRACE seconds ago (1 by default) is taken as usable without it; one idle for longer
is checked as before, so after a database restart or an idle timeout the first request on it still
reconnects instead of failing. What is given up: a connection the database dropped within that second
fails its next request once (503 with Retry-After, DatabaseUnavailableMiddleware), and is closed
and reopened for the request after.
"""

import math
import time

from django.conf import settings
from django.db.backends.postgresql import base


class DatabaseWrapper(base.DatabaseWrapper):
    health_check_done: bool
    proved_at = -math.inf  # when the connection last finished a request without an error

    def close_if_health_check_failed(self) -> None:
        grace = getattr(settings, "DB_HEALTH_CHECK_GRACE", 0)
        if self.connection is not None and not self.health_check_done and time.monotonic() - self.proved_at < grace:
            self.health_check_done = True
            return
        super().close_if_health_check_failed()

    def close_if_unusable_or_obsolete(self) -> None:
        # At a request's end: health_check_done says the connection was used since the last call
        # (checked, skipped or new), errors_occurred that something failed.
        proved = self.connection is not None and self.health_check_done and not self.errors_occurred
        super().close_if_unusable_or_obsolete()
        if proved and self.connection is not None:
            self.proved_at = time.monotonic()

    def close(self) -> None:
        super().close()
        self.proved_at = -math.inf
