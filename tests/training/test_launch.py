"""training.launch, the torchrun child of a GPU worker: its progress reaches the caller step by
step, and its whole process group dies when the caller's callback raises (a lost lease) or when
the caller itself is killed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.rounds.test_distributed_worker import ranks_of
from tests.tiny_models import marker_pairs
from training import launch

ROOT = Path(__file__).resolve().parents[2]


class LeaseLost(Exception):
    pass


def reward_arguments(tiny_backbone: str, tmp_path: Path, epochs: int) -> list[str]:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in marker_pairs(200)))
    return ["--data", str(data), "--backbone", tiny_backbone, "--batch-size", "2", "--epochs", str(epochs),
            "--max-length", "32", "--out", str(tmp_path / "rm")]  # fmt: skip


def wait_until_gone(pids: list[int], seconds: float = 30) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]
        if not alive:
            return []
        time.sleep(0.2)
    return alive


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return "Z"


def test_progress_reaches_the_caller_and_a_raising_callback_kills_the_group(tiny_backbone, tmp_path):
    steps: list[tuple[int, int]] = []
    ranks: list[int] = []

    def progress(step: int, total: int) -> None:
        steps.append((step, total))
        if len(steps) == 3:
            ranks.extend(ranks_of("training.reward"))
            raise LeaseLost

    with pytest.raises(LeaseLost):
        launch.torchrun(
            "training.reward", reward_arguments(tiny_backbone, tmp_path, 20), processes=2, progress=progress
        )
    assert [step for step, _ in steps] == [1, 2, 3] and steps[0][1] > 100  # every step, not the bar's four a second
    assert len(ranks) == 2 and wait_until_gone(ranks) == []


def test_a_killed_caller_takes_its_torchrun_group_with_it(tiny_backbone, tmp_path):
    """The worker SIGKILLed: the kernel sends torchrun SIGTERM (PR_SET_PDEATHSIG), which stops its ranks."""
    arguments = reward_arguments(tiny_backbone, tmp_path, 50)
    script = f"from training import launch; launch.torchrun('training.reward', {arguments!r}, processes=2)"
    caller = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while len(ranks := ranks_of("training.reward")) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(ranks) == 2
    caller.send_signal(signal.SIGKILL)
    caller.wait()
    assert wait_until_gone(ranks) == []


@pytest.mark.parametrize("ending", ["error", "killed"])
def test_only_the_root_cause_says_whether_the_run_was_killed(ending):
    """torchrun lists the rank it stopped itself (SIGTERM) among the failures whatever happened;
    the first failure decides. A killed run is retried from its checkpoint, one that failed on its
    own error is recorded as failed: taking the one for the other retried it forever."""
    with pytest.raises(launch.ChildFailed) as failure:
        launch.torchrun("tests.training.rank_ends", [ending], processes=2)
    assert "exitcode  : -15" in str(failure.value)  # rank 1, stopped by torchrun in both cases
    assert failure.value.killed == (ending == "killed")


def test_a_bad_device_count_is_named(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_GPUS_PER_WORKER", "two")
    with pytest.raises(ValueError, match="FLYWHEEL_GPUS_PER_WORKER='two'"):
        launch.devices_per_worker()
    monkeypatch.setenv("FLYWHEEL_GPUS_PER_WORKER", "3")
    assert launch.devices_per_worker() == 3
