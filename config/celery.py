import logging
import os
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError as BrokerUnavailable

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("flywheel")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

logger = logging.getLogger(__name__)


def delay_best_effort(task: Any, *args: Any) -> bool:
    """`task.delay(*args)` once the work it is for is committed. A broker that is down or never
    answers (REDIS_TIMEOUT) costs a warning and False, never an error: the row is saved, and beat
    sends what was missed (rounds_check, reward_models_reclaim)."""
    try:
        task.delay(*args)
    except BrokerUnavailable as error:
        logger.warning("%s%r not queued, beat re-sends it: %r", task.name, args, error)
        return False
    return True
