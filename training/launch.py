"""A trainer's command line run under torchrun, for a worker with several devices: the child runs in
its own process group, its rank 0 reports each step on stderr (FLYWHEEL_PROGRESS=json), and the
caller's progress callback sees every step, as with a run in the worker's own process. When the
callback raises (a lost lease), the run fails or the caller dies, the whole group is killed; the
run's checkpoint stays for the next attempt.
"""

import collections
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from training.cli import PROGRESS_LINES

DEVICES = "FLYWHEEL_GPUS_PER_WORKER"


def devices_per_worker() -> int:
    """FLYWHEEL_GPUS_PER_WORKER, by default the visible CUDA devices (1 without any)."""
    value = os.environ.get(DEVICES, "").strip()
    if not value:
        import torch  # here: a web process reads the setting without loading torch

        return max(1, torch.cuda.device_count())
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{DEVICES}={value!r}: a whole number of devices, 1 or more")
    return int(value)


class ChildFailed(RuntimeError):
    """The launched run exited with an error (its stderr's end is the message); `killed`: by a
    signal (torchrun itself, or one of its ranks), not by an error of its own."""

    def __init__(self, message: str, *, killed: bool) -> None:
        super().__init__(message)
        self.killed = killed


def _own_group_dying_with_parent() -> None:
    """In the child before exec: a process group of its own (killed as one), and SIGTERM when the
    worker that launched it dies (Linux), which torchrun passes on to its ranks."""
    os.setsid()
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def kill_group(process: subprocess.Popen[str]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def torchrun(
    module: str,
    arguments: Sequence[str],
    *,
    processes: int,
    progress: Callable[[int, int], Any] | None = None,
) -> dict[str, Any]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m module arguments`: its
    summary (the last line it prints). `progress(step, total)` is called for each step rank 0
    reports."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", module, *arguments]  # fmt: skip
    environment = {**os.environ, PROGRESS_LINES: "json"}
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with tempfile.TemporaryFile("w+") as output:  # a file, not a pipe: a chatty stdout cannot block the child
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.PIPE, text=True, env=environment,
            preexec_fn=_own_group_dying_with_parent,
        )  # fmt: skip
        try:
            assert process.stderr is not None
            for line in process.stderr:
                report = _progress_line(line)
                if report is None:
                    tail.append(line)
                elif progress is not None:
                    progress(report["step"], report["total"])
            process.wait()
        except BaseException:
            kill_group(process)
            raise
        output.seek(0)
        printed = output.read()
    if process.returncode:
        message = "".join(tail)[-3000:]
        killed = process.returncode < 0 or _root_cause_was_a_signal(message)
        raise ChildFailed(f"{module} under torchrun exited with {process.returncode}:\n{message}", killed=killed)
    return json.loads(printed.strip().splitlines()[-1])


def _root_cause_was_a_signal(report: str) -> bool:
    """torchrun's failure report lists every rank that ended, the ones it stopped itself (SIGTERM,
    "exitcode  : -15") included, then the "Root Cause (first observed failure)": only that rank
    says whether the run was killed or failed on an error of its own."""
    _, found, root = report.rpartition("Root Cause")
    code = re.search(r"exitcode\s*:\s*(-?\d+)", root) if found else None
    return code is not None and int(code.group(1)) < 0


def _progress_line(line: str) -> dict[str, Any] | None:
    if not line.startswith('{"step"'):
        return None
    try:
        report = json.loads(line)
    except json.JSONDecodeError:
        return None
    return report if isinstance(report, dict) else None
