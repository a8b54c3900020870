"""Telemetry detectors: observations() at every level against numpy, each rule on hand-built
Observation series (a layer judged against its own history: a naturally imbalanced net is no
alarm, a jump is, once, after ``confirm`` looks), the suite, and end to end on digits."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_kit.anomaly import Alarm, SeriesConfig
from adaptive_kit.datasets import digits
from adaptive_kit.stats import STAT_NAMES, batched_stats
from adaptive_kit.telemetry import (
    LEVELS,
    DetectorSuite,
    Observation,
    StepRecord,
    Telemetry,
    TelemetryConfig,
    observations,
)
from adaptive_kit.telemetry.collector import aggregate, materialise
from adaptive_kit.telemetry.detectors import (
    ActivationScaleDetector,
    Baseline,
    DeadReLUDetector,
    Detector,
    GradientRatioDetector,
    LossDetector,
    LossShiftDetector,
    NonFiniteDetector,
    ScaleDetector,
    SelfReferencedDetector,
    WeightDriftDetector,
    WeightProgressDetector,
)
from adaptive_kit.telemetry.faults import Fault, FaultInjector
from adaptive_kit.telemetry.observations import _from_sample, complete_macro, pool_rows
from adaptive_kit.training import mlp


def ob(kind: str = "grad", layer: str = "0", level: str = "meso", *, count: int = 100,
       norm: float = 1.0, nonfinite: float = 0, zero_frac: float = 0.0, mean: float = 0.0,
       std: float = 1.0, lo: float = -1.0, hi: float = 1.0) -> Observation:
    return Observation(kind, layer, level, count, mean, std, lo, hi, norm, nonfinite, zero_frac)


def scaled(kind: str, layer: str, rms: float, level: str = "meso") -> Observation:
    """An observation of 100 finite entries with this RMS (norm = rms * sqrt(100))."""
    return ob(kind, layer, level, count=100, norm=rms * 10.0)


def run(detector: Detector, per_step: list[list[Observation]], losses=None, steps=None) -> list[Alarm]:
    out: list[Alarm] = []
    steps = range(len(per_step)) if steps is None else steps
    for i, (step, obs) in enumerate(zip(steps, per_step)):
        out.extend(detector.update(step, obs, None if losses is None else losses[i]))
    return out


def record_of(tensors: dict[tuple[str, str], torch.Tensor], level: str,
              config: TelemetryConfig | None = None, loss: float | None = None) -> StepRecord:
    """The StepRecord the collector makes of these tensors at ``level`` (step 5)."""
    items = [(k, n, level, [t]) for (k, n), t in tensors.items()]
    return materialise(aggregate(5, items, config or TelemetryConfig(),
                                 None if loss is None else torch.tensor(loss)))


# ---------------------------------------------------------------------------- observations
def sample_tensors() -> dict[tuple[str, str], torch.Tensor]:
    torch.manual_seed(0)
    g = torch.randn(1000)
    g[::7] = 0.0
    g[3], g[500], g[998] = math.nan, math.inf, -math.inf
    return {("grad", "0"): g, ("act", "1"): torch.relu(torch.randn(37, 11))}


@pytest.mark.parametrize("level", ["meso", "macro"])
def test_observations_of_stats_rows_are_the_exact_statistics(level):
    tensors = sample_tensors()
    obs = observations(record_of(tensors, level, loss=0.5))
    losses = [o for o in obs if o.kind == "loss"]  # the logged loss may travel as a row too
    assert all((o.count, o.mean, o.nonfinite) == (1, 0.5, 0) for o in losses) and len(losses) <= 1
    obs = [o for o in obs if o.kind != "loss"]
    assert len(obs) == 2
    for o in obs:
        layer = "*" if level == "macro" else {"grad": "0", "act": "1"}[o.kind]
        assert (o.layer, o.level) == (layer, level)
        t = tensors[("grad", "0")] if o.kind == "grad" else tensors[("act", "1")]
        oracle = batched_stats([t])[0].numpy()
        got = np.array([getattr(o, n) for n in STAT_NAMES], dtype=np.float64)
        np.testing.assert_allclose(got, oracle, rtol=1e-6)
    grad = next(o for o in obs if o.kind == "grad")
    assert grad.nonfinite == 3 and grad.count == 1000
    assert grad.rms == pytest.approx(grad.norm / math.sqrt(997))


def sample_oracle(v: np.ndarray, count: int) -> dict[str, float]:
    """What a sample of ``count`` entries estimates: stats of its finite values, counts scaled."""
    fin = v[np.isfinite(v)]
    scale = count / v.size
    return {"mean": fin.mean(), "std": fin.std(), "min": fin.min(), "max": fin.max(),
            "norm": math.sqrt((fin ** 2).sum() * scale), "nonfinite": (~np.isfinite(v)).sum() * scale,
            "zero_frac": (v == 0).mean()}


@pytest.mark.parametrize("level, window, cap", [("raw", 16, 10**6), ("raw", 16, 100), ("micro", 4, 10**6),
                                                ("micro", 3, 40)])
def test_observations_of_sample_levels_carry_the_layer_s_statistics(level, window, cap):
    """Raw and micro rows send the layer's statistics beside the values: exact counts, non-finite
    entries and norm whatever the cap (these tensors are small enough for all to be exact)."""
    tensors = sample_tensors()
    obs = {o.kind: o for o in observations(record_of(tensors, level, TelemetryConfig(window=window, raw_cap=cap)))}
    for kind, t in (("grad", tensors[("grad", "0")]), ("act", tensors[("act", "1")])):
        o = obs[kind]
        assert (o.count, o.layer, o.level) == (t.numel(), "0" if kind == "grad" else "1", level)
        got = np.array([getattr(o, n) for n in STAT_NAMES], dtype=np.float64)
        np.testing.assert_allclose(got, batched_stats([t])[0].numpy(), rtol=1e-6)
    assert obs["grad"].nonfinite == 3


@pytest.mark.parametrize("stride", [1, 7, 10])
def test_rows_of_values_alone_are_summarised_on_the_host_scaled_by_the_true_count(stride):
    g = sample_tensors()[("grad", "0")].numpy().astype(np.float64)
    v = g[::stride]
    o = _from_sample("grad", "0", "raw", g.size, v)
    assert o.count == g.size
    for name, want in sample_oracle(v, g.size).items():
        assert getattr(o, name) == pytest.approx(want, rel=1e-9, abs=1e-12), name
    if stride == 1:  # the full set of values: exact again
        exact = batched_stats([torch.from_numpy(g)])[0].numpy()
        assert o.nonfinite == 3 and o.norm == pytest.approx(exact[5]) and o.zero_frac == pytest.approx(exact[7])
    if stride == 10:  # entries 0, 10, ..., 990: the +Inf at 500 stands for 10
        assert o.nonfinite == 10.0


@pytest.mark.parametrize("level", ["raw", "micro"])
def test_a_finite_loss_at_a_sample_level_is_not_a_non_finite_value(level):
    """The logged loss travels as a statistics row; no level may read it as a non-finite sample."""
    obs = observations(record_of({("grad", "0"): torch.ones(64)}, level, loss=0.5))
    assert all(o.nonfinite == 0 for o in obs)
    assert NonFiniteDetector().update(0, obs, 0.5) == []


def test_observation_of_an_empty_sample_is_nan_not_an_error():
    rec = record_of({("act", "1"): torch.empty(0)}, "raw")
    (o,) = observations(rec)
    assert o.count == 0 and math.isnan(o.mean) and o.norm == 0.0 and math.isnan(o.rms)


# ---------------------------------------------------------------------------- whole-network rows
def stat_obs(kind: str, layer: str, level: str, tensors: list[torch.Tensor]) -> Observation:
    row = batched_stats([torch.cat(tensors)]).numpy()[0]
    return Observation(kind, layer, level, int(row[0]), *(float(v) for v in row[1:]))


def test_complete_macro_pools_whatever_covers_every_layer_into_one_whole_row():
    torch.manual_seed(0)
    t = {n: torch.randn(k) * s for n, k, s in (("a", 50, 1.0), ("b", 30, 1e-3), ("c", 20, 10.0))}
    t["b"][:5] = 0.0
    whole = stat_obs("grad", "*", "macro", list(t.values()))
    layers = {"grad": ["a", "b", "c"]}

    def pooled(obs):
        out = complete_macro(obs, layers)
        return out, [o for o in out if o.layer == "*"]

    # every layer at meso: the meso rows stay, and a whole row is added
    out, star = pooled([stat_obs("grad", n, "meso", [t[n]]) for n in t])
    assert len(out) == 4 and len(star) == 1 and star[0].level == "macro"
    np.testing.assert_allclose([getattr(star[0], n) for n in STAT_NAMES],
                               [getattr(whole, n) for n in STAT_NAMES], rtol=1e-6)
    # one layer looked at closely, the rest in a partial macro row: the same whole
    out, star = pooled([stat_obs("grad", "a", "meso", [t["a"]]),
                        stat_obs("grad", "*", "macro", [t["b"], t["c"]])])
    assert len(out) == 2 and star[0].count == 100
    assert star[0].norm == pytest.approx(whole.norm) and star[0].zero_frac == pytest.approx(0.05)
    # a layer at raw cannot be pooled exactly: the macro row is kept apart as partial
    raw = ob("grad", "a", "raw", norm=3.0)
    out, star = pooled([raw, stat_obs("grad", "*", "macro", [t["b"], t["c"]])])
    assert [o.level for o in star] == ["macro-partial"] and raw in out
    # some layers at meso, the others off: nothing whole to say
    out, star = pooled([stat_obs("grad", "a", "meso", [t["a"]])])
    assert star == [] and len(out) == 1
    assert pool_rows(np.array([[getattr(o, n) for n in STAT_NAMES] for o in out]))[0] == 50


# ---------------------------------------------------------------------------- NonFinite
def test_nonfinite_fires_on_the_rising_edge_and_again_after_recovery():
    seq = [0, 5, 5, 5, 0, 0, 3, 3]
    alarms = run(NonFiniteDetector(), [[ob(nonfinite=k), ob("act", "1")] for k in seq])
    assert [(a.step, a.detector, a.kind, a.layer) for a in alarms] == [
        (1, "nonfinite", "grad", "0"), (6, "nonfinite", "grad", "0")]
    assert alarms[0].value == 5 and alarms[1].value == 3


def test_nonfinite_keeps_an_edge_per_kind_and_layer_and_reports_macro_as_star():
    det = NonFiniteDetector()
    a0 = det.update(0, [ob(nonfinite=1), ob("weight", "0", nonfinite=1), ob("act", "*", "macro", nonfinite=2)], None)
    assert {(a.kind, a.layer, a.level) for a in a0} == {("grad", "0", "meso"), ("weight", "0", "meso"),
                                                       ("act", "*", "macro")}
    assert det.update(1, [ob(nonfinite=1), ob("weight", "2", nonfinite=1)], None)[0].layer == "2"


# ---------------------------------------------------------------------------- gradient ratio
def grads(first_norm: float, last_norm: float, level: str = "meso") -> list[Observation]:
    return [ob("grad", "0", level, norm=first_norm), ob("grad", "2", level, norm=1.0),
            ob("grad", "4", level, norm=last_norm)]


def test_gradient_ratio_rule_at_meso():
    det = GradientRatioDetector("0", "4")
    seq = [grads(1, 1), grads(70, 1), grads(71, 1), grads(500, 1), grads(1, 1), grads(100, 1),
           grads(1e-3, 1), grads(9e-4, 1), grads(1e-6, 1), grads(0.0, 2.0)]
    alarms = run(det, seq)
    assert [(a.step, a.detector) for a in alarms] == [
        (2, "exploding_grad"), (5, "exploding_grad"), (7, "vanishing_grad")]
    assert all(a.layer == "0" and a.kind == "grad" and a.level == "meso/meso" for a in alarms)
    assert alarms[0].value == pytest.approx(71)
    assert alarms[2].value == pytest.approx(9e-4)


@pytest.mark.parametrize("level", ["raw", "micro"])
def test_gradient_ratio_localises_at_sample_levels_too(level):
    alarms = run(GradientRatioDetector("0", "4"), [grads(1, 1, level), grads(1000, 1, level)])
    assert [(a.step, a.detector, a.layer, a.level) for a in alarms] == [
        (1, "exploding_grad", "0", f"{level}/{level}")]


def test_gradient_ratio_never_localises_at_macro_and_uses_the_ema_there():
    det = GradientRatioDetector("0", "4", warmup=10)
    star = [[ob("grad", "*", "macro", norm=1.0)] for _ in range(10)]
    # a jump before the EMA is warm says nothing; named layers at macro never give a ratio
    seq = ([[ob("grad", "*", "macro", norm=1.0)]] * 3 + [[ob("grad", "*", "macro", norm=50.0)]]
           + star[:6] + [grads(1000, 1, "macro") + [ob("grad", "*", "macro", norm=1.0)]]
           + [[ob("grad", "*", "macro", norm=50.0)]] + [[ob("grad", "*", "macro", norm=1e-3)]])
    alarms = run(det, seq)
    assert [(a.step, a.detector, a.layer, a.level) for a in alarms] == [
        (11, "exploding_grad", "*", "macro"), (12, "vanishing_grad", "*", "macro")]
    # the EMA oracle: 1, then beta-weighted (the 50 at step 3 is before warmup, so it is folded in)
    ema = 1.0
    for norm in [1, 1, 50] + [1] * 7:
        ema = 0.9 * ema + 0.1 * norm
    assert alarms[0].value == pytest.approx(50.0 / ema)


# ---------------------------------------------------------------------------- Baseline
def test_baseline_is_holt_level_and_trend_by_hand():
    b = Baseline(beta=0.5, trend_beta=0.5)
    assert b.predict(7) == 0.0  # nothing seen yet
    b.fold(0.0, 0)  # the first value is the level
    b.fold(2.0, 1)  # forecast 0, residual 2: level 1, trend 0.5 (no variance from one residual)
    assert (b.level, b.trend, b.var) == (1.0, 0.5, 0.0)
    b.fold(4.0, 3)  # a gap of 2: forecast 1 + 0.5 * 2 = 2, residual 2: level 3, var 2, trend 0.75
    assert (b.level, b.trend, b.var, b.n, b.step) == (3.0, 0.75, 2.0, 3, 3)
    assert b.predict(5) == 4.5  # the trend carries the level over the gap
    d, z = b.deviation(6.5, 5, floor=0.01)
    assert d == 2.0 and z == pytest.approx(2.0 / math.sqrt(2.0))
    assert b.deviation(5.5, 5, floor=10.0) == (1.0, 0.1)  # the floor bounds the width


@settings(max_examples=40, deadline=None)
@given(slope=st.floats(-1, 1), start=st.floats(-5, 5), gap=st.integers(1, 50))
def test_baseline_of_a_line_learns_its_trend_and_carries_it_over_any_gap(slope, start, gap):
    b = Baseline(0.8)
    for step in range(200):
        b.fold(start + slope * step, step)
    target = start + slope * (199 + gap)
    assert b.predict(199 + gap) == pytest.approx(target, abs=1e-3 * abs(slope) * gap + 1e-9)
    assert b.deviation(target, 199 + gap, floor=1.0)[1] <= 1e-3 * abs(slope) * gap + 1e-9


# ---------------------------------------------------------------------------- self-referenced rules
def scale_detector(**kw) -> ScaleDetector:
    """A gradient-scale rule with its thresholds pinned (the defaults are being tuned)."""
    return ScaleDetector("grad", **{"sigmas": 6.0, "factor": 3.0, "warmup": 5, "confirm": 2, **kw})


@settings(max_examples=60, deadline=None)
@given(level=st.floats(-20, 5), spread=st.floats(0, 0.15), seed=st.integers(0, 2**16),
       length=st.integers(10, 80))
def test_a_steady_series_never_alarms_at_any_spacing_of_looks(level, spread, seed, length):
    """log-RMS within +-spread (< a third of log 3) of a constant, looked at 1 to 5 steps apart."""
    rng = np.random.default_rng(seed)
    det = scale_detector(confirm=1)
    step = 0
    for _ in range(length):
        x = level + spread * rng.choice([-1.0, 1.0, rng.uniform(-1, 1)])
        assert det.update(step, [scaled("grad", "0", math.exp(x))], None) == []
        assert det.pending == set() and det.suspicion.get(("grad", "0"), 0.0) <= 1.0
        step += int(rng.integers(1, 6))


@settings(max_examples=60, deadline=None)
@given(slope=st.floats(-0.1, 0.1), dense=st.integers(10, 40), gap=st.integers(1, 30),
       start=st.floats(-5, 5))
def test_looks_far_apart_on_a_steadily_trending_series_do_not_alarm(slope, dense, gap, start):
    """Statistics drift steadily early in training; a rare look sees a large change that the
    trend predicts (up to 3 log units between looks here: 20x, far beyond the 3x rule), once
    the baseline has seen the trend for a few looks (10 here; 5 to 7 are not enough for the
    steepest of these series)."""
    det = scale_detector(confirm=1, trend=True)  # a baseline with Holt's trend
    steps = list(range(dense)) + list(range(dense - 1 + gap, dense + 40 * gap, gap))
    steps = [s for s in steps if abs(slope * s) < 40]  # RMS within (1e-17, 1e17): no clamping
    alarms = run(det, [[scaled("grad", "0", math.exp(start + slope * s))] for s in steps], steps=steps)
    assert alarms == []


@pytest.mark.parametrize("gap, slope", [(10, 0.2), (30, 0.05), (3, -0.4)])
def test_sparse_looks_from_the_start_on_a_trend_do_not_alarm(gap, slope):
    steps = list(range(0, 40 * gap, gap))  # every look moves 1.2 to 2 log units: > log 3
    det = scale_detector(confirm=1, trend=True)
    assert run(det, [[scaled("grad", "0", math.exp(slope * s))] for s in steps], steps=steps) == []


def imbalanced(steps: int, jump_at: int | None = None, factor: float = 1.0, seed: int = 0):
    """A net whose layer "0" has 1e-4 the gradient RMS of layer "4", each steady with 5 % noise;
    from ``jump_at`` on, layer "0"'s RMS is ``factor`` times its own."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(steps):
        k = factor if jump_at is not None and s >= jump_at else 1.0
        noise = np.exp(0.05 * rng.standard_normal(4))
        out.append([scaled("grad", "0", 1e-4 * k * noise[0]), scaled("grad", "4", noise[1]),
                    scaled("act", "1", 1e-3 * noise[2]), scaled("act", "3", 10.0 * noise[3])])
    return out


