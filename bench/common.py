"""What every benchmark records beside its figures (which commit of the app ran, on what machine, and
for the training benchmarks the peak memory of a run), and the plumbing the benchmarks share: log
lines, a hard time limit, the results file, a training side run in a process of its own."""

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class BenchTimeout(Exception):
    pass


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raises BenchTimeout in the main thread after `seconds` (the run's --timeout), whatever it is waiting on."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise BenchTimeout(f"run exceeded --timeout {seconds:.0f} s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def app_commit(root: Path = ROOT) -> str | None:
    """The short commit, with "+dirty" when the app's code has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "annotation", "config", "rounds", "training", "web"],
            cwd=root, capture_output=True, text=True,
        )  # fmt: skip
    except OSError:
        return None
    return (head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")) if head.returncode == 0 else None


def host() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def machine() -> dict[str, Any]:
    return {**host(), "app_commit": app_commit(), "date": now_utc()}


def training_machine() -> dict[str, Any]:
    import torch

    return {**machine(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def peak_memory_mib(device: Any) -> float:
    """This process's peak: CUDA memory allocated on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def synchronize(device: Any) -> None:
    """Wait for the GPU's queued work, so that a timer read next measures it."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def run_side(script: str, name: str, setup: Any, input_flag: str, input_path: Path) -> dict[str, Any]:
    """One side of a training benchmark in a fresh interpreter, so that its peak memory is its own:
    `script --side NAME --setup JSON INPUT_FLAG PATH`, read by parse_training_args; its figures come back as the
    JSON on its last line."""
    setup_json = json.dumps(dataclasses.asdict(setup))
    command = [sys.executable, script, "--side", name, "--setup", setup_json, input_flag, str(input_path)]
    finished = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if finished.returncode != 0:
        sys.stderr.write(finished.stderr[-4000:])
        raise RuntimeError(f"the {name} side failed with exit status {finished.returncode}")
    return dict(json.loads(finished.stdout.strip().splitlines()[-1]))


def parse_training_args(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    side: Callable[[str, Any, Path], dict[str, Any]],
    setup_type: Callable[..., Any],
    input_flag: str,
) -> argparse.Namespace | None:
    """A training benchmark's arguments (it has --device), checked; None when run_side started this process as
    one side: `side(name, setup, input)` has then run and printed its figures as JSON."""
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument(input_flag, type=Path, dest="side_input", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        print(json.dumps(side(args.side, setup_type(**json.loads(args.setup)), args.side_input)))
        return None
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    return args
