"""The utilisation forecaster against naive forecasts, by rolling origin."""
import numpy as np
import pytest

from adaptive_kit.partition.forecast import ForecastConfig, Forecaster, mase, rolling_origin


def utilisation(n=300, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 0.5 + 0.0008 * t + 0.1 * np.sin(2 * np.pi * t / 8) + rng.normal(0, 0.03, n)


def test_seasonal_ets_beats_both_naive_forecasts_with_calibrated_intervals():
    y = utilisation()
    cfg = ForecastConfig(season=8)
    frame = rolling_origin(y, cfg, start=150)
    scores = mase(frame, y, season=8)
    assert scores["ets"] < 0.85 and scores["ets"] < scores["seasonal_naive"] < scores["naive"]
    coverage = ((frame.actual >= frame.lower) & (frame.actual <= frame.upper)).mean()
    assert 0.75 <= coverage <= 0.99  # nominal 0.9


def test_refits_only_every_refit_every_observations():
    f = Forecaster(ForecastConfig(refit_every=10, trend=False))
    for v in utilisation(60):
        f.update(v)
        f.forecast()
    # the first fit comes at min_history, then one per 10 observations
    assert 4 <= f.fits <= 6
    fc = f.forecast(3)
    assert fc.mean.shape == (3,) and np.all(fc.lower <= fc.mean) and np.all(fc.mean <= fc.upper)
    assert np.all(np.diff(fc.upper - fc.lower) >= -1e-12)  # intervals widen with the horizon


def test_short_history_forecasts_the_last_value():
    f = Forecaster()
    for v in (1.0, 2.0, 4.0):
        f.update(v)
    fc = f.forecast(2)
    assert fc.mean.tolist() == [4.0, 4.0] and f.fits == 0


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(season=1), "season must be 0"), (dict(level=1.0), "level must be in"),
    (dict(refit_every=0), "refit_every must be an int >= 1"),
    (dict(season=50, window=60), "must hold two seasons"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ForecastConfig(**kwargs)


def test_bad_values():
    with pytest.raises(ValueError, match="expected a finite number"):
        Forecaster().update(float("nan"))
    with pytest.raises(ValueError, match="h must be an int >= 1, got 0"):
        Forecaster().forecast(0)
    with pytest.raises(ValueError, match="start=1"):
        rolling_origin(utilisation(20), start=1)
    with pytest.raises(ValueError, match="non-finite"):
        rolling_origin(np.array([1.0, np.nan, 2.0, 3.0]), start=2)
    frame = rolling_origin(np.ones(30), ForecastConfig(trend=False), start=20)
    with pytest.raises(ValueError, match="constant series"):
        mase(frame, np.ones(30))
