"""The Region Manager: per-region statistics and the seed's Full / Hybrid(p) / Global rule set.

Every input is an all-reduced quantity, so every worker reaches the same decision with no extra
message. Statistics per region, from a count sketch of each worker's gradient:

* convergence rate: mean of the relative fall of a fast against a slow EMA of the loss and of
  the region's gradient norm (positive while it still improves);
* gradient variance: the noise fraction ``1 - |EMA(s)|^2 / EMA(|s|^2)`` of the averaged
  gradient's sketch over time, in [0, 1];
* inter-worker divergence: ``1 - |mean_w s_w|^2 / mean_w |s_w|^2``, the share of gradient energy
  on which workers disagree, in [0, 1 - 1/K].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

FULL, HYBRID, GLOBAL = "full", "hybrid", "global"
STATE_CODE = {GLOBAL: 0, HYBRID: 1, FULL: 2}


def _unit(name: str, v: float) -> None:
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"ManagerConfig.{name} must be in [0, 1], got {v!r}")


@dataclass(frozen=True)
class ManagerConfig:
    conv_threshold: float = 0.02  # convergence rate below it counts as slow, above as fast
    var_threshold: float = 0.5  # gradient noise fraction: above = high variance, below = low
    div_threshold: float = 0.3  # inter-worker divergence: above = high, below = low
    var_medium: float = 0.5  # Hybrid: p += p_step while variance is above it, -= below
    p_step: float = 0.1  # the seed's +-0.1
    initial_p: float = 0.5  # the seed starts every region Hybrid(0.5)
    patience: int = 3  # control rounds a new state must be indicated before it is taken
    fast: float = 0.5  # EMA decay of the fast averages (per control round)
    slow: float = 0.9  # EMA decay of the slow averages and of the variance estimate

    def __post_init__(self) -> None:
        for name in ("var_threshold", "div_threshold", "var_medium", "initial_p"):
            _unit(name, getattr(self, name))
        if not -1.0 <= self.conv_threshold <= 1.0:
            raise ValueError(f"ManagerConfig.conv_threshold must be in [-1, 1], got {self.conv_threshold!r}")
        if not 0.0 < self.p_step <= 1.0:
            raise ValueError(f"ManagerConfig.p_step must be in (0, 1], got {self.p_step!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"ManagerConfig.patience must be an int >= 1, got {self.patience!r}")
        for name in ("fast", "slow"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ManagerConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")


@dataclass
class RegionStats:
    """One control round's all-reduced statistics, per region (numpy, host)."""

    loss: float
    grad_norm: np.ndarray  # (R,) norm of the workers' mean gradient (sketched)
    variance: np.ndarray  # (R,) gradient noise fraction over time
    divergence: np.ndarray  # (R,) share of gradient energy the workers disagree on
    convergence: np.ndarray  # (R,) relative fall per round of loss and gradient-norm EMAs


@dataclass
class RegionManager:
    """Decides each region's speculative fraction ``p`` (Full = 1, Global = 0, Hybrid between)."""

    names: list[str]
    config: ManagerConfig = field(default_factory=ManagerConfig)

    def __post_init__(self) -> None:
        r = len(self.names)
        self.p = np.full(r, self.config.initial_p)
        self.state = [GLOBAL if self.config.initial_p == 0 else FULL if self.config.initial_p == 1
                      else HYBRID] * r
        self._streak = np.zeros(r, dtype=int)
        self._candidate = list(self.state)
        self._ema: dict[str, np.ndarray | torch.Tensor] = {}
        self.history: list[dict] = []  # one entry per control round, for plots and tests

    def _ema_update(self, key: str, value, decay: float):
        old = self._ema.get(key)
        self._ema[key] = value if old is None else decay * old + (1 - decay) * value
        return self._ema[key]

    def observe(self, sketch_mean: torch.Tensor, sketch_sq: torch.Tensor, loss: float) -> RegionStats:
        """Turn all-reduced sketches into :class:`RegionStats` and update the EMAs.

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
        rates = []
        for key, v in (("loss", np.array([loss])), ("g", gnorm)):
            f = self._ema_update(key + "_fast", v, cfg.fast)
            s = self._ema_update(key + "_slow", v, cfg.slow)
            rates.append((s - f) / np.maximum(np.abs(s), 1e-12))
        conv = 0.5 * (rates[0] + rates[1])
        return RegionStats(float(loss), gnorm, var, div, conv)

    def decide(self, stats: RegionStats) -> np.ndarray:
        """Apply the seed's rules with hysteresis; return the new ``p`` per region (R,)."""
        cfg = self.config
        full = (stats.convergence < cfg.conv_threshold) & (stats.variance > cfg.var_threshold) & (
            stats.divergence > cfg.div_threshold)
        glob = (stats.convergence > cfg.conv_threshold) & (stats.variance < cfg.var_threshold) & (
            stats.divergence < cfg.div_threshold)
        warm = len(self.history) >= cfg.patience  # before that the EMAs are cold: hold
        for r in range(len(self.names) if warm else 0):
            cand = FULL if full[r] else GLOBAL if glob[r] else HYBRID
            self._streak[r] = self._streak[r] + 1 if cand == self._candidate[r] else 1
            self._candidate[r] = cand
            if cand != self.state[r] and self._streak[r] >= cfg.patience:
                self.state[r] = cand
                if cand != HYBRID:
                    self.p[r] = 1.0 if cand == FULL else 0.0
            if self.state[r] == HYBRID:
                if stats.variance[r] > cfg.var_medium:
                    self.p[r] = min(1.0, self.p[r] + cfg.p_step)
                elif stats.variance[r] < cfg.var_medium:
                    self.p[r] = max(0.0, self.p[r] - cfg.p_step)
        self.p = np.round(self.p, 6)
        self.history.append(dict(loss=stats.loss, p=self.p.copy(), state=list(self.state),
                                 variance=stats.variance, divergence=stats.divergence,
                                 convergence=stats.convergence, grad_norm=stats.grad_norm))
        return self.p.copy()
