"""Telemetry detectors: observations() at every level against numpy, each rule on hand-built
Observation sequences, the suite's error handling, and end to end on digits with a dead ReLU."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adaptive_kit.anomaly import Alarm, SeriesConfig
from adaptive_kit.datasets import digits
from adaptive_kit.stats import STAT_NAMES, batched_stats
from adaptive_kit.telemetry import (
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
    DeadReLUDetector,
    Detector,
    GradientRatioDetector,
    LossDetector,
    NonFiniteDetector,
)
from adaptive_kit.telemetry.faults import Fault, FaultInjector
from adaptive_kit.training import mlp


def ob(kind: str = "grad", layer: str = "0", level: str = "meso", *, count: int = 100,
       norm: float = 1.0, nonfinite: float = 0, zero_frac: float = 0.0, mean: float = 0.0,
       std: float = 1.0, lo: float = -1.0, hi: float = 1.0) -> Observation:
    return Observation(kind, layer, level, count, mean, std, lo, hi, norm, nonfinite, zero_frac)


def run(detector: Detector, per_step: list[list[Observation]], losses=None) -> list[Alarm]:
    out: list[Alarm] = []
    for step, obs in enumerate(per_step):
        out.extend(detector.update(step, obs, None if losses is None else losses[step]))
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
def test_observations_of_samples_are_estimates_scaled_by_the_true_count(level, window, cap):
    tensors = sample_tensors()
    rec = record_of(tensors, level, TelemetryConfig(window=window, raw_cap=cap))
    obs = {o.kind: o for o in observations(rec)}
    rows = {r["kind"]: r for r in rec.batches[level].to_pylist()}
    for kind, t in (("grad", tensors[("grad", "0")]), ("act", tensors[("act", "1")])):
        o = obs[kind]
        v = np.asarray(rows[kind]["values"], dtype=np.float64)
        assert o.count == t.numel() and o.level == level
        for name, want in sample_oracle(v, t.numel()).items():
            assert getattr(o, name) == pytest.approx(want, rel=1e-9, abs=1e-12), f"{kind}.{name}"
    if level == "raw" and cap == 10**6:  # the full set of values: exact again
        exact = batched_stats([tensors[("grad", "0")]])[0].numpy()
        assert obs["grad"].nonfinite == 3
        assert obs["grad"].norm == pytest.approx(exact[5], rel=1e-6)
        assert obs["grad"].zero_frac == pytest.approx(exact[7])
    if level == "raw" and cap == 100:  # entries 0, 10, ..., 990: the +Inf at 500 stands for 10
        assert obs["grad"].nonfinite == 10.0


def test_observation_of_an_empty_sample_is_nan_not_an_error():
    rec = record_of({("act", "1"): torch.empty(0)}, "raw")
    (o,) = observations(rec)
    assert o.count == 0 and math.isnan(o.mean) and o.norm == 0.0 and math.isnan(o.rms)


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


# ---------------------------------------------------------------------------- dead ReLU
def test_dead_relu_needs_patience_steps_above_threshold_and_baseline():
    det = DeadReLUDetector(["1", "3"], threshold=0.7, patience=3, margin=0.2, warmup=10)
    # a healthy conv-like layer near 60 % zeros; 75 % is over the threshold but within the
    # margin of its baseline (no alarm); 95 % for three steps is a dead layer
    fracs = [0.6] * 12 + [0.75] * 5 + [0.95, 0.5, 0.95, 0.95, 0.95, 0.95]
    seq = [[ob("act", "1", zero_frac=f), ob("act", "3", zero_frac=0.0),
            ob("act", "0", zero_frac=1.0), ob("grad", "1", zero_frac=1.0)] for f in fracs]
    alarms = run(det, seq)
    assert [(a.step, a.layer) for a in alarms] == [(21, "1")]  # 19, 20, 21: three in a row
    assert all(a.detector == "dead_relu" and a.kind == "act" for a in alarms)
    assert alarms[0].value == 0.95 and "baseline" in alarms[0].evidence


def test_dead_relu_before_warmup_needs_an_almost_all_zero_layer():
    det = DeadReLUDetector(["1"], patience=2, warmup=10)
    assert run(det, [[ob("act", "1", zero_frac=0.8)]] * 4) == []
    det = DeadReLUDetector(["1"], patience=2, warmup=10)
    assert [a.step for a in run(det, [[ob("act", "1", zero_frac=0.97)]] * 4)] == [1]


def test_dead_relu_at_macro_reports_star():
    det = DeadReLUDetector(["1"], patience=2)
    alarms = run(det, [[ob("act", "*", "macro", zero_frac=0.97)]] * 3)
    assert [(a.step, a.layer, a.level) for a in alarms] == [(1, "*", "macro")]


# ---------------------------------------------------------------------------- activation scale
def act(rms: float, layer: str = "1", level: str = "meso") -> Observation:
    return ob("act", layer, level, count=100, norm=rms * 10.0)  # rms = norm / sqrt(100)


def scale_oracle(values: list[float], factor: float = 10.0, warmup: int = 10, beta: float = 0.9):
    """Steps where the RMS leaves [1/factor, factor] x its EMA (rising edges), and the ratios."""
    ema, n, active, fired = None, 0, False, []
    for step, v in enumerate(values):
        base = v if ema is None else ema
        r = v / base
        bad = n >= warmup and (r > factor or r < 1 / factor)
        if bad and not active:
            fired.append((step, r))
        active = bad
        if not bad:
            ema = v if n == 0 else beta * base + (1 - beta) * v
            n += 1
    return fired


def test_activation_scale_fires_after_warmup_on_a_tenfold_jump():
    # 12x before warmup is folded in silently; later 5x is within bounds, 12x and 1/20x are not
    rms = [1.0] * 3 + [12.0] + [1.0] * 30 + [5.0] + [1.0] * 30 + [12.0] * 2 + [1.0] + [0.05]
    alarms = run(ActivationScaleDetector(factor=10.0, warmup=10), [[act(v)] for v in rms])
    expected = scale_oracle(rms)
    assert [a.step for a in alarms] == [s for s, _ in expected] == [65, 68]
    assert [a.value for a in alarms] == pytest.approx([r for _, r in expected])
    assert alarms[0].value > 10 and alarms[1].value < 0.1
    assert all((a.detector, a.kind, a.layer, a.level) == ("activation_scale", "act", "1", "meso")
               for a in alarms)


def test_activation_scale_keeps_outliers_out_of_the_baseline():
    det = ActivationScaleDetector(warmup=2)
    run(det, [[act(1.0)]] * 3)
    ema = det._ema[("1", "meso")]  # one baseline per (layer, level)
    assert det.update(3, [act(100.0)], None)
    assert det._ema[("1", "meso")] == ema
    assert det.update(4, [act(100.0)], None) == []  # same episode of trouble: no second alarm
    assert det.update(5, [act(1.0)], None) == []


def test_activation_scale_ignores_gradients_and_non_finite_rms():
    det = ActivationScaleDetector(warmup=1)
    assert run(det, [[ob("grad", "0", norm=1.0)], [ob("grad", "0", norm=1e6)],
                     [ob("act", "1", count=5, nonfinite=5, norm=0.0)]]) == []


# ---------------------------------------------------------------------------- loss
def test_loss_detector_reports_a_nonfinite_loss_once_per_episode():
    det = LossDetector()
    losses = [1.0, math.nan, math.nan, math.inf, 1.0, math.inf]
    alarms = run(det, [[]] * len(losses), losses)
    assert [(a.step, a.detector, a.kind) for a in alarms] == [(1, "nonfinite", "loss"), (5, "nonfinite", "loss")]


def test_loss_detector_spike_divergence_and_plateau():
    c = SeriesConfig(warmup=5, plateau_window=5)
    rng = np.random.default_rng(0)
    noisy = list(2.0 - 0.05 * np.arange(15) + 0.005 * rng.standard_normal(15))  # improving
    spike = noisy + [20.0, 20.0] + [noisy[-1]]  # spike_patience = 2: two outliers in a row
    alarms = run(LossDetector(c), [[]] * len(spike), spike)
    assert [(a.step, a.detector) for a in alarms] == [(16, "spike")]

    stall = [2.0 * 0.9**k for k in range(15)] + [2.0 * 0.9**14] * 15  # progress, then none
    alarms = run(LossDetector(SeriesConfig(warmup=5, plateau_window=5, beta=0.5)), [[]] * len(stall), stall)
    assert [a.detector for a in alarms] == ["plateau"] and 15 < alarms[0].step <= 25

    c2 = SeriesConfig(warmup=3, plateau_window=1000)
    rising = [1.0] * 5 + [1.05 ** k for k in range(1, 80)]
    alarms = run(LossDetector(c2), [[]] * len(rising), rising)
    assert [a.detector for a in alarms] == ["divergence"]
    assert LossDetector().update(0, [], None) == []  # no loss this step: nothing to say


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


def test_suite_for_telemetry_wires_the_model_layers():
    model = mlp([64, 32, 16, 10])
    tel = Telemetry(model)
    suite = DetectorSuite.for_telemetry(tel)
    tel.close()
    names = [d.name for d in suite.detectors]
    assert names == ["nonfinite", "gradient", "dead_relu", "activation_scale", "loss"]
    ratio = suite.detectors[1]
    assert (ratio.first, ratio.last) == ("0", "4")
    assert suite.detectors[2].layers == {"1", "3"}


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
    tel.on_record = suite
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
    assert {a.layer for a in dead} == {"3"}


def test_dead_relu_alarm_at_raw_names_the_layer_too(data):
    suite, _ = train_run(data, Fault("dead_relu", 40), level="raw", steps=50)
    dead = [a for a in suite.alarms if a.detector == "dead_relu"]
    assert [a.layer for a in dead] == ["1"] and 40 <= dead[0].step <= 50
