"""adaptive_kit.anomaly: SeriesConfig validation and each SeriesMonitor rule on hand-built series."""
from __future__ import annotations

import math

import numpy as np
import pytest

from adaptive_kit.anomaly import Alarm, SeriesConfig, SeriesMonitor


def feed(monitor: SeriesMonitor, values, start: int = 0) -> list[Alarm]:
    out: list[Alarm] = []
    for i, v in enumerate(values, start=start):
        out.extend(monitor.update(i, float(v)))
    return out


def of(alarms: list[Alarm], detector: str) -> list[Alarm]:
    return [a for a in alarms if a.detector == detector]


# ------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("field, value", [
    ("warmup", 0), ("warmup", -3), ("warmup", 2.5), ("warmup", True),
    ("diverge_patience", 0), ("plateau_window", 0), ("plateau_window", "50"),
    ("beta", 0.0), ("beta", 1.0), ("beta", 1.5), ("beta", math.nan),
    ("spike_sigmas", 0.0), ("spike_ratio", -1.0), ("diverge_ratio", math.nan), ("plateau_stall", 0.0),
    ("plateau_min_progress", -1.0), ("plateau_floor", 0.0), ("spike_patience", 0),
])
def test_series_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SeriesConfig\.{field}\b") as err:
        SeriesConfig(**{field: value})
    assert repr(value) in str(err.value)


def test_series_config_defaults_are_valid_and_frozen():
    c = SeriesConfig()
    assert (c.warmup, c.beta, c.spike_sigmas, c.spike_ratio) == (10, 0.9, 6.0, 2.0)
    with pytest.raises(AttributeError):
        c.warmup = 3  # type: ignore[misc]


# ------------------------------------------------------------------------------- nonfinite
def test_nonfinite_fires_every_time_and_leaves_the_baseline_alone():
    m = SeriesMonitor("loss")
    feed(m, [2.0, 1.0])
    ema, n = m.ema, m.n
    alarms = feed(m, [math.nan, math.inf, -math.inf, math.nan], start=2)
    assert [a.detector for a in alarms] == ["nonfinite"] * 4
    assert [a.step for a in alarms] == [2, 3, 4, 5]
    assert all(a.kind == "loss" and a.layer == "" and a.level == "scalar" for a in alarms)
    assert math.isnan(alarms[0].value) and alarms[1].value == math.inf
    assert (m.ema, m.n) == (ema, n)  # NaN never poisons the EMA


def test_ema_matches_a_hand_computed_oracle():
    m = SeriesMonitor("x", SeriesConfig(beta=0.5))
    feed(m, [4.0, 2.0, 6.0])
    # ema: 4 -> 3 -> 4.5; var: 0 -> 0.5*(0 + 0.5*4) = 1 -> 0.5*(1 + 0.5*9) = 2.75
    assert m.ema == pytest.approx(4.5)
    assert m.ema_var == pytest.approx(2.75)
    assert m.n == 3


# ------------------------------------------------------------------------------- spike
def test_spike_fires_on_a_sustained_tenfold_jump_and_stays_out_of_the_baseline():
    rng = np.random.default_rng(0)
    series = 1.0 + 0.01 * rng.standard_normal(30)
    m = SeriesMonitor("loss")  # spike_patience = 2
    assert feed(m, series) == []
    ema = m.ema
    assert feed(m, [10 * series[-1]], start=30) == []  # one odd batch is not a fault ...
    alarms = feed(m, [10 * series[-1]], start=31)  # ... two in a row are
    assert [a.detector for a in alarms] == ["spike"]
    assert alarms[0].step == 31 and alarms[0].value == pytest.approx(10 * series[-1])
    assert m.ema == ema  # the spike is not folded into the baseline
    assert feed(m, [10 * series[-1]], start=32) == []  # fires once per run of outliers


def test_a_single_outlier_fires_with_patience_one():
    m = SeriesMonitor("loss", SeriesConfig(spike_patience=1))
    feed(m, [1.0] * 20)
    assert of(feed(m, [10.0], start=20), "spike") != []


def test_spike_does_not_fire_during_warmup():
    m = SeriesMonitor("loss", SeriesConfig(warmup=10))
    assert feed(m, [1.0, 1.0, 1.0, 50.0, 1.0]) == []


