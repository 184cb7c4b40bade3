"""Checking numeric options where they are built, so that a bad value is named with its config key.

Hydra passes a command-line value such as ``training.lr=fast`` through as a string; without a check it fails
deep inside the optimiser (or as Python's "could not convert string to float") with no key in sight.
"""

from __future__ import annotations

import math
from typing import Any


def number(
    key: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float within the bounds, or a ValueError naming ``key``, the value and the range.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``. A numeric string (YAML reads ``3e-4``
    as one) is accepted; a bool is not (``training.lr=true`` is a slip, not 1.0).
    """
    expected = "a number" + _range(low, high, low_open, high_open)
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: expected {expected}")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r}: expected {expected}") from None
    if not math.isfinite(result):
        raise ValueError(f"{key}={value!r}: expected {expected} (finite)")
    below = low is not None and (result <= low if low_open else result < low)
    above = high is not None and (result >= high if high_open else result > high)
    if below or above:
        raise ValueError(f"{key}={value!r}: expected {expected}")
    return result


def _range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f" {'<' if high_open else '<='} {high:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
