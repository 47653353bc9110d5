"""A training step in the worker's own process, or under torchrun across the worker's devices
(FLYWHEEL_GPUS_PER_WORKER, by default the visible CUDA devices): the same command line a user
would run, its progress streamed into the run's row by the caller's heartbeat."""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from training import cli, launch


class ChildKilled(Exception):
    """The launched run was killed by a signal: its checkpoint stays for the next attempt."""


def train(
    module: str,
    config: Any,
    inputs: Sequence[str],
    out: Path,
    *,
    progress: Callable[..., Any],
    in_process: Callable[[], dict[str, Any]],
    stop_after: int | None = None,
) -> dict[str, Any]:
    """`in_process()` on a worker with one device (or when a test stops the run after `stop_after`
    steps); otherwise `python -m training.<module> inputs --out out <config's flags>` under torchrun
    with a rank per device. A child killed by a signal raises ChildKilled; one that failed on its
    own raises launch.ChildFailed with the end of its stderr."""
    processes = launch.devices_per_worker()
    if processes == 1 or stop_after is not None:
        return in_process()
    arguments = [*inputs, "--out", str(out), *cli.flags_of(config)]
    try:
        return launch.torchrun(f"training.{module}", arguments, processes=processes, progress=progress)
    except launch.ChildFailed as error:
        if error.killed:
            raise ChildKilled(str(error)) from error
        raise
