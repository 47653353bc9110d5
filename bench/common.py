"""What every benchmark records beside its figures: which commit of the app ran, on what machine,
and (for the training benchmarks) the peak memory of a run."""

import datetime as dt
import os
import platform
import resource
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


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


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "app_commit": app_commit(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def training_machine() -> dict[str, Any]:
    import torch

    return {**machine(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def peak_memory_mib(device: Any) -> float:
    """This process's peak: CUDA memory allocated on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
