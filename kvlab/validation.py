"""Argument checks the library's modules share, each raising a clear error before any work.

Kept at the bottom of the library (it imports nothing from kvlab), so any module may use it.
"""

from __future__ import annotations

import numbers

__all__ = ["check_positive_int"]


def check_positive_int(name: str, value) -> None:
    """Raise ValueError unless `value` is an int >= 1 (a bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
