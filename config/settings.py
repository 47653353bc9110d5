"""Flywheel settings. Everything that differs between machines comes from the environment.

With no environment at all the app runs on the embedded default: a SQLite file under var/ and
Celery tasks executed in-process. Set DATABASE_URL and REDIS_URL for PostgreSQL and real workers.
"""

from datetime import timedelta
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from config.env import env_bool, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("FLYWHEEL_VAR_DIR") or BASE_DIR / "var")

DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set when DEBUG is off (with docker compose: SECRET_KEY=... in .env)"
        )
    SECRET_KEY = "insecure-development-key-only-used-with-DEBUG-on"

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "django_htmx",
    "template_partials",
    "annotation",
    "rounds",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "config.middleware.ContentSecurityPolicyMiddleware",
    "config.middleware.DatabaseUnavailableMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "config.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASE_URL = env_str("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'flywheel.sqlite3'}"
DATABASES = {
    "default": dj_database_url.parse(
        DATABASE_URL,
        conn_max_age=env_int("DB_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
# A database that accepts connections and never answers must cost a request seconds, not its
# thread for good: gunicorn's timeout does not stop a gthread request. libpq counts a connect
# timeout under 2 s as 2 s; a statement timeout of 0 is none.
DB_CONNECT_TIMEOUT = env_int("DB_CONNECT_TIMEOUT", 5, minimum=2)
DB_STATEMENT_TIMEOUT = env_int("DB_STATEMENT_TIMEOUT", 30, minimum=0)
# A connection that finished a request without error this recently skips the per-request health check
# (config/postgresql/base.py); 0 checks every request, as Django does.
DB_HEALTH_CHECK_GRACE = env_float("DB_HEALTH_CHECK_GRACE", 1.0, minimum=0)
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"]["ENGINE"] = "config.postgresql"
    DATABASES["default"]["OPTIONS"] = {
        # Server-side binding and a prepare threshold let psycopg prepare the statements every
        # labeling request repeats (on the 5th run on a connection), so PostgreSQL stops parsing
        # and re-planning them: a claim + vote cost PostgreSQL 4.2-4.8 ms of CPU unprepared, 1.7-2.0 ms
        # prepared (one connection, 1,000 in a row). Django's own default is no threshold: PgBouncer in
        # transaction mode before 1.21 breaks prepared statements (set DB_PREPARE_THRESHOLD=0 there).
        "server_side_binding": env_bool("DB_SERVER_SIDE_BINDING", True),
        "prepare_threshold": env_int("DB_PREPARE_THRESHOLD", 5, minimum=0) or None,
        # The whole connection attempt, TCP and start-up.
        "connect_timeout": DB_CONNECT_TIMEOUT,
    }
    if DB_STATEMENT_TIMEOUT:
        # Sent at connection start-up; PgBouncer in transaction mode refuses it (set 0 there).
        DATABASES["default"]["OPTIONS"]["options"] = f"-c statement_timeout={DB_STATEMENT_TIMEOUT * 1000}"
elif DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    # One writer at a time: wait for the lock instead of failing with "database is locked".
    DATABASES["default"]["OPTIONS"] = {"timeout": 20, "transaction_mode": "IMMEDIATE"}
    DATABASES["default"]["CONN_MAX_AGE"] = 0

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = True
WHITENOISE_MANIFEST_STRICT = False

# Security headers; `manage.py check --deploy` passes with DEBUG off and a real SECRET_KEY.
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", not DEBUG)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEBUG)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = not DEBUG
SECURE_HSTS_PRELOAD = not DEBUG
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Health checks (docker compose, load balancers) speak plain HTTP to the app itself.
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "annotation.negotiation.ContentNegotiation",
    # `?format=` names the export file format (jsonl, parquet), not a DRF renderer.
    "URL_FORMAT_OVERRIDE": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Flywheel API",
    "DESCRIPTION": "Pairwise preference labeling for RLHF.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "config.schema.common_responses"],
}

REDIS_URL = env_str("REDIS_URL")
# After a vote is saved, scheduling its agreement refresh goes through Redis (cache and broker): a Redis
# that is down or never answers must cost the vote well under a second, not redis-py's 5 s or kombu's
# forever. The vote is answered all the same; beat's agreement-catch-up recomputes what was missed.
REDIS_TIMEOUT = env_float("REDIS_TIMEOUT", 0.5, minimum=0.05)
REDIS_SOCKET_OPTIONS = {"socket_connect_timeout": REDIS_TIMEOUT, "socket_timeout": REDIS_TIMEOUT}
CELERY_BROKER_URL = REDIS_URL or "filesystem://localhost/"
CELERY_RESULT_BACKEND = None
# Tasks always go to a worker, never run inside a web request (the test settings run them in-process).
CELERY_TASK_ALWAYS_EAGER = False
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, Any] = dict(REDIS_SOCKET_OPTIONS)
if REDIS_URL is None:
    # The embedded default's broker: kombu's filesystem transport, one file per message in a folder
    # under var/, no server to run. A message leaves the folder when a worker takes it, so a worker
    # killed mid-task loses it (a warm shutdown puts it back); the database leases make that safe:
    # beat's rounds_check and reward_models_reclaim re-send work whose lease ran out (README).
    BROKER_DIR = VAR_DIR / "broker"
    for folder in ("queue", "control"):
        (BROKER_DIR / folder).mkdir(parents=True, exist_ok=True)
    # Beside the socket options, which a test that switches to a Redis broker still needs.
    CELERY_BROKER_TRANSPORT_OPTIONS.update(
        data_folder_in=str(BROKER_DIR / "queue"),
        data_folder_out=str(BROKER_DIR / "queue"),
        control_folder=str(BROKER_DIR / "control"),
    )
    CELERY_WORKER_ENABLE_REMOTE_CONTROL = False  # no broadcast on a folder: no mingle, gossip or inspect
    CELERY_BEAT_SCHEDULE_FILENAME = str(BROKER_DIR / "celerybeat-schedule")
CELERY_BROKER_CONNECTION_TIMEOUT = REDIS_TIMEOUT
# One retry reconnects a producer whose connection died with a restarted Redis; more would only keep
# a request waiting on a Redis that is down.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
# GPU work goes to its own queue, consumed by `celery -A config worker --queues gpu --pool solo`.
CELERY_TASK_ROUTES = {
    "rounds.tasks.reward_model_train_task": {"queue": "gpu"},
    "rounds.tasks.round_run_task": {"queue": "gpu"},
    # An AI labeler holds a judge model for as long as the queue lasts: its own workers.
    "annotation.tasks.ai_label_task": {"queue": "ai"},
}
CELERY_BEAT_SCHEDULE = {
    "reward-models-reclaim": {"task": "rounds.tasks.reward_models_reclaim_task", "schedule": 60.0},
    # Starts rounds that have enough new labels, finishes labeled ones, re-enqueues stale ones.
    "rounds-check": {"task": "rounds.tasks.rounds_check_task", "schedule": 120.0},
    # Recomputes agreement where a vote's debounced refresh was lost (Redis was down when it came in).
    "agreement-catch-up": {"task": "annotation.tasks.agreement_catch_up_task", "schedule": 120.0},
}

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "OPTIONS": REDIS_SOCKET_OPTIONS,
    }
    if REDIS_URL
    else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
}