def test_a_naturally_imbalanced_net_is_its_own_reference():
    seq = imbalanced(100)
    # the old reference-layer rule calls this vanishing gradients at every step ...
    assert [a.detector for a in run(GradientRatioDetector("0", "4"), seq)] == ["vanishing_grad"]
    # ... while every standard rule compares each layer with its own history
    suite = DetectorSuite.standard(["0", "2", "4"], ["1", "3"], act_layers=["1", "3"])
    for step, obs in enumerate(seq):
        assert suite.observe(step, obs, None) == [], step
    assert suite.pending == frozenset() and max(suite.suspicion.values()) < 1.0
    assert {k for k in suite.suspicion} >= {("grad", "0"), ("grad", "4"), ("act", "1"), ("act", "3")}


@pytest.mark.parametrize("confirm", [1, 2, 3])
@pytest.mark.parametrize("factor, name", [(20.0, "exploding_grad"), (1 / 20, "vanishing_grad")])
def test_a_layer_whose_own_series_jumps_alarms_after_confirm_looks_once(confirm, factor, name):
    seq = imbalanced(60, jump_at=30, factor=factor)  # and it stays there
    det = scale_detector(confirm=confirm)
    alarms = run(det, seq)
    assert [(a.step, a.detector, a.kind, a.layer, a.level) for a in alarms] == [
        (30 + confirm - 1, name, "grad", "0", "meso")]
    assert alarms[0].value == pytest.approx(math.log(seq[30 + confirm - 1][0].rms))
    assert f"{confirm} looks" in alarms[0].evidence and "own baseline" in alarms[0].evidence


