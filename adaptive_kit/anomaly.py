"""Detectors on scalar series (loss, metrics, resource use) shared by telemetry and the swarm.

Each rule works on one value per step, on the host, in O(1) time and memory, and never raises
into the training loop: a non-finite value is itself an alarm, not an error.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from .checks import check_int, check_number
from .stats import EMA


@dataclass(frozen=True)
class Alarm:
    """One detection: when, what fired, where, at which granularity, and the numbers behind it."""

    step: int
    detector: str  # e.g. "nonfinite", "loss_spike", "exploding_grad"
    kind: str  # "loss", "grad", "weight", "act", or a metric name
    layer: str  # layer name; "*" when the data cannot localise a layer; "" for scalars
    level: str  # granularity the evidence arrived at ("scalar" for series)
    evidence: str  # human-readable rule and numbers
    value: float  # the statistic that crossed the threshold


@dataclass(frozen=True)
class SeriesConfig:
    warmup: int = 10  # steps before spike/divergence/plateau rules may fire
    beta: float = 0.9  # EMA factor of the baseline mean and variance
    spike_sigmas: float = 6.0  # spike: value > EMA + spike_sigmas * EMA std ...
    spike_ratio: float = 2.0  # ... and value > spike_ratio * EMA (both, so noise alone does not fire)
    spike_patience: int = 2  # ... on this many consecutive steps (one odd batch is not a fault)
    diverge_ratio: float = 3.0  # divergence: EMA > diverge_ratio * best EMA so far ...
    diverge_patience: int = 5  # ... for this many consecutive steps
    plateau_window: int = 20  # plateau: the EMA's relative progress over the last window ...
    plateau_stall: float = 0.1  # ... is below plateau_stall x its progress over the window before ...
    plateau_min_progress: float = 0.05  # ... and that earlier progress was at least this fraction,
    plateau_floor: float = 0.1  # ... while the EMA is still above this fraction of its first value

    def __post_init__(self) -> None:
        for name in ("warmup", "spike_patience", "diverge_patience", "plateau_window"):
            check_int(f"SeriesConfig.{name}", getattr(self, name), 1)
        check_number("SeriesConfig.beta", self.beta, 0.0, 1.0, open_low=True, open_high=True)
        for name in ("spike_sigmas", "spike_ratio", "diverge_ratio", "plateau_stall", "plateau_min_progress",
                     "plateau_floor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SeriesConfig.{name} must be > 0, got {getattr(self, name)!r}")


class SeriesMonitor:
    """Watches one scalar series for non-finite values, spikes, divergence and plateaus.

    Rules (all on an exponential moving average baseline, updated only with finite values):

    - ``nonfinite``: the value is NaN or infinite.
    - ``spike``: value > EMA + ``spike_sigmas`` x EMA-std and value > ``spike_ratio`` x EMA
      on ``spike_patience`` consecutive steps (a z-score rule guarded by a ratio, as loss-spike
      monitors in large-scale training do; one odd mini-batch does not fire it).
    - ``divergence``: the EMA stays above ``diverge_ratio`` x its best (lowest) value for
      ``diverge_patience`` consecutive steps (the loss trends up, not one bad batch).
    - ``plateau``: a stall: the EMA's relative progress over the last ``plateau_window`` steps
      is below ``plateau_stall`` x its progress over the window before, which was at least
      ``plateau_min_progress``, while the EMA is above ``plateau_floor`` x its first value (a
      run that has converged is not stuck). Convergence slows gradually and does not fire it;
      a learning rate that collapses does. Fires once, re-arms on progress.

    Spikes are left out of the baseline so that one outlier does not mask the next.
    """

    def __init__(self, name: str = "loss", config: SeriesConfig = SeriesConfig()) -> None:
        self.name = name
        self.config = config
        self._ema = EMA(config.beta)  # of the values judged normal
        self.best_ema = math.inf
        self._above = 0
        self._emas: deque[float] = deque(maxlen=2 * config.plateau_window + 1)
        self._first_ema: float | None = None
        self._plateau_fired = False
        self._over = 0  # consecutive steps over the spike threshold

    def update(self, step: int, value: float) -> list[Alarm]:
        """Fold in one value; return the alarms it raises (possibly none)."""
        c = self.config
        if not math.isfinite(value):
            return [Alarm(step, "nonfinite", self.name, "", "scalar", f"{self.name} = {value}", value)]
        alarms: list[Alarm] = []
        warm = self.n >= c.warmup
        std = math.sqrt(self.ema_var)
        over = warm and value > self.ema + c.spike_sigmas * std and value > c.spike_ratio * self.ema
        self._over = self._over + 1 if over else 0
        if self._over == c.spike_patience:
            alarms.append(Alarm(step, "spike", self.name, "", "scalar",
                                f"{self.name} {value:.4g} > EMA {self.ema:.4g} + {c.spike_sigmas:g}x std "
                                f"{std:.3g} and > {c.spike_ratio:g}x EMA for {c.spike_patience} steps", value))
        if not over:
            self._fold(value)
        if warm:
            self.best_ema = min(self.best_ema, self.ema)
            self._above = self._above + 1 if self.ema > c.diverge_ratio * self.best_ema else 0
            if self._above == c.diverge_patience:
                alarms.append(Alarm(step, "divergence", self.name, "", "scalar",
                                    f"EMA {self.ema:.4g} > {c.diverge_ratio:g}x best EMA {self.best_ema:.4g} "
                                    f"for {c.diverge_patience} steps", self.ema))
            alarms.extend(self._plateau(step, value))
        return alarms

    @property
    def n(self) -> int:
        """Finite values folded into the baseline."""
        return self._ema.n

    @property
    def ema(self) -> float:
        return self._ema.mean

    @property
    def ema_var(self) -> float:
        return self._ema.var

    def _fold(self, value: float) -> None:
        self._ema.update(value)

    def _plateau(self, step: int, value: float) -> list[Alarm]:
        c, w = self.config, self.config.plateau_window
        self._emas.append(self.ema)
        if self._first_ema is None:
            self._first_ema = self.ema
        if len(self._emas) < 2 * w + 1 or self.ema <= c.plateau_floor * self._first_ema:
            return []
        old, mid, now = self._emas[0], self._emas[w], self._emas[-1]
        before = (old - mid) / max(abs(old), 1e-12)  # relative progress, window before
        recent = (mid - now) / max(abs(mid), 1e-12)  # relative progress, last window
        if before < c.plateau_min_progress or recent >= c.plateau_stall * before:
            if recent >= c.plateau_stall * before:
                self._plateau_fired = False
            return []
        if self._plateau_fired:
            return []
        self._plateau_fired = True
        return [Alarm(step, "plateau", self.name, "", "scalar",
                      f"{self.name} EMA progress {recent:.2%} over the last {w} steps < "
                      f"{c.plateau_stall:g}x the {before:.2%} of the {w} before", recent)]