# Where workers reach the web server's API: AI labelers work the queue over HTTP like people.
FLYWHEEL_API_URL = env_str("FLYWHEEL_API_URL") or "http://127.0.0.1:8000"

# Labeling defaults; every project can override overlap and lease length.
FLYWHEEL_DEFAULT_OVERLAP = env_int("FLYWHEEL_DEFAULT_OVERLAP", 3)
FLYWHEEL_DEFAULT_LEASE_SECONDS = env_int("FLYWHEEL_DEFAULT_LEASE_SECONDS", 600)
FLYWHEEL_IMPORT_MAX_LINE_BYTES = env_int("FLYWHEEL_IMPORT_MAX_LINE_BYTES", 1_000_000)
# A burst of votes triggers one agreement recomputation this many seconds after its first vote.
FLYWHEEL_AGREEMENT_DEBOUNCE_SECONDS = env_int("FLYWHEEL_AGREEMENT_DEBOUNCE_SECONDS", 30)

# Training: where models and their data snapshots are written, and the default reward backbone
# (a model id, a local path, or an offline package: smollm2-135m, minilm-l6).
ARTIFACTS_DIR = Path(env_str("ARTIFACTS_DIR") or VAR_DIR / "artifacts")
FLYWHEEL_REWARD_BACKBONE = env_str("FLYWHEEL_REWARD_BACKBONE") or "smollm2-135m"
# The policy a project's first round starts from, unless its training settings name another.
FLYWHEEL_POLICY = env_str("FLYWHEEL_POLICY") or "smollm2-135m"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}