def test_a_bad_look_is_pending_until_confirmed_and_cleared_by_a_good_one():
    det = scale_detector(confirm=2)
    run(det, [[scaled("grad", "0", 1.0), scaled("grad", "4", 1.0)]] * 8)
    assert det.pending == set() and det.suspicion[("grad", "0")] < 1.0
    bad = [scaled("grad", "0", 100.0), scaled("grad", "4", 1.0)]
    assert det.update(8, bad, None) == []
    assert det.pending == {("grad", "0")} and det.suspicion[("grad", "0")] > 1.0
    assert det.update(9, [scaled("grad", "0", 1.0), scaled("grad", "4", 1.0)], None) == []
    assert det.pending == set()  # one odd look, then normal: nothing to confirm
    assert det.update(10, bad, None) == [] and det.pending == {("grad", "0")}
    (a,) = det.update(11, bad, None)  # two bad looks in a row
    assert (a.step, a.layer) == (11, "0") and det.pending == set()


def test_suspicion_is_the_distance_as_a_fraction_of_the_threshold():
    det = scale_detector()
    run(det, [[scaled("grad", "0", 1.0)]] * 6)  # an exactly constant series: the width is the floor
    det.update(6, [scaled("grad", "0", 2.0)], None)
    # min(z / sigmas, |d| / log 3) with d = log 2, z = log 2 / 0.02: the size rule binds
    assert det.suspicion[("grad", "0")] == pytest.approx(math.log(2) / math.log(3))
    assert det.pending == set()  # 35 sigma, but only 2x: a very steady series does not alarm on a trifle


