"""The Region Manager: per-layer Full / Hybrid(p) / Global states and sync periods from per-layer evidence.

Every input is an all-reduced quantity, so every worker reaches the same decision with no extra
message. The evidence, per region (a layer, or a group of weights):

* per-step disagreement ``x``: from a count sketch of each worker's gradient, the energy the
  workers disagree on over the energy of their mean gradient (noise and bias together); with the
  gradient's noise fraction over time and the EMA convergence of the loss and gradient norm;
* drift over a period ``r``: at each of the region's weight averages, the workers' spread
  around the average over the squared length of the averaged update ``|mean_w u_w|^2`` (``u`` =
  weights minus the last global copy) — FedLAMA's layer discrepancy relative to its progress.

If the workers only differed by noise, the spread would grow like ``P`` steps and the progress
like ``P^2``, so ``r = x / P``; a systematic (non-IID) difference grows like ``P^2`` too. The
*harmful drift* ``h = r * b`` keeps the systematic share ``b = (r P / x - 1) / (P - 1)`` in
[0, 1]: it is scale-free (a ratio within the layer, against the layer's own noise), so one
threshold serves every layer. The rule, per region, once per fresh average:

* ``h > hurt``: the divergence hurts. A Full region halves its period; at the base period it
  moves toward Global (Hybrid(p) with p - p_step: the rest of the layer's weights take the global
  gradient every step) when the planned network hides a per-step all-reduce of the layer behind
  the backward pass; a Hybrid region keeps moving down to Global (p = 0).
* ``h < loosen``: the region can speculate more: a Hybrid region moves p up to Full, a Full
  region doubles its period (up to ``max_period`` times the base: FedLAMA's longer periods).
* a Global region has no drift to measure; after ``global_dwell`` control rounds it is probed
  at Hybrid(p_step) and the evidence decides again.

Periods are powers of two times the base period and every average starts on a multiple of its
period, so the averages of different layers nest into one collective (one latency, not many).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..checks import check_int, check_number

FULL, HYBRID, GLOBAL = "full", "hybrid", "global"
STATE_CODE = {GLOBAL: 0, HYBRID: 1, FULL: 2}


def _state_of(p: float) -> str:
    return GLOBAL if p <= 0 else FULL if p >= 1 else HYBRID


@dataclass(frozen=True)
class ManagerConfig:
    hurt: float = 1.0  # harmful drift / progress above which a layer's divergence hurts (tighten)
    loosen: float = 0.25  # below it the layer may speculate more (p up, then a longer period)
    p_step: float = 0.25  # Hybrid(p) moves by this much per decision
    initial_p: float = 0.5  # every region starts Hybrid(0.5), as the original specification does
    max_period: int = 8  # a Full region's period is at most this many base periods
    global_dwell: int = 4  # control rounds a Global region stays before it is probed again
    fast: float = 0.5  # EMA decay of the fast averages (per control round)
    slow: float = 0.9  # EMA decay of the slow averages, of the noise estimates and of the drift

    def __post_init__(self) -> None:
        for name in ("hurt", "loosen"):
            check_number(f"ManagerConfig.{name}", getattr(self, name), 0, open_low=True)
        if not self.loosen < self.hurt:
            raise ValueError(f"ManagerConfig.loosen must be < hurt, got loosen={self.loosen!r} hurt={self.hurt!r}")
        check_number("ManagerConfig.initial_p", self.initial_p, 0, 1)
        check_number("ManagerConfig.p_step", self.p_step, 0, 1, open_low=True)
        for name in ("max_period", "global_dwell"):
            check_int(f"ManagerConfig.{name}", getattr(self, name), 1)
        if self.max_period & (self.max_period - 1):
            raise ValueError(f"ManagerConfig.max_period must be a power of two, got {self.max_period!r}")
        for name in ("fast", "slow"):
            check_number(f"ManagerConfig.{name}", getattr(self, name), 0, 1, open_high=True)


@dataclass
class RegionStats:
    """One control round's all-reduced statistics, per region (numpy, host)."""

    loss: float
    grad_norm: np.ndarray  # (R,) norm of the workers' mean gradient (sketched)
    variance: np.ndarray  # (R,) gradient noise fraction over time, in [0, 1]
    divergence: np.ndarray  # (R,) share of gradient energy the workers disagree on, in [0, 1]
    convergence: np.ndarray  # (R,) relative fall per round of loss and gradient-norm EMAs
    drift: np.ndarray  # (R,) harmful drift h per period (NaN until the region was averaged)


