"""Fault detectors that read whatever granularity arrives, and say what that level can see.

Every detector turns a step's :class:`Observation` s (one per kind x layer, at its level) into
:class:`~adaptive_kit.anomaly.Alarm` s. Raw and micro records are summarised on the host into
the same statistics as meso ones, as estimates: a raw sample scales counts by its true size,
and micro block means understate the spread, the norm and the zero fraction (a block mean is
zero only when the whole block is). Macro records have ``layer = "*"``: a detector fed only
macro data can say *that* something is wrong, never *where*.

Alarms fire on the rising edge of a condition (once per episode of trouble per kind x layer),
so a NaN that persists for 100 steps is one alarm, not 100.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

from ..anomaly import Alarm, SeriesConfig, SeriesMonitor
from ..checks import check_int
from ..stats import EMA
from .observations import Observation


class Detector:
    """Base class: ``update(step, obs, loss)`` returns the alarms of one step."""

    name = "detector"

    def __init__(self) -> None:
        self._active: set[tuple] = set()

    def update(self, step: int, obs: list[Observation], loss: float | None) -> list[Alarm]:
        raise NotImplementedError

    def _edge(self, key: tuple, condition: bool) -> bool:
        """True when ``condition`` turns on for ``key`` (rising edge)."""
        if not condition:
            self._active.discard(key)
            return False
        if key in self._active:
            return False
        self._active.add(key)
        return True


class NonFiniteDetector(Detector):
    """Rule: any NaN or +-Inf entry in a tensor. Every level sees it (meso and macro count them
    exactly; a capped raw sample or a micro block mean containing one shows it too); macro
    reports ``layer = "*"``."""

    name = "nonfinite"

    def update(self, step, obs, loss):
        alarms = []
        for o in obs:
            if self._edge((o.kind, o.layer), o.nonfinite > 0):
                alarms.append(Alarm(step, self.name, o.kind, o.layer, o.level,
                                    f"{o.nonfinite:.0f} of {o.count} {o.kind} entries are NaN/Inf", o.nonfinite))
        return alarms


class GradientRatioDetector(Detector):
    """Exploding / vanishing gradients.

    Rule (AUTOTRAINER, Zhang et al., ICSE 2021): the ratio of the first to the last layer's
    gradient norm above ``explode_ratio`` (70) means exploding gradients, below
    ``vanish_ratio`` (1e-3) vanishing ones. It needs both layers at a localising level (raw,
    micro or meso). With macro gradients only, it falls back to the global gradient norm
    against its own EMA (``global_factor`` times above, or ``global_vanish_factor`` times below,
    after ``warmup`` steps: gradients shrink tenfold on their own as a run converges) and
    reports ``layer = "*"``.
    """

    name = "gradient"

    def __init__(self, first: str, last: str, explode_ratio: float = 70.0, vanish_ratio: float = 1e-3,
                 global_factor: float = 10.0, global_vanish_factor: float = 100.0, warmup: int = 10,
                 beta: float = 0.9) -> None:
        super().__init__()
        self.first, self.last = first, last
        self.explode_ratio, self.vanish_ratio = explode_ratio, vanish_ratio
        self.global_factor, self.global_vanish_factor = global_factor, global_vanish_factor
        self.warmup, self.beta = warmup, beta
        self._global = EMA(beta)  # of the global gradient norm

    def update(self, step, obs, loss):
        grads = {o.layer: o for o in obs if o.kind == "grad"}
        alarms = []
        first, last = grads.get(self.first), grads.get(self.last)
        if (first and last and first.level != "macro" and last.level != "macro"
                and (first.norm > 0 or last.norm > 0)):  # 0/0 (e.g. all entries NaN) says nothing
            ratio = first.norm / last.norm if last.norm > 0 else math.inf
            for det, cond in (("exploding_grad", ratio > self.explode_ratio),
                              ("vanishing_grad", ratio < self.vanish_ratio)):
                if self._edge((det, self.first), cond):
                    alarms.append(Alarm(step, det, "grad", self.first, f"{first.level}/{last.level}",
                                        f"|g[{self.first}]| / |g[{self.last}]| = {ratio:.3g} "
                                        f"(thresholds {self.explode_ratio:g}, {self.vanish_ratio:g})", ratio))
        glob = grads.get("*")
        if glob is not None and math.isfinite(glob.norm):
            if self._global.n >= self.warmup and self._global.mean > 0:
                r = glob.norm / self._global.mean
                for det, cond in (("exploding_grad", r > self.global_factor),
                                  ("vanishing_grad", r < 1 / self.global_vanish_factor)):
                    if self._edge((det, "*"), cond):
                        alarms.append(Alarm(step, det, "grad", "*", "macro",
                                            f"global |g| {glob.norm:.3g} = {r:.3g}x its EMA {self._global.mean:.3g}", r))
            self._global.update(glob.norm)
        return alarms


class Baseline:
    """A series' own recent history: Holt's level and trend per step, and an EMA of the squared
    one-look-ahead residual, folded only with values judged normal, so that a fault does not
    become the new normal. Looks may be several steps apart: the trend carries the level over
    the gap, so a series that moves steadily (as statistics do early in training) is not an
    outlier just because it was seen rarely."""

    def __init__(self, beta: float, trend_beta: float = 0.8) -> None:
        self.beta, self.trend_beta = beta, trend_beta
        self.n, self.level, self.trend, self.var, self.step = 0, 0.0, 0.0, 0.0, 0

    def predict(self, step: int) -> float:
        return self.level + self.trend * (step - self.step) if self.n else 0.0

    def deviation(self, x: float, step: int, floor: float) -> tuple[float, float]:
        """``(x - forecast, that distance in standard deviations, at least ``floor`` wide)``."""
        d = x - self.predict(step)
        return d, abs(d) / max(math.sqrt(self.var), floor)

    def fold(self, x: float, step: int) -> None:
        if self.n == 0:
            self.level = x
        else:
            gap = max(step - self.step, 1)
            forecast = self.predict(step)
            d = x - forecast
            level = forecast + (1 - self.beta) * d
            if self.n >= 2:
                self.var = self.beta * self.var + (1 - self.beta) * d * d
            self.trend = self.trend_beta * self.trend + (1 - self.trend_beta) * (level - self.level) / gap
            self.level = level
        self.step = step
        self.n += 1


class SelfReferencedDetector(Detector):
    """Base of the rules that compare each (kind, layer) series with its own history.

    A value is *bad* when it lies more than ``sigmas`` of the series' own standard deviation
    from its baseline **and** more than ``min_change`` away (so that a very steady series does
    not alarm on a trifle); a series alarms once ``confirm`` consecutive observations are bad,
    after ``warmup`` normal ones. Layers are watched whenever they are observed, at whatever
    rate a policy looks at them, so a naturally imbalanced network is its own reference and
    never an alarm. :attr:`suspicion` maps (kind, layer) to the last observation's distance
    as a fraction of the alarm threshold (>= 1: bad): a policy can look again where it is high.
    """

    kind = "act"
    side = 0  # 0: a change either way is bad; +1: only a rise; -1: only a fall

    def __init__(self, sigmas: float, min_change: float | tuple[float, float], warmup: int = 5,
                 confirm: int = 2, beta: float = 0.8, floor: float = 0.02, trend: bool = True) -> None:
        super().__init__()
        check_int(f"{type(self).__name__}.warmup", warmup, 1)
        check_int(f"{type(self).__name__}.confirm", confirm, 1)
        # (below, above) the baseline: a fall and a rise may need different sizes
        self.min_change = min_change if isinstance(min_change, tuple) else (min_change, min_change)
        self.sigmas, self.warmup, self.confirm = sigmas, warmup, confirm
        self.beta, self.floor = beta, floor
        self.trend_beta = 0.8 if trend else 1.0  # 1: no trend, a level with noise around it
        self._base: dict[tuple, Baseline] = {}
        self._bad: dict[tuple, int] = {}
        self.suspicion: dict[tuple[str, str], float] = {}
        self.pending: set[tuple[str, str]] = set()  # (kind, layer): bad, not yet confirmed

    def value(self, o: Observation) -> float | None:
        """The watched statistic of an observation (None: nothing to watch)."""
        raise NotImplementedError

    def describe(self, o: Observation, x: float, base: Baseline, d: float, z: float) -> tuple[str, str]:
        """(detector name, evidence) of an alarm."""
        raise NotImplementedError

    def update(self, step, obs, loss):
        alarms = []
        for o in obs:
            if o.kind != self.kind:
                continue
            x = self.value(o)
            if x is None or not math.isfinite(x):
                continue
            key = (o.layer, o.level)  # levels estimate differently: one history each
            base = self._base.setdefault(key, Baseline(self.beta, self.trend_beta))
            if base.n < self.warmup:
                base.fold(x, step)
                continue
            d, z = base.deviation(x, step, self.floor)
            frac = min(z / self.sigmas, abs(d) / self.min_change[d > 0])
            self.suspicion[(o.kind, o.layer)] = frac
            bad = frac > 1 and d * self.side >= 0
            self._bad[key] = self._bad.get(key, 0) + 1 if bad else 0
            if self._edge(key, self._bad[key] >= self.confirm):
                name, evidence = self.describe(o, x, base, d, z)
                alarms.append(Alarm(step, name, o.kind, o.layer, o.level, evidence, x))
            if not bad:
                base.fold(x, step)
        self.pending = {(self.kind, layer) for (layer, _), n in self._bad.items() if 0 < n < self.confirm}
        return alarms


class ScaleDetector(SelfReferencedDetector):
    """Rule: a layer's RMS (of its gradients or of its outputs) jumps by more than ``sigmas``
    of its own log-RMS history and by more than a factor ``factor``, on ``confirm``
    consecutive looks. Catches a layer whose gradients vanish or explode while the others are
    fine, a stalled run (gradients of exactly zero), input corruption and exploding
    activations; at macro it watches the pooled RMS of the kind only."""

    def __init__(self, kind: str = "grad", sigmas: float = 5.0, factor: float = 3.0, trend: bool = False,
                 **kw) -> None:
        # gradient and activation scales are noise around a slowly moving level: no trend
        super().__init__(sigmas, math.log(factor), trend=trend, **kw)
        self.kind = kind
        self.name = {"grad": "gradient_scale", "act": "activation_scale"}.get(kind, f"{kind}_scale")

    def value(self, o):
        rms = o.rms
        return math.log(max(rms, 1e-30)) if math.isfinite(rms) else None

    def describe(self, o, x, base, d, z):
        r = math.exp(d)
        if self.kind == "grad":
            name = "exploding_grad" if d > 0 else "vanishing_grad"
        else:
            name = self.name
        return name, (f"{o.kind} RMS of {o.layer} = {r:.3g}x its own baseline "
                      f"({z:.1f} sigma, {self.confirm} looks)")


class DeadReLUDetector(SelfReferencedDetector):
    """Dying units: an activation layer's fraction of exact zeros rises above its own baseline
    by more than ``sigmas`` of its history and by at least ``margin`` (a few dead units of a
    ReLU layer), or reaches ``threshold`` (95 %, the whole layer dead) at any time. Applies to
    the ``layers`` given (the ReLU-family modules) and to macro rows; a macro row pools every
    layer, so a few dead units in one layer are diluted there."""

    kind = "act"
    name = "dead_relu"
    side = 1  # fewer zeros than usual is not a dying unit

    def __init__(self, layers: Iterable[str], sigmas: float = 4.0, margin: float = 0.05,
                 threshold: float = 0.95, **kw) -> None:
        super().__init__(sigmas, margin, **kw)
        self.layers, self.threshold = set(layers), threshold

    def value(self, o):
        if o.layer not in self.layers and o.layer != "*":
            return None
        zf = o.zero_frac
        return None if zf is None or not math.isfinite(zf) else zf

    def update(self, step, obs, loss):
        dead_before = {k[1:] for k in self._active if k[0] == "all"}
        alarms = [a for a in super().update(step, obs, loss) if (a.layer, a.level) not in dead_before]
        for o in obs:  # a layer that is all zeros is dead whatever its history: one alarm
            x = self.value(o) if o.kind == "act" else None
            if x is None:
                continue
            key = (o.layer, o.level)
            if self._edge(("all", *key), x >= self.threshold) and key not in self._active:
                alarms.append(Alarm(step, self.name, "act", o.layer, o.level,
                                    f"{x:.0%} of outputs are zero (threshold {self.threshold:.0%})", x))
        return alarms

    def describe(self, o, x, base, d, z):
        return self.name, (f"{x:.0%} of outputs are zero, expected {x - d:.0%} "
                           f"({z:.1f} sigma, {self.confirm} looks)")


class ActivationScaleDetector(ScaleDetector):
    """:class:`ScaleDetector` on activations (kept under its own name)."""

    def __init__(self, sigmas: float = 5.0, factor: float = 3.0, **kw) -> None:
        super().__init__("act", sigmas, factor, **kw)


class _PerStepChange(SelfReferencedDetector):
    """Base of the rules on how fast a layer's statistics move: :meth:`position` of a look,
    and :meth:`rate` between it and the layer's previous look, per step of the gap."""

    kind = "weight"

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self._last: dict[tuple, tuple[int, tuple[float, ...]]] = {}  # (layer, level) -> look
        self._step = 0

    def position(self, o: Observation) -> tuple[float, ...] | None:
        raise NotImplementedError

    def rate(self, now: tuple[float, ...], last: tuple[float, ...], gap: int) -> float:
        raise NotImplementedError

    def update(self, step, obs, loss):
        self._step = step
        return super().update(step, obs, loss)

    def value(self, o):
        now = self.position(o)
        if now is None:
            return None
        key = (o.layer, o.level)
        last = self._last.get(key)
        self._last[key] = (self._step, now)
        if last is None or self._step <= last[0]:
            return None
        return self.rate(now, last[1], self._step - last[0])


