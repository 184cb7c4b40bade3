"""Helpers every part of the study shares: spreads over seeds, sort keys, CSV and markdown cells."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from fusion.io import write_csv as write_rows

__all__ = ["MAX", "MIN", "STD", "cell", "is_number", "job_key", "seed_key", "seed_name", "spread", "write_csv"]

# Suffixes of the spread columns of subsets.csv (a metric name never contains ':').
STD, MIN, MAX = ":std", ":min", ":max"


def spread(values: list[float]) -> dict[str, Any]:
    """``mean``, sample ``std`` (ddof=1; None for one value), ``min``, ``max`` and ``n`` of ``values``."""
    n = len(values)
    std = statistics.stdev(values) if n > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values), "n": n}


def is_number(value: Any) -> bool:
    """A finite-or-not int/float that is not a bool (metrics.json numbers)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def seed_key(seed: Any) -> tuple[int, Any]:
    """Integer seeds in order, then anything else by its text (None: a job without a seed)."""
    return (0, seed) if isinstance(seed, int) else (1, str(seed))


def seed_name(seed: Any) -> str:
    """A seed as a JSON object key."""
    return str(seed)


def job_key(job: str) -> tuple[int, Any]:
    """Hydra's job folders ``0, 1, ..., 10`` in number order, other names after them."""
    return (0, int(job)) if job.isdigit() else (1, job)


def write_csv(path: Path, rows: list[dict[str, Any]], first: list[str]) -> None:
    """``rows`` as a CSV: the ``first`` columns, then every other key sorted; None is an empty cell."""
    rest = sorted({k for r in rows for k in r} - set(first))
    write_rows(path, [{k: ("" if v is None else v) for k, v in r.items()} for r in rows], first + rest)


def cell(value: Any, signed: bool = False) -> str:
    """A markdown cell: floats to 3 decimals (``signed``: with their sign), None and NaN as ``undefined``-free
    empty text."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        return f"{value:+.3f}" if signed else f"{value:.3f}"
    return str(value if value is not None else "")


def mean_std(stats: dict[str, Any] | None, signed: bool = False) -> str:
    """``mean ± std`` of a :func:`spread` (just the mean for one value; empty for None)."""
    if not stats:
        return ""
    if stats["std"] is None:
        return cell(stats["mean"], signed)
    return f"{cell(stats['mean'], signed)} ± {stats['std']:.3f}"
