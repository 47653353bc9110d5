"""Argument types the management commands share."""


def positive_int(value: str) -> int:
    """A whole number of at least 1 (argparse names the flag when this raises)."""
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number
