"""Checks for numbers that come from users (manifest fields, flags, config values, demo inputs).

Why it exists: NaN compares false against every bound, so `low <= x <= high` lets it through, and
Python's json reads `NaN`, `Infinity` and `-Infinity`; an unchecked NaN guidance scale samples a garbage
image. Callers wrap the ValueError into their own error that names the line / field / flag.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

Number = Union[int, float]


def checked_number(value: Any, kind: type = float, low: Optional[Number] = None,
                   high: Optional[Number] = None) -> Number:
    """`value` as `kind` (float or int): a finite number (an integral one for int) inside [low, high];
    bools, strings, NaN and ±Inf are refused. Raises ValueError saying what is wrong."""
    expected = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected {expected}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"expected {expected}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{value} is outside [{low}, {high}]")
    try:
        return kind(value)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"{value} is too large") from None
