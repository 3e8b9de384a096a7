"""How numbers are written: one set of helpers for report.html, report.md and the terminal.

* AUCs (and other scores in [0, 1]: Brier, ECE, probabilities) at 3 decimals: ``0.812``;
* 95% CIs as ``0.812 [0.701, 0.903]``;
* sensitivity / specificity in percent at 1 decimal: ``85.0``;
* p-values at 3 decimals, ``<0.001`` below that;
* z statistics at 2 decimals;
* durations in seconds at 1 decimal (``4.2 s``), clock-style for elapsed time and ETAs (``1:23``, ``1:02:05``).

A missing, ``None``, NaN or infinite value is written :data:`DASH`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

DASH = "—"


def num(x: Any) -> float | None:
    """``x`` as a finite float, or None (missing, not a number, NaN, infinite, a bool)."""
    if isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt_float(x: Any, digits: int = 3) -> str:
    """A number at ``digits`` decimals (``-0.000`` is written ``0.000``)."""
    v = num(x)
    if v is None:
        return DASH
    txt = f"{v:.{digits}f}"
    return txt[1:] if txt.startswith("-") and float(txt) == 0 else txt


def fmt_auc(x: Any) -> str:
    """An AUC (or any score in [0, 1]) at 3 decimals: ``0.812``."""
    return fmt_float(x, 3)


def fmt_ci(value: Any, ci: Any) -> str:
    """``0.812 [0.701, 0.903]``; just the value when the interval is missing; DASH without a value."""
    txt = fmt_auc(value)
    if txt == DASH or isinstance(ci, str) or not isinstance(ci, Sequence) or len(ci) != 2:
        return txt
    lo, hi = num(ci[0]), num(ci[1])
    return txt if lo is None or hi is None else f"{txt} [{fmt_auc(lo)}, {fmt_auc(hi)}]"


def fmt_pct(x: Any) -> str:
    """A proportion in percent at 1 decimal, without the sign: ``0.85 -> 85.0``."""
    v = num(x)
    return DASH if v is None else fmt_float(100 * v, 1)


def fmt_p(x: Any) -> str:
    """A p-value: ``<0.001``, else 3 decimals (``0.042``, ``1.000``)."""
    v = num(x)
    if v is None:
        return DASH
    return "<0.001" if v < 1e-3 else fmt_float(v, 3)


def fmt_z(x: Any) -> str:
    """A test statistic at 2 decimals."""
    return fmt_float(x, 2)


def fmt_seconds(x: Any) -> str:
    """A duration in seconds at 1 decimal: ``4.2 s``."""
    v = num(x)
    return DASH if v is None else f"{fmt_float(v, 1)} s"


def fmt_clock(x: Any) -> str:
    """An elapsed time or ETA, clock-style: ``0:07``, ``1:23``, ``1:02:05`` (whole seconds, rounded)."""
    v = num(x)
    if v is None or v < 0:
        return DASH
    s = round(v)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_value(v: Any, trim: bool = False) -> Any:
    """A value of a key-value table: floats at 3 decimals, lists of numbers element-wise; else unchanged.

    ``trim`` drops trailing zeros (settings rather than measurements: ``90.0 -> 90``, ``0.30 -> 0.3``).
    """

    def one(x: Any) -> str:
        if isinstance(x, int) and not isinstance(x, bool):
            return str(x)
        txt = fmt_float(x)
        return txt.rstrip("0").rstrip(".") if trim and "." in txt else txt

    if isinstance(v, float):
        return one(v)
    if isinstance(v, list) and v and all(isinstance(x, int | float) or x is None for x in v):
        return "[" + ", ".join(one(x) for x in v) + "]"
    return v