def test_sigmas_spare_a_noisy_layer_a_jump_within_its_own_noise():
    def alarms(factor: float) -> list[Alarm]:
        rng = np.random.default_rng(0)
        det = scale_detector()
        seq = [[scaled("grad", "0", math.exp(rng.normal(0, 0.6)) * (factor if s >= 100 else 1.0))]
               for s in range(200)]
        return run(det, seq)

    assert alarms(4.0) == []  # 4x is beyond the 3x rule but within 6 sigma of this layer's noise
    assert [(a.step, a.detector) for a in alarms(1e4)] == [(101, "exploding_grad")]


def test_bad_looks_stay_out_of_the_baseline_and_recovery_rearms_the_edge():
    det = scale_detector()
    steady = [scaled("grad", "0", 1.0)]
    run(det, [steady] * 10)
    level = det._base[("0", "meso")].level
    bad = [scaled("grad", "0", 50.0)]
    found = [a.step for s in range(10, 20) for a in det.update(s, bad, None)]
    assert found == [11]  # confirmed once, however long it lasts
    assert det._base[("0", "meso")].level == level  # the fault did not become the new normal
    found = [a.step for s in range(20, 30) for a in det.update(s, steady, None)]
    found += [a.step for s in range(30, 33) for a in det.update(s, bad, None)]
    assert found == [31]  # a new episode of trouble after recovery: a new alarm


