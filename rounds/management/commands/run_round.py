import json
import sys
import threading
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection
from django.utils import timezone

from annotation.models import Project
from rounds import services
from rounds.leases import worker_name
from rounds.models import Algorithm, TrainingRound

State = TrainingRound.State
POLL_S = 1.0


class Command(BaseCommand):
    help = (
        "Start a training round of the project, or continue the one that is open. With --wait, block "
        "until it reaches labeling (or fails), showing its progress on stderr, and print one JSON line: "
        '{"round", "state", "algorithm", "pairs", "proxy_reward", "kl", "mean_length", "seconds"}.'
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("project_slug")
        parser.add_argument("--wait", action="store_true", help="Block until the round reaches labeling or fails.")
        parser.add_argument(
            "--algorithm", choices=Algorithm.values, help="Set the project's algorithm first (its training settings)."
        )
        parser.add_argument(
            "--take-over-after",
            type=float,
            default=15.0,
            metavar="SECONDS",
            help="With --wait: when no worker has taken the round up after this long, run it in this process "
            "(default 15; the database lease keeps a worker that comes later off it).",
        )

    def handle(
        self, *args: object, project_slug: str, wait: bool, algorithm: str | None, take_over_after: float,
        **options: object,
    ) -> None:  # fmt: skip
        project = Project.objects.filter(slug=project_slug).first()
        if project is None:
            raise CommandError(f"No project {project_slug!r}.")
        training_round = TrainingRound.objects.filter(project=project).exclude(state__in=TrainingRound.TERMINAL_STATES)
        current = training_round.first()
        if algorithm is not None:
            self._set_algorithm(project, algorithm, current)
        if current is None:
            try:
                current = services.round_start(project=project)
            except services.RoundBusy as error:  # another start won the race: continue that one
                current = training_round.first()
                if current is None:
                    raise CommandError(str(error)) from None
            self.stderr.write(f"round {current.number} opened")
        else:
            self.stderr.write(f"continuing round {current.number} ({current.state})")
        if wait:
            self._wait(current, take_over_after)
        current.refresh_from_db()
        self.stdout.write(json.dumps(summary(current)))
        if current.state == State.FAILED:
            raise CommandError(
                f"round {current.number} failed: {current.error.splitlines()[0] if current.error else ''}"
            )

    def _set_algorithm(self, project: Project, algorithm: str, current: TrainingRound | None) -> None:
        settings_row = services.training_settings(project)
        if current is not None and current.policy_id is not None and settings_row.algorithm != algorithm:
            raise CommandError(
                f"round {current.number} already trained its policy with {settings_row.algorithm}; "
                f"--algorithm {algorithm} applies to the next round"
            )
        settings_row.algorithm = algorithm
        settings_row.save(update_fields=["algorithm"])
        try:
            services.optimizer_overrides(project)
        except ValueError as error:
            raise CommandError(f"--algorithm {algorithm}: {error}") from None

    def _wait(self, training_round: TrainingRound, take_over_after: float) -> None:
        """Poll the round, reporting progress; promote it when labels suffice (beat may not run), and
        run it here when no worker takes it up."""
        unclaimed_since = time.monotonic()
        runner: threading.Thread | None = None
        shown, phase = "", training_round.state
        while True:
            training_round.refresh_from_db()
            # Each training phase the round has gone through since the last poll (a fast one can
            # end between two polls): its final count, on a line of its own.
            for passed in _phases_passed(phase, training_round.state):
                finished = services.round_progress(training_round, passed)
                if finished is not None and finished.total:
                    shown = self._report(finished, shown, final=True)
            phase = training_round.state
            if training_round.state in (State.LABELING, *TrainingRound.TERMINAL_STATES):
                break
            if runner is not None and not runner.is_alive():
                runner = None  # it stopped short of labeling (lost its lease): watch again
            if training_round.state == State.WAITING_FOR_LABELS:
                services.promote_if_ready(training_round, worker=worker_name())
            elif training_round.lease_owner or runner is not None:
                unclaimed_since = time.monotonic()
            elif time.monotonic() - unclaimed_since > take_over_after:
                self.stderr.write(f"no worker took round {training_round.number} up in {take_over_after:g} s: "
                                  "running it in this process")  # fmt: skip
                runner = threading.Thread(target=_run_here, args=(training_round.pk,), daemon=True)
                runner.start()
            if (progress := services.round_progress(training_round)) is not None:
                shown = self._report(progress, shown)
            time.sleep(POLL_S)
        if runner is not None:
            runner.join()
        self._report(services.Progress(f"round {training_round.number}: {training_round.state}"), shown)
        if sys.stderr.isatty():
            self.stderr.write("")

    def _report(self, progress: services.Progress, shown: str, *, final: bool = False) -> str:
        """On a terminal one line rewritten in place, the time left with it (a `final` one is kept);
        in a log a line each time the phase, step or detail changes."""
        line = progress.line()
        if sys.stderr.isatty():
            self.stderr.write(f"\r{line}\033[K", ending="\n" if final else "")
            return line
        key = f"{progress.phase} {progress.step} {progress.detail}"
        if key != shown:
            self.stderr.write(line)
        return key


def _phases_passed(left: str, now: str) -> list[str]:
    """The training phases from `left` up to `now`, in the lifecycle's order, `now` excluded."""
    order: list[str] = list(State)
    return [
        phase for phase in (State.TRAINING_REWARD_MODEL, State.TRAINING_POLICY)
        if left != now and order.index(left) <= order.index(phase) < order.index(now)
    ]  # fmt: skip


def _run_here(round_id: int) -> None:
    try:
        services.round_run(round_id=round_id, worker=worker_name())
    finally:
        connection.close()  # this thread's own


def summary(training_round: TrainingRound) -> dict[str, Any]:
    """The JSON line: the round's number, state and algorithm, the pairs it sent to the labelers, its
    policy's proxy reward, KL and mean length, and the seconds from its training's start to now (or
    to labeling)."""
    policy = training_round.policy
    metrics = policy.metrics if policy else {}
    started = training_round.transitions.filter(to_state=State.TRAINING_REWARD_MODEL).order_by("at").first()
    ended = training_round.transitions.filter(to_state__in=[State.LABELING, State.FAILED]).order_by("at").first()
    seconds = None
    if started is not None:
        seconds = round(((ended.at if ended else timezone.now()) - started.at).total_seconds(), 1)
    return {
        "round": training_round.number,
        "state": training_round.state,
        "algorithm": policy.algorithm if policy else services.training_settings(training_round.project).algorithm,
        "pairs": training_round.samples,
        "proxy_reward": metrics.get("score"),
        "kl": metrics.get("kl"),
        "mean_length": metrics.get("response_length"),
        "seconds": seconds,
    }
