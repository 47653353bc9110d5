"""What the command lines of `training.reward` and `training.ppo` (and the `train_reward_model`
Django command) share: a flag per field of a config dataclass (its help string included), and a
progress bar on stderr."""

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any


def add_config_flags(parser: argparse.ArgumentParser, config_class: type, *, defaults: bool = True) -> None:
    """A flag per field of `config_class`. With `defaults=False` a flag left out is None, so that the
    caller can tell the flags given (a Django command passes those on over its own defaults)."""
    for spec in dataclasses.fields(config_class):
        flag = "--" + spec.name.replace("_", "-")
        default = spec.default if defaults else None
        if spec.type is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=spec.metadata["help"]
            )
        else:
            # A field typed `int | None` (None: worked out later, as per-backbone defaults are) takes an int.
            kind = next((number for number in (int, float) if spec.type in (number, number | None)), str)
            parser.add_argument(flag, type=kind, default=default, help=spec.metadata["help"])


def config_from_flags(config_class: type, args: argparse.Namespace) -> Any:
    return config_class(**{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(config_class)})


def flags_of(config: Any) -> list[str]:
    """The command line that `config_from_flags` turns back into `config` (None fields left out)."""
    flags = []
    for spec in dataclasses.fields(config):
        value, flag = getattr(config, spec.name), "--" + spec.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def flags_given(config_class: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """The fields set on a command line whose flags default to None (`defaults=False`)."""
    return {
        spec.name: options[spec.name] for spec in dataclasses.fields(config_class) if options.get(spec.name) is not None
    }


def duration(seconds: float) -> str:
    """A time left as people say it: "45 s", "3 min", "1 h 20 min"."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def time_left(elapsed: float, done: int, total: int) -> str:
    """ "about 3 min left" at the pace so far (`done` of `total` steps in `elapsed` seconds); empty
    before there is a pace, or once all are done."""
    if done <= 0 or elapsed <= 0 or done >= total:
        return ""
    return f"about {duration(elapsed / done * (total - done))} left"


class _Pace:
    """When the bar's current run of steps began: a step that goes back (a new run) starts again."""

    started, drawn, first_step, last_step = 0.0, 0.0, 0, 0


PROGRESS_LINES = "FLYWHEEL_PROGRESS"  # set to "json": a line {"step", "total", "text"} a step, for a launcher


def progress_bar(step: int, total: int, text: str) -> None:
    """A bar on stderr with the time left at the pace since the first step it was shown; with
    FLYWHEEL_PROGRESS=json in the environment, a JSON line a step instead, for the process that
    launched this one to read (`training.launch`)."""
    if os.environ.get(PROGRESS_LINES) == "json":
        sys.stderr.write(json.dumps({"step": step, "total": total, "text": text}) + "\n")
        sys.stderr.flush()
        return
    now = time.monotonic()
    if step <= _Pace.last_step or not _Pace.started:
        _Pace.started, _Pace.first_step = now, step
    _Pace.last_step = step
    if now - _Pace.drawn < 0.25 and step != total:  # many quick steps: redraw four times a second
        return
    _Pace.drawn = now
    left = time_left(now - _Pace.started, step - _Pace.first_step, total - _Pace.first_step)
    eta = f" {left}" if left else ""
    width = 30
    filled = int(width * step / max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{total} {text}{eta}\033[K")
    if step == total:
        sys.stderr.write("\n")
        _Pace.started = 0.0
    sys.stderr.flush()
