"""The newcomer's round, timed: on the embedded default in a fresh var dir (SQLite, the broker
folder), with the packaged SmolLM2-135M-Instruct policy and MiniLM reward backbone,

    python manage.py migrate
    python manage.py seed_demo --simulate
    python manage.py run_round demo --wait

as the README gives them. Prints each command's seconds and run_round's JSON line, and writes
bench/results/demo_round.json. No worker runs, so run_round takes the round over itself after its
default 15 s (counted); with `make demo` running, its gpu worker takes it at once instead.

    python bench/demo_round.py [--keep DIR]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "demo_round.json"


def run(step: str, *args: str, env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{step} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    print(f"{step:<24} {seconds:7.1f} s", flush=True)
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="Use (and keep) this var dir instead of a temporary one.")
    arguments = parser.parse_args()
    var = arguments.keep or Path(tempfile.mkdtemp(prefix="flywheel-demo-"))
    drop = {"DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE"}
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "DEBUG": "1", "FLYWHEEL_VAR_DIR": str(var)}
    timings = {
        "migrate": run("migrate", "migrate", "-v0", env=env)[0],
        "seed_demo --simulate": run("seed_demo --simulate", "seed_demo", "--simulate", env=env)[0],
    }
    seconds, output = run("run_round demo --wait", "run_round", "demo", "--wait", env=env)
    timings["run_round demo --wait"] = seconds
    line = json.loads(output.splitlines()[-1])
    total = sum(timings.values())
    print(f"{'total':<24} {total:7.1f} s  (target: under 15 min on 2 CPU cores)")
    print(json.dumps(line))
    result = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "load_average_1m": os.getloadavg()[0]},
        "seconds": {name: round(value, 1) for name, value in timings.items()}, "total_seconds": round(total, 1),
        "round": line,
    }  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
