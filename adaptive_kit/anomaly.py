"""Detectors on scalar series (loss, metrics, resource use) shared by telemetry and the swarm.

Each rule works on one value per step, on the host, in O(1) time and memory, and never raises
into the training loop: a non-finite value is itself an alarm, not an error.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


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
    diverge_ratio: float = 3.0  # divergence: EMA > diverge_ratio * best EMA so far ...
    diverge_patience: int = 5  # ... for this many consecutive steps
    plateau_window: int = 50  # plateau: the best value of the last plateau_window steps ...
    plateau_tol: float = 1e-3  # ... improved on the best before them by less than this fraction

    def __post_init__(self) -> None:
        for name in ("warmup", "diverge_patience", "plateau_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SeriesConfig.{name} must be an int >= 1, got {v!r}")
        if not 0 < self.beta < 1:
            raise ValueError(f"SeriesConfig.beta must be in (0, 1), got {self.beta!r}")
        for name in ("spike_sigmas", "spike_ratio", "diverge_ratio", "plateau_tol"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SeriesConfig.{name} must be > 0, got {getattr(self, name)!r}")


class SeriesMonitor:
    """Watches one scalar series for non-finite values, spikes, divergence and plateaus.

    Rules (all on an exponential moving average baseline, updated only with finite values):

    - ``nonfinite``: the value is NaN or infinite.
    - ``spike``: value > EMA + ``spike_sigmas`` x EMA-std and value > ``spike_ratio`` x EMA
      (a z-score rule guarded by a ratio, as loss-spike monitors in large-scale training do).
    - ``divergence``: the EMA stays above ``diverge_ratio`` x its best (lowest) value for
      ``diverge_patience`` consecutive steps (the loss trends up, not one bad batch).
    - ``plateau``: over the last ``plateau_window`` steps the best value improved on the best
      before them by less than ``plateau_tol`` (relative); fires once, re-arms on progress.

    Spikes are left out of the baseline so that one outlier does not mask the next.
    """

    def __init__(self, name: str = "loss", config: SeriesConfig = SeriesConfig()) -> None:
        self.name = name
        self.config = config
        self.n = 0  # finite values seen
        self.ema = 0.0
        self.ema_var = 0.0
        self.best_ema = math.inf
        self._above = 0
        self._recent: deque[float] = deque(maxlen=config.plateau_window)
        self._best_before = math.inf
        self._plateau_fired = False

    def update(self, step: int, value: float) -> list[Alarm]:
        """Fold in one value; return the alarms it raises (possibly none)."""
        c = self.config
        if not math.isfinite(value):
            return [Alarm(step, "nonfinite", self.name, "", "scalar", f"{self.name} = {value}", value)]
        alarms: list[Alarm] = []
        warm = self.n >= c.warmup
        std = math.sqrt(self.ema_var)
        spike = warm and value > self.ema + c.spike_sigmas * std and value > c.spike_ratio * self.ema
        if spike:
            alarms.append(Alarm(step, "spike", self.name, "", "scalar",
                                f"{self.name} {value:.4g} > EMA {self.ema:.4g} + {c.spike_sigmas:g}x std "
                                f"{std:.3g} and > {c.spike_ratio:g}x EMA", value))
        else:
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

    def _fold(self, value: float) -> None:
        b = self.config.beta
        if self.n == 0:
            self.ema, self.ema_var = value, 0.0
        else:
            d = value - self.ema
            self.ema += (1 - b) * d
            self.ema_var = b * (self.ema_var + (1 - b) * d * d)
        self.n += 1

    def _plateau(self, step: int, value: float) -> list[Alarm]:
        c = self.config
        if len(self._recent) == c.plateau_window:
            self._best_before = min(self._best_before, self._recent[0])
        self._recent.append(value)
        if len(self._recent) < c.plateau_window or not math.isfinite(self._best_before):
            return []
        best_now = min(self._recent)
        gain = (self._best_before - best_now) / max(abs(self._best_before), 1e-12)
        if gain >= c.plateau_tol:
            self._plateau_fired = False
            return []
        if self._plateau_fired:
            return []
        self._plateau_fired = True
        return [Alarm(step, "plateau", self.name, "", "scalar",
                      f"best {self.name} of the last {c.plateau_window} steps {best_now:.4g} improved "
                      f"on {self._best_before:.4g} by {gain:.2%} < {c.plateau_tol:.2%}", gain)]