def test_each_level_keeps_its_own_history():
    det = scale_detector()
    run(det, [[scaled("grad", "0", 1.0)]] * 10)
    # a micro estimate understates the norm: 10x lower, but a history of its own (warmup again)
    seq = [[scaled("grad", "0", 0.1, "micro")]] * 10 + [[scaled("grad", "0", 1.0)]] * 3
    assert run(det, seq, steps=range(10, 23)) == []
    assert set(det._base) == {("0", "meso"), ("0", "micro")}


def test_scale_at_macro_watches_the_pooled_series_and_reports_star():
    det = scale_detector()
    seq = [[scaled("grad", "*", 1.0, "macro")]] * 10 + [[scaled("grad", "*", 1e3, "macro")]] * 2
    assert [(a.step, a.layer, a.level) for a in run(det, seq)] == [(11, "*", "macro")]


def test_scale_ignores_other_kinds_and_non_finite_rms():
    det = scale_detector(warmup=1, confirm=1)
    seq = [[scaled("act", "0", 1.0)], [scaled("act", "0", 1e6)], [scaled("weight", "0", 1e6)],
           [ob("grad", "0", count=5, nonfinite=5, norm=0.0)], [ob("grad", "0", norm=math.inf)]]
    assert run(det, seq) == [] and det._base == {}


@pytest.mark.parametrize("kw", [{"confirm": 0}, {"warmup": 0}])
def test_self_referenced_rules_reject_zero_warmup_or_confirm(kw):
    with pytest.raises(ValueError, match=r"ScaleDetector\.(warmup|confirm) must be an int >= 1"):
        ScaleDetector("grad", **kw)


def test_activation_scale_is_the_scale_rule_on_activations():
    det = ActivationScaleDetector(sigmas=6.0, factor=3.0, warmup=5, confirm=2)
    assert isinstance(det, ScaleDetector) and det.kind == "act" and det.name == "activation_scale"
    seq = [[scaled("act", "1", 1.0), scaled("grad", "1", 1.0)]] * 10
    seq += [[scaled("act", "1", 30.0), scaled("grad", "1", 1e6)]] * 3
    assert [(a.step, a.detector, a.kind, a.layer) for a in run(det, seq)] == [
        (11, "activation_scale", "act", "1")]


# ---------------------------------------------------------------------------- non-finite values
@settings(max_examples=40, deadline=None)
@given(history=st.integers(0, 30), kind=st.sampled_from(["grad", "weight", "act"]),
       level=st.sampled_from(LEVELS[1:]), bad=st.sampled_from([math.nan, math.inf, -math.inf]),
       share=st.integers(1, 100))
