"""The exponential moving average of a scalar series on the host, and its variance."""
from __future__ import annotations

from ..checks import check_number


class EMA:
    """Exponential moving average of a scalar series, with its exponentially weighted variance.

    ``mean`` starts at the first value (no bias correction) and then moves ``1 - beta`` of the
    way to each new value; ``var`` is West's incremental form, ``beta * (var + (1 - beta) d^2)``
    with ``d`` the new value's distance to the old mean. Detectors, policies' state and loss
    monitors read series already on the host (one number a step), so this is plain Python.

    Raises:
        ValueError: ``beta`` outside [0, 1).
    """

    def __init__(self, beta: float) -> None:
        self.beta = check_number("EMA.beta", beta, 0.0, 1.0, open_high=True)
        self.n = 0  # values folded in
        self.mean = 0.0
        self.var = 0.0

    def update(self, x: float) -> float:
        """Fold ``x`` in; return the new mean. The caller decides what to leave out (NaN, spikes)."""
        if self.n == 0:
            self.mean, self.var = x, 0.0
        else:
            b = self.beta
            d = x - self.mean
            self.mean += (1 - b) * d
            self.var = b * (self.var + (1 - b) * d * d)
        self.n += 1
        return self.mean