# Size caps (README, "HTTP API"): an import upload over this many bytes is refused before it is read
# (the command line has no cap); other request bodies are held to Django's DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MB).
FLYWHEEL_IMPORT_MAX_BYTES = env_int("FLYWHEEL_IMPORT_MAX_BYTES", 20_000_000)
# DRF's JSON parser, answering 400 rather than 500 for JSON nested too deeply to parse.
REST_FRAMEWORK["DEFAULT_PARSER_CLASSES"] = [
    "annotation.parsers.JSONParser",
    "rest_framework.parsers.FormParser",
    "rest_framework.parsers.MultiPartParser",
]

# Authentication hardening (README, "HTTP API"): django-axes locks out failed logins, on the login page and
# on the token endpoint, per username and separately per address (an address guessing many usernames is
# stopped as well as many addresses guessing one); a lock-out lasts the cool-off from the last failure.
# A success does not reset the failure count (axes' default), so alternating right and wrong guesses gains nothing.
INSTALLED_APPS = [*INSTALLED_APPS, "axes"]
# Last, as axes asks: it turns the flag its backend set on the request into the lock-out answer.
MIDDLEWARE = [*MIDDLEWARE, "axes.middleware.AxesMiddleware"]
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_FAILURE_LIMIT = env_int("FLYWHEEL_LOGIN_FAILURE_LIMIT", 5)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("FLYWHEEL_LOGIN_COOLOFF_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_LOCKOUT_CALLABLE = "annotation.auth.lockout_response"
# API tokens expire this long after they were issued; a password change revokes them.
FLYWHEEL_TOKEN_LIFETIME_HOURS = env_int("FLYWHEEL_TOKEN_LIFETIME_HOURS", 720)
REST_FRAMEWORK["DEFAULT_AUTHENTICATION_CLASSES"] = [
    "annotation.auth.ExpiringTokenAuthentication",
    "rest_framework.authentication.SessionAuthentication",
]
AUTH_PASSWORD_VALIDATORS = [*AUTH_PASSWORD_VALIDATORS, {"NAME": "annotation.auth.RevokeTokensOnPasswordChange"}]
# How long a token's user, their groups and a project's access are kept in the cache (annotation/access_cache.py):
# every change that sends a model signal deletes its entry at once, in every process when the cache is Redis;
# without Redis each process has its own cache, and this bounds how late another process sees a change. 0: off.
FLYWHEEL_AUTH_CACHE_SECONDS = env_int("FLYWHEEL_AUTH_CACHE_SECONDS", 30, minimum=0)
SPECTACULAR_SETTINGS["SERVE_PERMISSIONS"] = ["rest_framework.permissions.IsAuthenticated"]
# The password-reset pages are served only when mail can be sent (config/urls.py).
EMAIL_HOST = env_str("EMAIL_HOST") or ""