def test_the_standard_suite_always_catches_a_non_finite_value(history, kind, level, bad, share):
    suite = DetectorSuite.standard(["0"], ["1"], act_layers=["1"])
    layer = "*" if level == "macro" else ("1" if kind == "act" else "0")
    for step in range(history):
        assert suite.observe(step, [scaled(kind, layer, 1.0, level)], 1.0) == []
    o = ob(kind, layer, level, count=100, nonfinite=share, norm=math.sqrt(100 - share))  # same RMS
    found = suite.observe(history, [o], 1.0)
    caught = {(a.kind, a.layer, a.level) for a in found if a.detector == "nonfinite"}
    assert (kind, layer, level) in caught  # (and the pooled "*" row, where the step covers the kind)
    assert caught <= {(kind, layer, level), (kind, "*", "macro")}
    found = suite.observe(history + 1, [scaled(kind, layer, 1.0, level)], bad)  # a non-finite loss
    assert [a.kind for a in found if a.detector == "nonfinite"] == ["loss"]


def test_the_standard_suite_without_act_layers_still_sees_activations_at_macro():
    suite = DetectorSuite.standard(["0"], ["1"])
    found = suite.observe(0, [ob("act", "*", "macro", nonfinite=3)], 1.0)
    assert [(a.detector, a.kind, a.layer) for a in found] == [("nonfinite", "act", "*")]


# ---------------------------------------------------------------------------- dead ReLU
def zeros(frac: float, layer: str = "1", level: str = "meso") -> Observation:
    return ob("act", layer, level, zero_frac=frac)


def test_dead_relu_flags_a_few_dead_units_against_the_layer_s_own_zero_fraction():
    det = DeadReLUDetector(["1", "3"], sigmas=4.0, margin=0.05, warmup=5, confirm=2)
    rng = np.random.default_rng(0)
    # layer "1" sits near 50 % zeros, layer "3" near 90 % (both healthy, both steady); then a
    # quarter of layer "1"'s units die: +12 points. Layer "0" is no ReLU, grads are ignored.
    seq = [[zeros(0.5 + 0.005 * rng.standard_normal() + (0.12 if s >= 20 else 0.0)),
            zeros(0.9 + 0.005 * rng.standard_normal(), "3"), zeros(1.0, "0"),
            ob("grad", "1", zero_frac=1.0)] for s in range(30)]
    alarms = run(det, seq)
    assert [(a.step, a.detector, a.kind, a.layer) for a in alarms] == [(21, "dead_relu", "act", "1")]
    assert "expected 5" in alarms[0].evidence  # the layer's own 50 %
    det = DeadReLUDetector(["1"], sigmas=4.0, margin=0.05, warmup=5, confirm=2)
    calm = [[zeros(0.5 + (0.03 if s >= 20 else 0.0))] for s in range(30)]
    assert run(det, calm) == []  # 3 points: within the margin


def test_dead_relu_threshold_fires_whatever_the_history():
    det = DeadReLUDetector(["1"], threshold=0.95, warmup=10)
    alarms = run(det, [[zeros(0.97)]])  # the very first look, long before warmup ends
    assert [(a.step, a.layer) for a in alarms] == [(0, "1")] and "threshold" in alarms[0].evidence
    det = DeadReLUDetector(["1"], threshold=0.95, warmup=3, confirm=2)
    alarms = run(det, [[zeros(0.5, "*", "macro")]] * 5 + [[zeros(1.0, "*", "macro")]] * 3)
    assert [(a.step, a.layer, a.level) for a in alarms] == [(5, "*", "macro")]  # pooled: star


def test_dead_relu_a_layer_dead_from_the_start_alarms_once():
    det = DeadReLUDetector(["1"], warmup=3)
    assert [a.step for a in run(det, [[zeros(0.97)]] * 10)] == [0]


# ---------------------------------------------------------------------------- weights
def weights(norm: float, layer: str = "0", level: str = "meso", mean: float = 0.0) -> Observation:
    """A weight observation whose std moves with its norm (mean 0: norm = std * sqrt(count))."""
    return ob("weight", layer, level, norm=norm, std=norm / 10.0, mean=mean)


def test_weight_progress_names_a_stall_and_a_runaway_against_the_usual_rate():
    def alarms(after: float) -> list[Alarm]:
        det = WeightProgressDetector(sigmas=4.0, factor_up=3.0, factor_down=30.0, warmup=5, confirm=2)
        rng = np.random.default_rng(1)
        norm, seq = 1.0, []
        for s in range(40):  # about 1 % per step, then `after` per step
            norm *= math.exp((0.01 if s < 20 else after) * (1 + 0.05 * rng.standard_normal()))
            seq.append([weights(norm), ob("grad", "0", norm=1e-9)])
        return run(det, seq)

    assert alarms(0.01) == []
    stall = alarms(1e-6)  # weights frozen
    assert [(a.step, a.detector, a.kind, a.layer) for a in stall] == [(21, "stall", "weight", "0")]
    runaway = alarms(0.2)
    assert [a.step for a in runaway] == [21] and runaway[0].detector != "stall"  # too fast
    assert "usual rate" in runaway[0].evidence


def test_weight_progress_is_per_step_so_rare_looks_are_not_a_stall():
    det = WeightProgressDetector(warmup=5, confirm=1)
    steps = list(range(10)) + list(range(19, 200, 10))  # then a look every 10 steps
    seq = [[weights(math.exp(0.01 * s))] for s in steps]
    assert run(det, seq, steps=steps) == []
    assert det.value(weights(0.0)) is None  # no norm, nothing to watch


