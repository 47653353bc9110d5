"""Gunicorn settings used by docker compose, the README and the load benchmark alike.

Sized with bench/labeling_load.py on a 2-core machine (bench/results/labeling_load.json): a
claim + vote costs ~5 ms of gunicorn CPU and ~2 ms of PostgreSQL CPU there, so the cores are
the limit, not the number of request slots. One process per core uses both; a second thread per
process overlaps the time a request waits on PostgreSQL. More threads (8 per process was the old
default) only add GIL hand-offs and pile more requests onto the same row locks: it measured
slower, with worse tail latency. Override with GUNICORN_WORKERS / GUNICORN_THREADS.
"""

import multiprocessing
import os

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", multiprocessing.cpu_count()))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", 2))
# API clients and the htmx page keep their connection open between a claim and its vote.
keepalive = 30
timeout = 60
max_requests = 20000
max_requests_jitter = 2000
accesslog = os.environ.get("GUNICORN_ACCESSLOG") or None
errorlog = "-"
# Database connections are kept by each thread (settings: DB_CONN_MAX_AGE, 60 s by default), so
# a worker holds `threads` connections: workers * threads in all, far below max_connections.
