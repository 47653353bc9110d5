"""What the command lines of `training.reward` and `training.ppo` (and the `train_reward_model`
Django command) share: a flag per field of a config dataclass (its help string included), and a
progress bar on stderr."""

import argparse
import dataclasses
import sys
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


def flags_given(config_class: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """The fields set on a command line whose flags default to None (`defaults=False`)."""
    return {
        spec.name: options[spec.name] for spec in dataclasses.fields(config_class) if options.get(spec.name) is not None
    }


def progress_bar(step: int, total: int, text: str) -> None:
    width = 30
    filled = int(width * step / max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{total} {text}")
    if step == total:
        sys.stderr.write("\n")
    sys.stderr.flush()
