"""Argument checks every capability shares: a clear ``ValueError`` naming the argument and the
value, instead of a bare assertion or a torch error far from the call."""
from __future__ import annotations

import math


def check_int(name: str, value, low: int = 0, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in [low, high].

    Raises:
        ValueError: ``name must be an int >= low (and <= high), got value``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        upper = f" and <= {high}" if high is not None else ""
        raise ValueError(f"{name} must be an int >= {low}{upper}, got {value!r}")
    return value


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf, *,
                 open_low: bool = False, open_high: bool = False) -> float:
    """``value`` as a float if it is a finite real number (not a bool) between ``low`` and
    ``high`` (excluded where ``open_low`` / ``open_high``).

    Raises:
        ValueError: ``name must be a finite number > low`` (or ``in (low, high)``, ``<= high``)
            ``, got value``.
    """
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        if high == math.inf:
            span = f"{'>' if open_low else '>='} {low:g}"
        elif low == -math.inf:
            span = f"{'<' if open_high else '<='} {high:g}"
        else:
            span = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be a finite number {span}, got {value!r}")
    return float(value)
