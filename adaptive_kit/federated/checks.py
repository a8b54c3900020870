"""One validation of features, ordinal labels and step counts for every federated entry point.

Each check raises ``ValueError`` naming the argument and the offending values, so a user sees
``y has fractional labels ([0.5])`` rather than a torch error deep inside a fit.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _tensor(v, name: str) -> torch.Tensor:
    """``v`` as a tensor; strings, objects and ragged input are named rather than left to torch."""
    if isinstance(v, torch.Tensor):
        return v
    arr = np.asarray(v, dtype=object) if isinstance(v, list | tuple) else np.asarray(v)
    if arr.dtype.kind in "OUSV":
        flat = arr.reshape(-1)
        bad = [e for e in flat.tolist() if not isinstance(e, int | float | np.integer | np.floating | bool)][:3]
        if bad or arr.dtype.kind != "O":
            raise ValueError(f"{name} must be numeric, got non-numeric values such as {(bad or flat[:3].tolist())!r}")
        arr = arr.astype(float)
    return torch.as_tensor(arr)


def check_features(x, name: str = "x") -> torch.Tensor:
    """``x`` as an (n, d) tensor with n >= 1 and only finite values.

    Raises:
        ValueError: another shape, no rows, strings, or a non-finite value (its row and column).
    """
    x = _tensor(x, name)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be (n, d) with n >= 1, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        r, c = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{name} has non-finite values (first at row {r}, column {c}): {float(x[r, c])}")
    return x


def check_labels(y, name: str = "y", rows: int | None = None) -> tuple[torch.Tensor, int]:
    """``(labels as int64, J)`` for ordinal labels 0..J-1 with J >= 2 and no gaps.

    Raises:
        ValueError: empty or not 1-d, ``rows`` given and different, strings, non-finite,
            fractional or negative values, gaps in 0..J-1, a single class — naming ``name`` and
            the values.
    """
    y = _tensor(y, name)
    if y.dim() != 1 or len(y) == 0:
        raise ValueError(f"{name} must be a non-empty 1-d tensor of class indices, got shape {tuple(y.shape)}")
    if rows is not None and len(y) != rows:
        raise ValueError(f"{name} has {len(y)} rows, x has {rows}")
    if y.is_floating_point() or y.is_complex():
        if not torch.isfinite(y).all():
            raise ValueError(f"{name} has non-finite labels ({torch.unique(y[~torch.isfinite(y)]).tolist()})")
        frac = y != y.round()
        if frac.any():
            raise ValueError(f"{name} must hold integer class indices, got fractional labels "
                             f"{torch.unique(y[frac]).tolist()[:5]}")
    y = y.long()
    levels = torch.unique(y)
    if levels[0] < 0:
        raise ValueError(f"{name} classes must be 0..J-1, got negative labels {levels[levels < 0].tolist()[:5]}")
    if len(levels) < 2:
        raise ValueError(f"{name} has a single class ({levels.tolist()}); ordinal regression needs at least 2")
    if levels[-1] != len(levels) - 1:
        missing = sorted(set(range(int(levels[-1]) + 1)) - set(levels.tolist()))
        raise ValueError(f"{name} classes must be 0..J-1 without gaps, got {levels.tolist()}"
                         + (f" (missing {missing[:10]})" if missing else ""))
    return y, len(levels)


def check_steps(steps: Sequence[int], name: str = "steps") -> tuple[int, ...]:
    """``steps`` as a non-empty tuple of ints >= 0.

    Raises:
        ValueError: empty, a non-integer or a negative entry (named).
    """
    steps = tuple(steps) if isinstance(steps, Sequence | np.ndarray | torch.Tensor) else (steps,)
    if not steps:
        raise ValueError(f"{name} must hold at least one step count, got {steps!r}")
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0]
    if bad:
        raise ValueError(f"{name} must be ints >= 0, got {bad!r}")
    return tuple(int(s) for s in steps)
