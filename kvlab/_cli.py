"""Argument types shared by kvlab's command lines (train, generate, bench, dashboard).

Each turns one command-line string into a value or raises `argparse.ArgumentTypeError`, which
argparse reports as "argument --flag: <message>" and exits with status 2, before any work.
"""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An int >= 1."""
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An int >= 0."""
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = _number(text, float, "a positive number")
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    """Comma-separated ints >= 1, e.g. "1,8,16"."""
    values = [_number(v, int, "comma-separated integers") for v in text.split(",") if v]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
