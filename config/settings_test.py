"""Settings for the test suite: the real settings, on PostgreSQL, with test-only shortcuts."""

import os

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
os.environ.setdefault("SECRET_KEY", "test-only-secret-key-not-for-production-use-0123456789")

from config.settings import *  # noqa: E402,F403

# Tasks run in-process, on commit, unless a test starts a real worker (tests/workers.py).
CELERY_TASK_ALWAYS_EAGER = REDIS_URL is None  # noqa: F405
# The test client speaks plain HTTP.
SECURE_SSL_REDIRECT = False
SESSION_COOKIE_SECURE = False
CSRF_COOKIE_SECURE = False
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {"staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}
# Live-server threads must not keep connections open past a test, or the test database can't be dropped.
DATABASES["default"]["CONN_MAX_AGE"] = 0  # noqa: F405