def test_weight_drift_watches_the_signed_velocity_of_the_norm():
    det = WeightDriftDetector(sigmas=6.0, min_rate=0.01, warmup=5, confirm=2)
    norms = [math.exp(-0.001 * s) for s in range(20)]
    norms += [norms[-1] * 0.97 ** k for k in range(1, 11)]  # the layer shrinks 3 % per step
    alarms = run(det, [[weights(n), weights(1.0, "2")] for n in norms])
    assert [(a.step, a.detector, a.layer) for a in alarms] == [(21, "weight_drift", "0")]
    assert alarms[0].value == pytest.approx(math.log(0.97)) and "per step" in alarms[0].evidence
    # the same drift looked at every 4 steps is still 3 % per step
    det = WeightDriftDetector(sigmas=6.0, min_rate=0.01, warmup=5, confirm=2)
    steps = list(range(0, 80, 4))
    seq = [[weights(math.exp(-0.001 * s) * (0.97 ** (s - 40) if s > 40 else 1.0))] for s in steps]
    assert [a.step for a in run(det, seq, steps=steps)] == [48]


# ---------------------------------------------------------------------------- loss
def test_loss_detector_reports_a_nonfinite_loss_once_per_episode():
    det = LossDetector()
    losses = [1.0, math.nan, math.nan, math.inf, 1.0, math.inf]
    alarms = run(det, [[]] * len(losses), losses)
    assert [(a.step, a.detector, a.kind) for a in alarms] == [(1, "nonfinite", "loss"), (5, "nonfinite", "loss")]


def test_loss_detector_spike_divergence_and_plateau_only_on_request():
    c = SeriesConfig(warmup=5, plateau_window=5)
    rng = np.random.default_rng(0)
    noisy = list(2.0 - 0.05 * np.arange(15) + 0.005 * rng.standard_normal(15))  # improving
    spike = noisy + [20.0, 20.0] + [noisy[-1]]  # spike_patience = 2: two outliers in a row
    alarms = run(LossDetector(c), [[]] * len(spike), spike)
    assert [(a.step, a.detector) for a in alarms] == [(16, "spike")]

    stall = [2.0 * 0.9**k for k in range(15)] + [2.0 * 0.9**14] * 15  # progress, then none
    plateau = SeriesConfig(warmup=5, plateau_window=5, beta=0.5)
    assert run(LossDetector(plateau), [[]] * len(stall), stall) == []  # off by default
    alarms = run(LossDetector(plateau, plateau=True), [[]] * len(stall), stall)
    assert [a.detector for a in alarms] == ["plateau"] and 15 < alarms[0].step <= 25

    c2 = SeriesConfig(warmup=3, plateau_window=1000)
    rising = [1.0] * 5 + [1.05 ** k for k in range(1, 80)]
    alarms = run(LossDetector(c2), [[]] * len(rising), rising)
    assert [a.detector for a in alarms] == ["divergence"]
    assert LossDetector().update(0, [], None) == []  # no loss this step: nothing to say


def shifted_losses(shift_at: int | None, ratio: float, steps: int = 60, spike: int | None = None):
    rng = np.random.default_rng(0)
    out = []
    for s in range(steps):
        v = (1.0 + 1.5 * 0.97 ** s) * math.exp(0.03 * rng.standard_normal())  # converging, noisy
        if shift_at is not None and s >= shift_at:
            v *= ratio
        if s == spike:
            v *= 10.0
        out.append(v)
    return out


def test_loss_shift_flags_a_level_shift_once_and_not_a_single_odd_batch():
    det = LossShiftDetector(sigmas=4.0, ratio=1.5, window=3, warmup=10)
    alarms = run(det, [[]] * 60, shifted_losses(30, 2.5))
    assert [(a.detector, a.kind) for a in alarms] == [("loss_shift", "loss")]
    assert 30 < alarms[0].step <= 32  # the median of 3 moves on the second shifted loss
    for losses in (shifted_losses(None, 1.0), shifted_losses(None, 1.0, spike=30)):
        assert run(LossShiftDetector(), [[]] * 60, losses) == []
    det = LossShiftDetector(warmup=1)
    assert run(det, [[]] * 4, [None, math.nan, 0.0, -1.0]) == [] and det.base.n == 0


# ---------------------------------------------------------------------------- suite
class Boom(Detector):
    name = "boom"

    def update(self, step, obs, loss):
        raise RuntimeError("kaput")


def test_suite_counts_a_raising_detector_and_keeps_the_others():
    suite = DetectorSuite([Boom(), NonFiniteDetector(), LossDetector()])
    g = torch.ones(10)
    g[0] = math.nan
    with pytest.warns(UserWarning, match="boom"):
        found = suite(record_of({("grad", "0"): g}, "meso", loss=math.nan))
    assert {a.detector for a in found} == {"nonfinite"} and {a.kind for a in found} == {"grad", "loss"}
    found2 = suite(StepRecord(6, {}, {}, 1.0))  # the warning is given once, the count goes on
    assert found2 == []
    assert suite.errors == 2
    assert len(suite.latency_s) == 2 and all(0 <= t < 1 for t in suite.latency_s)
    assert suite.alarms == found
    assert [o.kind for o in suite.last_observations] == []