class WeightProgressDetector(_PerStepChange):
    """Rule: how fast a layer's weights move, per step, against their own history.

    Progress is the largest step-to-step change of the layer's weight statistics (log norm,
    log std, mean in units of std) divided by the steps between two looks. Far faster than
    usual (``factor_up`` and ``sigmas``) means a learning rate running away or a layer pushed
    around (``fast_updates``); far slower (``factor_down``) means training has
    stalled (``stall``: a learning rate that collapsed, gradients that stopped)."""

    name = "weight_progress"

    def __init__(self, sigmas: float = 6.0, factor_up: float = 5.0, factor_down: float = 30.0,
                 warmup: int = 8, **kw) -> None:
        super().__init__(sigmas, (math.log(factor_down), math.log(factor_up)), warmup=warmup, **kw)

    def position(self, o):
        if not (o.norm > 0 and o.std > 0 and math.isfinite(o.norm) and math.isfinite(o.std)):
            return None
        return math.log(o.norm), math.log(o.std), o.mean / o.std

    def rate(self, now, last, gap):
        return math.log(max(abs(a - b) for a, b in zip(now, last)) / gap + 1e-12)

    def describe(self, o, x, base, d, z):
        name = "fast_updates" if d > 0 else "stall"
        return name, (f"weights of {o.layer} move {math.exp(d):.3g}x their usual rate per step "
                      f"({z:.1f} sigma, {self.confirm} looks)")


