"""Utilisation forecasts: statsmodels ETS refit online, with intervals, judged against naive ones.

:class:`Forecaster` keeps a sliding window of observations; it refits an additive-error ETS model
(statsmodels ``ETSModel``; damped trend and additive season optional) every ``refit_every``
observations, warm-started from the last parameters, and between refits only filters the new
data with the fitted parameters (milliseconds). :func:`rolling_origin` evaluates it one origin at
a time against the naive (last value) and seasonal-naive forecasts, and :func:`mase` scores all
three by the mean absolute scaled error (below 1: better than the in-sample naive forecast).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from ..checks import check_int


@dataclass(frozen=True)
class ForecastConfig:
    season: int = 0  # seasonal period in observations (0: none)
    trend: bool = True  # a damped additive trend
    window: int = 200  # observations kept at each refit (the window grows until the next one)
    refit_every: int = 25  # observations between parameter fits (filtering only in between)
    level: float = 0.9  # prediction-interval coverage
    min_history: int = 12  # below this, forecast the last value

    def __post_init__(self) -> None:
        for name, lo in (("season", 0), ("window", 4), ("refit_every", 1), ("min_history", 2)):
            check_int(f"ForecastConfig.{name}", getattr(self, name), lo)
        if self.season == 1:
            raise ValueError("ForecastConfig.season must be 0 (none) or >= 2, got 1")
        if not 0 < self.level < 1:
            raise ValueError(f"ForecastConfig.level must be in (0, 1), got {self.level!r}")
        if self.season and self.window < 2 * self.season + 2:
            raise ValueError(f"ForecastConfig.window={self.window} must hold two seasons "
                             f"(>= {2 * self.season + 2})")


@dataclass(frozen=True)
class Forecast:
    mean: np.ndarray  # (h,)
    lower: np.ndarray  # (h,) interval at ForecastConfig.level
    upper: np.ndarray  # (h,)


class Forecaster:
    """Online ETS forecasts of one utilisation series."""

    def __init__(self, config: ForecastConfig = ForecastConfig()) -> None:
        self.config = config
        self.history: list[float] = []
        self.params: np.ndarray | None = None
        self.fits = 0  # how many times parameters were estimated
        self._since_fit = 0

    def update(self, value: float) -> None:
        """Add one observation.

        Raises:
            ValueError: ``value`` is not finite.
        """
        if not np.isfinite(value):
            raise ValueError(f"Forecaster.update(value={value!r}): expected a finite number")
        self.history.append(float(value))
        self._since_fit += 1

    def reset(self) -> None:
        """Forget the observations (the series changed regime); fitted parameters warm the next fit."""
        self.history.clear()
        self._since_fit = self.config.refit_every

    def _model(self, y: pd.Series):
        from statsmodels.tsa.exponential_smoothing.ets import ETSModel

        cfg = self.config
        seasonal = cfg.season and len(y) >= 2 * cfg.season + 2
        return ETSModel(y, error="add", trend="add" if cfg.trend else None, damped_trend=cfg.trend,
                        seasonal="add" if seasonal else None,
                        seasonal_periods=cfg.season if seasonal else None)

    def forecast(self, h: int = 1) -> Forecast:
        """The next ``h`` values with their prediction interval."""
        check_int("Forecaster.forecast: h", h, 1)
        cfg = self.config
        refit = self.params is None or self._since_fit >= cfg.refit_every
        if refit:  # the window slides only at a refit: the fitted initial states belong to its start
            del self.history[: -cfg.window]
        y = np.asarray(self.history)
        if len(y) < cfg.min_history:
            last = y[-1] if len(y) else 0.0
            spread = np.std(np.diff(y)) * np.sqrt(np.arange(1, h + 1)) if len(y) > 2 else np.full(h, np.inf)
            z = _z(cfg.level)
            return Forecast(np.full(h, last), last - z * spread, last + z * spread)
        series = pd.Series(y)
        model = self._model(series)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter on short or flat windows
            if refit or len(self.params) != len(model.start_params):
                start = self.params if self.params is not None and len(self.params) == len(model.start_params) else None
                res = model.fit(start_params=start, disp=False, maxiter=200)
                self.params, self._since_fit = np.asarray(res.params), 0
                self.fits += 1
            else:
                res = model.smooth(self.params)
            frame = res.get_prediction(start=len(y), end=len(y) + h - 1).summary_frame(alpha=1 - cfg.level)
        return Forecast(frame["mean"].to_numpy(), frame["pi_lower"].to_numpy(), frame["pi_upper"].to_numpy())


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


def rolling_origin(series: np.ndarray, config: ForecastConfig = ForecastConfig(), start: int = 50,
                   horizon: int = 1) -> pd.DataFrame:
    """One-origin-at-a-time evaluation: at each origin t >= ``start``, forecast t + horizon - 1.

    Returns:
        DataFrame with ``t``, ``actual``, ``ets``, ``lower``, ``upper``, ``naive`` and
        ``seasonal_naive`` (the naive one when there is no season).

    Raises:
        ValueError: ``start`` leaves no origin, or the series is not finite.
    """
    y = np.asarray(series, dtype=float)
    if not np.all(np.isfinite(y)):
        raise ValueError("rolling_origin: the series has non-finite values")
    if not 2 <= start <= len(y) - horizon:
        raise ValueError(f"rolling_origin(start={start}): expected 2 <= start <= {len(y) - horizon}")
    f = Forecaster(config)
    for v in y[:start]:
        f.update(v)
    m = config.season or 1
    rows = []
    for t in range(start, len(y) - horizon + 1):
        fc = f.forecast(horizon)
        target = t + horizon - 1
        seasonal = y[target - m * int(np.ceil(horizon / m))] if m > 1 else y[t - 1]
        rows.append(dict(t=target, actual=y[target], ets=fc.mean[-1], lower=fc.lower[-1], upper=fc.upper[-1],
                         naive=y[t - 1], seasonal_naive=seasonal))
        f.update(y[t])
    return pd.DataFrame(rows)


def mase(frame: pd.DataFrame, series: np.ndarray, season: int = 0) -> dict[str, float]:
    """Mean absolute scaled error of every forecast column of ``frame`` (from :func:`rolling_origin`),
    scaled by the in-sample one-step (seasonal) naive error of ``series`` before the first origin."""
    y = np.asarray(series, dtype=float)[: int(frame["t"].iloc[0])]
    m = season or 1
    scale = np.mean(np.abs(y[m:] - y[:-m]))
    if not scale > 0:
        raise ValueError("mase: the in-sample naive error is 0 (a constant series); MASE is undefined")
    return {c: float(np.mean(np.abs(frame[c] - frame["actual"])) / scale)
            for c in ("ets", "naive", "seasonal_naive")}