def test_standard_suite_has_one_rule_per_concern_and_no_reference_layers():
    suite = DetectorSuite.standard(["0", "2", "4"], ["1", "3"])
    types = [type(d) for d in suite.detectors]
    assert types == [NonFiniteDetector, ScaleDetector, DeadReLUDetector, ActivationScaleDetector,
                     WeightProgressDetector, WeightDriftDetector, LossDetector, LossShiftDetector]
    assert not any(isinstance(d, GradientRatioDetector) for d in suite.detectors)
    assert suite.detectors[1].kind == "grad" and suite.detectors[2].layers == {"1", "3"}
    assert suite.detectors[6].plateau is False


def test_suite_for_telemetry_wires_the_model_layers():
    model = mlp([64, 32, 16, 10])
    tel = Telemetry(model)
    suite = DetectorSuite.for_telemetry(tel)
    tel.close()
    assert [d.name for d in suite.detectors] == [
        "nonfinite", "gradient_scale", "dead_relu", "activation_scale", "weight_progress",
        "weight_drift", "loss", "loss_shift"]
    assert suite.detectors[2].layers == {"1", "3"}


def test_suite_suspicion_is_the_max_over_rules_and_pending_their_union():
    class Fixed(SelfReferencedDetector):
        def __init__(self, suspicion, pending):
            super().__init__(1.0, 1.0)
            self.suspicion, self.pending = suspicion, pending

        def update(self, step, obs, loss):
            return []

    suite = DetectorSuite([NonFiniteDetector(), Fixed({("grad", "0"): 0.5, ("act", "1"): 2.0}, {("act", "1")}),
                           Fixed({("grad", "0"): 0.7}, {("grad", "*")})])
    assert suite.suspicion == {("grad", "0"): 0.7, ("act", "1"): 2.0}
    assert suite.pending == frozenset({("act", "1"), ("grad", "*")})
    assert DetectorSuite([]).pending == frozenset() and DetectorSuite([]).suspicion == {}


def test_suite_observe_runs_every_rule_and_keeps_the_alarms():
    suite = DetectorSuite([NonFiniteDetector(), LossDetector()])
    obs = [ob(nonfinite=2)]
    found = suite.observe(3, obs, math.inf)
    assert sorted((a.step, a.kind) for a in found) == [(3, "grad"), (3, "loss")]
    assert suite.alarms == found and suite.last_observations is obs and len(suite.latency_s) == 1


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def data():
    return digits()


def train_run(data, fault: Fault | None, level: str = "meso", steps: int = 80) -> tuple[DetectorSuite, list[float]]:
    torch.manual_seed(0)
    model = mlp([64, 32, 32, 10])  # Linear "0", ReLU "1", Linear "2", ReLU "3", Linear "4"
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inj = FaultInjector(fault, model, opt, n_classes=10)
    tel = Telemetry(model, level)
    suite = DetectorSuite.for_telemetry(tel)
    tel.on_step = suite
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        inj.before_step(step)
        idx = torch.randint(0, len(data.x_train), (64,), generator=g)
        x, y = inj.batch(step, data.x_train[idx], data.y_train[idx])
        with tel.step(step):
            loss = F.cross_entropy(model(x), y)
            tel.log_loss(loss)
            opt.zero_grad()
            loss.backward()
            inj.after_backward(step)
        opt.step()
        losses.append(float(loss.detach()))
    tel.close()
    return suite, losses


def test_clean_run_on_digits_raises_no_alarm(data):
    suite, losses = train_run(data, None)
    assert suite.alarms == [] and suite.errors == 0
    assert losses[-1] < 0.5 * losses[0]  # it did train
    assert len(suite.latency_s) == 80


def test_dead_relu_fault_is_localised_at_meso_within_ten_steps(data):
    suite, _ = train_run(data, Fault("dead_relu", 40, layer="2"))  # Linear "2" feeds ReLU "3"
    assert all(a.step >= 40 for a in suite.alarms)  # nothing before the fault
    dead = [a for a in suite.alarms if a.detector == "dead_relu"]
    assert dead, suite.alarms
    assert dead[0].layer == "3" and dead[0].level == "meso"
    assert 40 <= dead[0].step <= 50
    assert {a.layer for a in dead if a.level == "meso"} == {"3"}  # besides the pooled "*" row


def test_dead_relu_alarm_at_raw_names_the_layer_too(data):
    suite, _ = train_run(data, Fault("dead_relu", 40), level="raw", steps=50)
    dead = [a for a in suite.alarms if a.detector == "dead_relu"]
    # ReLU "1" dies; ReLU "3" then sees only Linear "2"'s bias, a change of its own history too
    assert dead and all(a.step >= 40 for a in suite.alarms)
    first = {a.layer for a in dead if a.step == dead[0].step}
    assert "1" in first and {a.layer for a in dead} <= {"1", "3"} and dead[0].step <= 50


def test_a_quiet_layer_fault_is_found_in_its_own_layer_at_meso(data):
    suite, _ = train_run(data, Fault("layer_grad_vanish", 40, layer="2"), steps=50)
    assert all(a.step >= 40 for a in suite.alarms)
    grads = [a for a in suite.alarms if a.kind == "grad"]
    assert grads and grads[0].layer == "2" and grads[0].detector == "vanishing_grad"
    assert grads[0].step <= 45