class WeightDriftDetector(_PerStepChange):
    """Rule: a layer's weight norm changes, per step, at a velocity (signed, in log units) far
    from its own recent velocity: more than ``sigmas`` of its history and more than
    ``min_rate`` per step. Catches one layer's weights drifting towards zero or growing, which
    pooled statistics dilute."""

    name = "weight_drift"

    def __init__(self, sigmas: float = 6.0, min_rate: float = 0.01, floor: float = 1e-3, **kw) -> None:
        super().__init__(sigmas, min_rate, floor=floor, **kw)

    def position(self, o):
        return (math.log(o.norm),) if o.norm > 0 and math.isfinite(o.norm) else None

    def rate(self, now, last, gap):
        return (now[0] - last[0]) / gap

    def describe(self, o, x, base, d, z):
        return self.name, (f"weight norm of {o.layer} changes {x:+.2%} per step, expected "
                           f"{x - d:+.2%} ({z:.1f} sigma, {self.confirm} looks)")


class LossShiftDetector(Detector):
    """Rule: the median of the last ``window`` log-losses sits above the loss's own Holt
    forecast by more than ``sigmas`` of its history and by more than a factor ``ratio``: a
    level shift (corrupted labels, a worse regime) that is too gradual or too noisy for the
    spike rule. Rising edge; losses judged shifted stay out of the baseline."""

    name = "loss_shift"

    def __init__(self, sigmas: float = 4.0, ratio: float = 1.5, window: int = 3, warmup: int = 10,
                 beta: float = 0.9) -> None:
        super().__init__()
        self.sigmas, self.min_change, self.window, self.warmup = sigmas, math.log(ratio), window, warmup
        self.base = Baseline(beta)
        self._recent: list[float] = []

    def update(self, step, obs, loss):
        if loss is None or not loss > 0 or not math.isfinite(loss):
            return []
        x = math.log(loss)
        self._recent = (self._recent + [x])[-self.window:]
        if self.base.n < self.warmup:
            self.base.fold(x, step)
            return []
        m = sorted(self._recent)[len(self._recent) // 2]
        d, z = self.base.deviation(m, step, 0.02)
        shifted = d > self.min_change and z > self.sigmas
        x_d, x_z = self.base.deviation(x, step, 0.02)
        if not (x_d > self.min_change and x_z > self.sigmas):
            self.base.fold(x, step)
        if self._edge("shift", shifted):
            return [Alarm(step, self.name, "loss", "", "scalar",
                          f"median loss of the last {self.window} steps is {math.exp(d):.3g}x the "
                          f"forecast ({z:.1f} sigma)", math.exp(m))]
        return []


class LossDetector(Detector):
    """Loss spikes, divergence, non-finite losses and (with ``plateau=True``) plateaus: the
    rules of :class:`adaptive_kit.anomaly.SeriesMonitor` on the step's loss (sent at every
    level). The plateau rule is off by default: a converging run slows down on its own, and a
    real stall shows sooner in the weights (:class:`WeightProgressDetector`)."""

    name = "loss"

    def __init__(self, config: SeriesConfig = SeriesConfig(), plateau: bool = False) -> None:
        super().__init__()
        self.monitor = SeriesMonitor("loss", config)
        self.plateau = plateau

    def update(self, step, obs, loss):
        if loss is None:
            return []
        alarms = self.monitor.update(step, loss)
        if not self.plateau:
            alarms = [a for a in alarms if a.detector != "plateau"]
        if not math.isfinite(loss):  # the monitor reports every bad step; report the first
            return alarms if self._edge("nonfinite", True) else []
        self._edge("nonfinite", False)
        return alarms