def test_spike_needs_both_the_z_score_and_the_ratio():
    # a 1.5x jump on a perfectly flat series is many sigmas but below spike_ratio = 2
    m = SeriesMonitor("loss", SeriesConfig(spike_patience=1))
    feed(m, [1.0] * 20)
    assert of(feed(m, [1.5], start=20), "spike") == []
    assert of(feed(m, [2.5], start=21), "spike") != []


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_spike_is_silent_on_a_noisy_random_walk(seed):
    rng = np.random.default_rng(seed)
    walk = np.exp(np.cumsum(0.05 * rng.standard_normal(500)))  # positive, multiplicative noise
    m = SeriesMonitor("loss")
    alarms = feed(m, walk)
    assert of(alarms, "spike") == []
    assert of(alarms, "nonfinite") == []


# ------------------------------------------------------------------------------- divergence
def divergence_oracle(values, c: SeriesConfig) -> tuple[list[int], list[float]]:
    """Steps at which the EMA has been above diverge_ratio x best EMA for exactly patience
    steps, and the EMA after every step (for series without spikes or non-finite values)."""
    ema, best, above, fired, emas = None, math.inf, 0, [], []
    for i, v in enumerate(values):
        warm = i >= c.warmup  # no spikes in these series, so n == i
        ema = v if ema is None else c.beta * ema + (1 - c.beta) * v
        emas.append(ema)
        if warm:
            best = min(best, ema)
            above = above + 1 if ema > c.diverge_ratio * best else 0
            if above == c.diverge_patience:
                fired.append(i)
    return fired, emas


def test_divergence_fires_once_after_patience_steps_above_ratio():
    c = SeriesConfig(plateau_window=1000)
    series = [1.0] * 20 + [1.05 ** k for k in range(1, 60)]  # grows, never a 2x jump
    m = SeriesMonitor("loss", c)
    alarms = feed(m, series)
    div = of(alarms, "divergence")
    expected, emas = divergence_oracle(series, c)
    assert len(expected) == 1
    assert [a.step for a in div] == expected
    assert div[0].value == pytest.approx(emas[expected[0]])
    assert div[0].value > c.diverge_ratio * 1.0
    assert of(alarms, "spike") == []


def test_divergence_needs_patience_consecutive_steps():
    c = SeriesConfig(warmup=2, beta=0.1, diverge_patience=5, plateau_window=1000, spike_ratio=100.0)
    # the EMA (almost the value itself with beta = 0.1) is above 3x best for 3 steps at a time
    bursts = [1.0, 1.0, 1.0] + [10.0, 10.0, 10.0, 1.0, 1.0] * 3
    m = SeriesMonitor("x", c)
    assert of(feed(m, bursts), "divergence") == []
    assert divergence_oracle(bursts, c)[0] == []
    # five in a row is enough, and fires exactly once
    alarms = feed(m, [10.0] * 8, start=len(bursts))
    assert [a.step for a in of(alarms, "divergence")] == [len(bursts) + 4]


# ------------------------------------------------------------------------------- plateau
def test_plateau_fires_once_when_progress_stalls_and_rearms_after_progress():
    c = SeriesConfig(warmup=2, beta=0.5, plateau_window=5, plateau_floor=1e-4)
    m = SeriesMonitor("loss", c)
    falling = [2.0 * 0.9**k for k in range(20)]  # steady 10 % progress per step
    assert of(feed(m, falling), "plateau") == []
    stuck = [falling[-1]] * 20  # the learning rate collapsed: no progress at all
    plateaus = of(feed(m, stuck, start=20), "plateau")
    assert len(plateaus) == 1 and 20 < plateaus[0].step <= 20 + 2 * c.plateau_window
    assert plateaus[0].value < 0.05  # the EMA barely moved over the last window
    # progress re-arms the rule; a second stall fires again, once
    again = [falling[-1] * 0.9**k for k in range(1, 21)] + [falling[-1] * 0.9**20] * 20
    assert len(of(feed(m, again, start=40), "plateau")) == 1


def test_plateau_stays_silent_once_converged_below_the_floor():
    c = SeriesConfig(warmup=2, beta=0.5, plateau_window=5, plateau_floor=0.1)
    m = SeriesMonitor("loss", c)
    converged = [2.0 * 0.7**k for k in range(20)] + [2.0 * 0.7**19] * 30  # ends at 0.0023
    assert of(feed(m, converged), "plateau") == []


def test_plateau_stays_silent_while_the_series_improves():
    c = SeriesConfig(warmup=2, plateau_window=5)
    m = SeriesMonitor("loss", c)
    assert of(feed(m, [1.0 / (1 + k) for k in range(100)]), "plateau") == []