@dataclass
class RegionManager:
    """Decides each region's speculative fraction ``p`` (Full = 1, Global = 0, Hybrid between) and
    its sync period in base periods (``mult``, a power of two).

    ``global_ok`` (R,) says where the planned network hides a per-step all-reduce of the region;
    elsewhere a region never goes below Full (a Hybrid part would cost a latency every step).
    """

    names: list[str]
    config: ManagerConfig = field(default_factory=ManagerConfig)
    global_ok: np.ndarray | None = None

    def __post_init__(self) -> None:
        r = len(self.names)
        self.global_ok = np.ones(r, bool) if self.global_ok is None else np.asarray(self.global_ok, bool)
        if self.global_ok.shape != (r,):
            raise ValueError(f"RegionManager.global_ok must have shape ({r},), got {self.global_ok.shape}")
        self.p = np.full(r, self.config.initial_p)
        self.state = [_state_of(self.config.initial_p)] * r
        self.mult = np.ones(r, dtype=int)
        self.drift = np.full(r, np.nan)  # EMA of the harmful drift h
        self.bias = np.full(r, np.nan)  # EMA of the systematic share b of the drift, in [0, 1]
        self.spread = np.full(r, np.nan)  # EMA of the workers' spread per step (reconciliation's scale)
        self._noise = np.full(r, np.nan)  # EMA of the per-step disagreement x
        self._fresh = np.zeros(r, bool)  # averaged since the last decision
        self._dwell = np.zeros(r, dtype=int)
        self._ema: dict[str, np.ndarray | torch.Tensor] = {}
        self.history: list[dict] = []  # one entry per control round, for plots and tests

    def _ema_update(self, key: str, value, decay: float):
        old = self._ema.get(key)
        self._ema[key] = value if old is None else decay * old + (1 - decay) * value
        return self._ema[key]

    @staticmethod
    def _blend(old: np.ndarray, new: np.ndarray, decay: float) -> np.ndarray:
        return np.where(np.isfinite(old), decay * old + (1 - decay) * new, new)

    def observe(self, sketch_mean: torch.Tensor, sketch_sq: torch.Tensor, loss: float) -> RegionStats:
        """Turn all-reduced gradient sketches into :class:`RegionStats` and update the EMAs.

        Args:
            sketch_mean: (R, m) the workers' mean gradient sketch.
            sketch_sq: (R,) the workers' mean squared sketch norm.
            loss: the workers' mean loss.
        """
        cfg = self.config
        mean_sq = sketch_mean.pow(2).sum(1)  # (R,)
        div = (1 - mean_sq / sketch_sq.clamp_min(1e-30)).clamp(0, 1)
        m1 = self._ema_update("s", sketch_mean, cfg.slow)
        m2 = self._ema_update("s2", mean_sq, cfg.slow)
        var = (1 - m1.pow(2).sum(1) / m2.clamp_min(1e-30)).clamp(0, 1)
        gnorm = mean_sq.sqrt()
        host = torch.stack([div, var, gnorm]).double().cpu().numpy()  # the round's one host copy
        div, var, gnorm = host
        x = div / np.maximum(1 - div, 1e-6)  # disagreement / progress per step
        self._noise = self._blend(self._noise, x, cfg.slow)
        rates = []
        for key, v in (("loss", np.array([loss])), ("g", gnorm)):
            f = self._ema_update(key + "_fast", v, cfg.fast)
            s = self._ema_update(key + "_slow", v, cfg.slow)
            rates.append((s - f) / np.maximum(np.abs(s), 1e-12))
        conv = 0.5 * (rates[0] + rates[1])
        return RegionStats(float(loss), gnorm, var, div, conv, self.drift.copy())

    def observe_sync(self, regions: np.ndarray, spread: np.ndarray, progress: np.ndarray,
                     steps: np.ndarray) -> None:
        """Evidence from one weight average of ``regions``.

        Args:
            regions: (n,) the regions averaged.
            spread: (n,) mean over workers of |u_w - mean u|^2 (u: weights - last global copy).
            progress: (n,) |mean u|^2, the averaged update's squared length.
            steps: (n,) local steps since the region's previous average.
        """
        cfg = self.config
        steps = np.maximum(np.asarray(steps, float), 1.0)
        r = spread / np.maximum(progress, 1e-30)
        x = self._noise[regions]
        x = np.where(np.isfinite(x) & (x > 0), x, r * steps)  # no sketch yet: count it all as bias
        bias = np.where(steps > 1, (r * steps / x - 1) / np.maximum(steps - 1, 1), 1.0)
        bias = np.clip(bias, 0.0, 1.0)
        h = r * bias
        ok = np.isfinite(h)
        self.bias[regions[ok]] = self._blend(self.bias[regions[ok]], bias[ok], cfg.fast)
        self.drift[regions[ok]] = self._blend(self.drift[regions[ok]], h[ok], cfg.fast)
        self.spread[regions] = self._blend(self.spread[regions], spread / steps, cfg.slow)
        self._fresh[regions] = True

    def decide(self, stats: RegionStats) -> np.ndarray:
        """Apply the rule to every region with fresh evidence; return the new ``p`` (R,)."""
        cfg = self.config
        measured = self.drift[np.isfinite(self.drift)]
        typical = float(np.median(measured)) if len(measured) else np.nan  # the layers' median drift
        for r in range(len(self.names)):
            if self.state[r] == GLOBAL:
                self._dwell[r] += 1
                if self._dwell[r] >= cfg.global_dwell:  # probe: speculate a little, measure again
                    self.p[r], self.drift[r] = cfg.p_step, np.nan
                continue
            if not self._fresh[r] or not np.isfinite(self.drift[r]):
                continue
            h = self.drift[r]
            if h > cfg.hurt and not h < typical:  # hurts, and among the worse half of the layers
                if self.state[r] == FULL and self.mult[r] > 1:
                    self.mult[r] //= 2
                elif self.global_ok[r]:
                    self.p[r] -= cfg.p_step
                elif self.state[r] == HYBRID:  # a per-step part is not affordable here
                    self.p[r] = 1.0
            elif h < cfg.loosen or h < cfg.loosen * typical:  # small, or small against the other layers
                if self.state[r] == FULL:
                    self.mult[r] = min(2 * self.mult[r], cfg.max_period)
                else:
                    self.p[r] += cfg.p_step
            elif self.state[r] == HYBRID and not self.global_ok[r]:
                self.p[r] = 1.0
            self._fresh[r] = False
        self.p = np.round(np.clip(self.p, 0.0, 1.0), 6)
        for r in range(len(self.names)):
            new = _state_of(self.p[r])
            if new != self.state[r]:
                self._dwell[r] = 0
                if new != FULL:
                    self.mult[r] = 1
            self.state[r] = new
        self.history.append(dict(loss=stats.loss, p=self.p.copy(), state=list(self.state),
                                 mult=self.mult.copy(), drift=self.drift.copy(),
                                 variance=stats.variance, divergence=stats.divergence,
                                 convergence=stats.convergence, grad_norm=stats.grad_norm))
        return self.p.copy()
