"""Database leases for long GPU work (reward models, training rounds).

A worker owns a row while its `lease_expires_at` is ahead and renews it as it goes (the heartbeat).
A killed worker's lease runs out; another worker then claims the row and carries on from the last
checkpoint. Rows that use this carry `lease_owner`, `lease_expires_at`, `attempts`, `started_at`,
`step` and `total_steps`.
"""

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from django.db import connection, models, transaction
from django.utils import timezone

from rounds.models import LEASE, MAX_ATTEMPTS, LeasedRun

logger = logging.getLogger(__name__)

Row = TypeVar("Row", bound=LeasedRun)


class LeaseLost(Exception):
    """Another worker took the lease over: this one must stop writing."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def lease_claim(claimable: models.QuerySet[Row], *, worker: str, **changes: Any) -> Row | None:
    """Take the lease of the first row of `claimable` (the caller filters to rows whose lease is free
    or ran out) and apply `changes`; None when there is none or another worker is claiming it now."""
    now = timezone.now()
    with transaction.atomic():
        row = claimable.select_for_update(skip_locked=True, of=("self",)).first()
        if row is None:
            return None
        fields = {"lease_owner": worker, "lease_expires_at": now + LEASE, "attempts": row.attempts + 1,
                  "started_at": row.started_at or now, **changes}  # fmt: skip
        for name, value in fields.items():
            setattr(row, name, value)
        row.save(update_fields=list(fields))
    return row


def lease_release(row: LeasedRun, *, worker: str) -> None:
    """Hand the row back now, its lease run out, for the next attempt to claim (a worker whose
    launched run was killed gives it up rather than let it wait out the lease)."""
    type(row)._default_manager.filter(pk=row.pk, lease_owner=worker).update(lease_expires_at=timezone.now())


def lease_retry(row: LeasedRun, *, worker: str, error: Exception) -> bool:
    """After the run this worker launched was killed: hand the row back for the next attempt to
    resume from the checkpoint (True), unless MAX_ATTEMPTS attempts died on it (False: the caller
    fails it). A run the kernel kills for memory dies the same way each time; no endless retries."""
    if row.attempts >= MAX_ATTEMPTS:
        return False
    name = f"{type(row).__name__} {row.pk}"
    logger.warning("%s: attempt %d of %d was killed, the next resumes from the checkpoint: %s", name, row.attempts,
                   MAX_ATTEMPTS, error)  # fmt: skip
    lease_release(row, worker=worker)
    return True


class Heartbeat:
    """Progress callback of a training loop: writes step/total and renews the lease, at most every
    `every` seconds (and at the last step); raises LeaseLost when another worker took it over.

    The reward model calls it as (step, total, loss), PPO as (step, total, metrics): only step and
    total are stored, the losses and metrics go to the run's own files.
    """

    def __init__(self, row: models.Model, worker: str, *, every: float = 2.0) -> None:
        self.model = type(row)
        self.pk = row.pk
        self.worker = worker
        self.every = every
        self.last = 0.0
        self.lost = False  # set by kept_alive's thread

    def __call__(self, step: int, total: int, *details: Any) -> None:
        if self.lost:
            raise LeaseLost(f"{self.worker} lost the lease on {self.model.__name__} {self.pk}")
        now = time.monotonic()
        if now - self.last < self.every and step != total:
            return
        self.last = now
        self.renew(step=step, total_steps=total)

    def renew(self, **fields: Any) -> None:
        renewed = self.model._default_manager.filter(pk=self.pk, lease_owner=self.worker).update(
            lease_expires_at=timezone.now() + LEASE, **fields
        )
        if not renewed:
            raise LeaseLost(f"{self.worker} lost the lease on {self.model.__name__} {self.pk}")


@contextmanager
def kept_alive(heartbeat: Heartbeat, every: float = LEASE.total_seconds() / 4) -> Iterator[None]:
    """Renew the lease from a background thread while the block runs: loading and saving models or
    sampling answers take minutes with no training step to beat on, and a lease that ran out then
    would hand the run to a second worker. A lease lost meanwhile is raised by the next heartbeat."""
    stop = threading.Event()

    def renew() -> None:
        try:
            while not stop.wait(every):
                heartbeat.renew()
        except LeaseLost:
            heartbeat.lost = True
        finally:
            connection.close()  # this thread's own connection

    thread = threading.Thread(target=renew, name=f"lease-{heartbeat.pk}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
