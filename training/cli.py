"""What the command lines of `training.reward` and `training.ppo` share: a flag per field of a
config dataclass (its help string included), and a progress bar on stderr."""

import argparse
import dataclasses
import sys
from typing import Any


def add_config_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    for spec in dataclasses.fields(config_class):
        flag = "--" + spec.name.replace("_", "-")
        if spec.type is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=spec.default, help=spec.metadata["help"]
            )
        else:
            kind = spec.type if spec.type in (int, float) else str
            parser.add_argument(flag, type=kind, default=spec.default, help=spec.metadata["help"])


def config_from_flags(config_class: type, args: argparse.Namespace) -> Any:
    return config_class(**{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(config_class)})


def progress_bar(step: int, total: int, text: str) -> None:
    width = 30
    filled = int(width * step / max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{total} {text}")
    if step == total:
        sys.stderr.write("\n")
    sys.stderr.flush()
