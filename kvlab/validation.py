"""Argument checks the library's modules share, each raising a clear error before any work.

Every check names the argument, says what is allowed and shows what it got, e.g.
    batch_size must be a positive int, got 0
    top_p must be None or a number in (0, 1], got 1.5
    kind must be one of ('static', 'dynamic', 'sliding'), got 'paged'
A value of the wrong type raises `ArgumentTypeError`, which is both a TypeError and a
ValueError (kvlab's checks raised one or the other for a wrong type before there was one
module of checks, so callers may catch either); a value of the right type outside the allowed
range raises ValueError. A bool is never accepted as a number (True is not a batch size).
Checks that pass return the value (an int as a Python int, a number as a float), so a caller
can write `n = check_positive_int("n", n)`.

Kept at the bottom of the library (it imports nothing from kvlab), so any module may use it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

__all__ = [
    "ArgumentTypeError",
    "check_int",
    "check_positive_int",
    "check_non_negative_int",
    "check_number",
    "check_probability",
    "check_bool",
    "check_choice",
]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: a TypeError, and a ValueError too (see the module docstring)."""


def _fail(name: str, allowed: str, value, allow_none: bool, *, wrong_type: bool, note: str | None):
    allowed = f"None or {allowed}" if allow_none else allowed
    note = f" ({note})" if note else ""
    got = f"{value!r}" if not wrong_type or isinstance(value, (str, bool, numbers.Number)) or value is None \
        else f"a {type(value).__name__}"
    error = ArgumentTypeError if wrong_type else ValueError
    return error(f"{name} must be {allowed}{note}, got {got}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_range(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"an int in [{low}, {high}]"
    if low is not None:
        return f"an int >= {low}"
    if high is not None:
        return f"an int <= {high}"
    return "an int"


def check_int(name: str, value, *, low: int | None = None, high: int | None = None, allow_none: bool = False,
              note: str | None = None, allowed: str | None = None) -> int | None:
    """`value` as an int in [low, high] (either bound may be None); None passes when `allow_none`.

    `allowed` replaces the generated description ("an int >= 0") when a caller has a clearer
    one; `note` is added in parentheses after it ("0 disables it").
    """
    if value is None and allow_none:
        return None
    allowed = allowed or _int_range(low, high)
    if not _is_int(value):
        raise _fail(name, allowed, value, allow_none, wrong_type=True, note=note)
    if (low is not None and value < low) or (high is not None and value > high):
        raise _fail(name, allowed, value, allow_none, wrong_type=False, note=note)
    return int(value)


def check_positive_int(name: str, value, *, allow_none: bool = False, note: str | None = None) -> int | None:
    """`value` as an int >= 1 ("a positive int"); None passes when `allow_none`."""
    return check_int(name, value, low=1, allow_none=allow_none, note=note, allowed="a positive int")


def check_non_negative_int(name: str, value, *, allow_none: bool = False, note: str | None = None) -> int | None:
    """`value` as an int >= 0; None passes when `allow_none`."""
    return check_int(name, value, low=0, allow_none=allow_none, note=note)


def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, allow_none: bool = False,
                 note: str | None = None) -> float | None:
    """`value` as a finite float within the bounds (closed unless `low_open` / `high_open`).

    NaN and infinities never pass. None passes when `allow_none`.
    """
    if value is None and allow_none:
        return None
    if low is not None and high is not None:
        allowed = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        allowed = f"a finite number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        allowed = f"a finite number {'<' if high_open else '<='} {high:g}"
    else:
        allowed = "a finite number"
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise _fail(name, allowed, value, allow_none, wrong_type=True, note=note)
    x = float(value)
    inside = math.isfinite(x) and (
        low is None or (x > low if low_open else x >= low)) and (high is None or (x < high if high_open else x <= high))
    if not inside:
        raise _fail(name, allowed, value, allow_none, wrong_type=False, note=note)
    return x


def check_probability(name: str, value, *, allow_none: bool = False, note: str | None = None) -> float | None:
    """`value` as a float in (0, 1]; None passes when `allow_none`."""
    return check_number(name, value, low=0.0, high=1.0, low_open=True, allow_none=allow_none, note=note)


def check_bool(name: str, value) -> bool:
    """`value` itself when it is True or False; anything else (1, "yes", None) is refused."""
    if not isinstance(value, bool):
        raise _fail(name, "True or False", value, False, wrong_type=True, note=None)
    return value


def check_choice(name: str, value, choices: Iterable, *, note: str | None = None):
    """`value` itself when it is one of `choices` (shown as a tuple in the message)."""
    choices = tuple(choices)
    try:
        ok = value in choices
    except TypeError:  # an unhashable value against a set-like container
        ok = False
    if not ok:
        note = f" ({note})" if note else ""
        raise ValueError(f"{name} must be one of {choices}{note}, got {value!r}")
    return value
