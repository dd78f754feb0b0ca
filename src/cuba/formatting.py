"""Aggregation and formatting shared by every table the package prints or writes (``cuba
compare``, sweeps, Table II / III, report.html, defense tables, the CLI's metrics table).

One place, so that a number reads the same everywhere: a rate in [0, 1] shown as a percentage,
seeds folded into "mean ± sample std" (no std for a single value), and "–" for a number that is
not defined (None or NaN) rather than 0 or "nan".
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

MISSING = "–"  # a number that is not defined


def first_line(e: BaseException) -> str:
    """An exception's first non-empty line (its type's name when it has no text): what a one-line
    error quotes of a library's failure, whose later lines are tracebacks or hints. A first line
    that ends in ":" only announces the next, which says what is wrong (torch's load_state_dict:
    "Error(s) in loading state_dict for X:" / "size mismatch for ..."), so the two are joined."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """(mean, sample std, n) over the defined values; std is NaN for one value, all NaN for none."""
    v = [float(x) for x in values if not is_missing(x)]
    if not v:
        return math.nan, math.nan, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v)


def mean_pm_std(mean: float, std: float, digits: int = 2) -> str:
    """``12.34 ± 0.56``; the mean alone when std is NaN; "–" when the mean is."""
    if is_missing(mean):
        return MISSING
    return f"{mean:.{digits}f}" if is_missing(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def pct(v: float | None, digits: int = 2) -> str:
    """A rate in [0, 1] as a percentage without the sign (``0.9234`` -> ``92.34``); "–" if undefined."""
    return MISSING if is_missing(v) else f"{100 * v:.{digits}f}"


def number(v: float | None, digits: int = 2) -> str:
    """A plain number (dB, D_p, seconds) with ``digits`` decimals; "–" if undefined."""
    return MISSING if is_missing(v) else f"{v:.{digits}f}"


def fmt_value(v: Any) -> str:
    """A config value as a label shows it: floats shortest (0.1, 1e-05), anything else as str."""
    return f"{v:g}" if isinstance(v, float) else str(v)
