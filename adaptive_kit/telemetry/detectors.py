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
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..anomaly import Alarm, SeriesConfig, SeriesMonitor
from .collector import StepRecord


@dataclass(frozen=True)
class Observation:
    """Statistics of one (kind, layer) at one step, exact (meso, macro) or estimated (raw, micro)."""

    kind: str
    layer: str
    level: str
    count: int
    mean: float
    std: float
    min: float
    max: float
    norm: float
    nonfinite: float
    zero_frac: float

    @property
    def rms(self) -> float:
        """Root mean square of the finite entries."""
        n = self.count - self.nonfinite
        return self.norm / math.sqrt(n) if n > 0 else math.nan


def observations(record: StepRecord) -> list[Observation]:
    """One :class:`Observation` per row of every level's record batch of ``record``."""
    out: list[Observation] = []
    for level, batch in record.batches.items():
        cols = batch.to_pydict()
        for i in range(batch.num_rows):
            kind, layer, count = cols["kind"][i], cols["layer"][i], cols["count"][i]
            if level in ("meso", "macro"):
                out.append(Observation(kind, layer, level, count, cols["mean"][i], cols["std"][i],
                                       cols["min"][i], cols["max"][i], cols["norm"][i],
                                       cols["nonfinite"][i], cols["zero_frac"][i]))
            else:
                out.append(_from_sample(kind, layer, level, count, np.asarray(cols["values"][i], dtype=np.float64)))
    return out


def _from_sample(kind: str, layer: str, level: str, count: int, v: np.ndarray) -> Observation:
    n = v.size
    if n == 0:
        return Observation(kind, layer, level, count, *([math.nan] * 4), 0.0, 0.0, math.nan)
    scale = count / n  # each value stands for this many entries
    fin = np.isfinite(v)
    f = v[fin]
    nonfinite = float((~fin).sum() * scale)
    zero_frac = float((v == 0).mean())
    if f.size == 0:
        return Observation(kind, layer, level, count, *([math.nan] * 4), 0.0, nonfinite, zero_frac)
    return Observation(kind, layer, level, count, float(f.mean()), float(f.std()), float(f.min()),
                       float(f.max()), float(math.sqrt((f * f).sum() * scale)), nonfinite, zero_frac)


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
        self._ema, self._n = 0.0, 0

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
            if self._n >= self.warmup and self._ema > 0:
                r = glob.norm / self._ema
                for det, cond in (("exploding_grad", r > self.global_factor),
                                  ("vanishing_grad", r < 1 / self.global_vanish_factor)):
                    if self._edge((det, "*"), cond):
                        alarms.append(Alarm(step, det, "grad", "*", "macro",
                                            f"global |g| {glob.norm:.3g} = {r:.3g}x its EMA {self._ema:.3g}", r))
            self._ema = glob.norm if self._n == 0 else self.beta * self._ema + (1 - self.beta) * glob.norm
            self._n += 1
        return alarms


class DeadReLUDetector(Detector):
    """Dying ReLUs.

    Rule: an activation layer's outputs are >= ``threshold`` (70 %, AUTOTRAINER's dying-ReLU
    threshold) exact zeros for ``patience`` consecutive steps *and* at least ``margin`` above
    the layer's own baseline (an EMA of its zero fraction over healthy steps, after ``warmup``
    of them; before that only a nearly all-zero layer, >= 95 %, counts). The margin is ours:
    healthy convolutional ReLUs sit near 70 % zeros (70-73 % in the bundled CNN), so the bare
    threshold fires on clean runs. Applies to the ``layers`` given (the ReLU-family modules);
    a macro row pools every layer, so one dead layer among healthy ones is diluted there.
    """

    name = "dead_relu"

    def __init__(self, layers: Iterable[str], threshold: float = 0.7, patience: int = 3,
                 margin: float = 0.2, warmup: int = 10, beta: float = 0.9) -> None:
        super().__init__()
        self.layers = set(layers)
        self.threshold, self.patience, self.margin = threshold, patience, margin
        self.warmup, self.beta = warmup, beta
        self._runs: dict[str, int] = {}
        self._base: dict[str, float] = {}
        self._n: dict[str, int] = {}

    def update(self, step, obs, loss):
        alarms = []
        for o in obs:
            if o.kind != "act" or (o.layer not in self.layers and o.layer != "*"):
                continue
            zf = o.zero_frac
            if zf is None or not math.isfinite(zf):
                continue
            key = (o.layer, o.level)  # micro block means understate zeros: one baseline per level
            n, base = self._n.get(key, 0), self._base.get(key, zf)
            dead = zf >= self.threshold and (zf >= base + self.margin if n >= self.warmup else zf >= 0.95)
            self._runs[o.layer] = self._runs.get(o.layer, 0) + 1 if dead else 0
            if not dead:
                self._base[key] = zf if n == 0 else self.beta * base + (1 - self.beta) * zf
                self._n[key] = n + 1
            if self._edge(o.layer, self._runs[o.layer] >= self.patience):
                alarms.append(Alarm(step, self.name, "act", o.layer, o.level,
                                    f"{zf:.0%} of outputs are zero for {self.patience} steps "
                                    f"(threshold {self.threshold:.0%}, baseline {base:.0%})", zf))
        return alarms


class ActivationScaleDetector(Detector):
    """Rule: an activation layer's RMS leaves [1/factor, factor] x its own EMA baseline
    (after ``warmup`` steps; outliers are kept out of the baseline; one baseline per level,
    since raw, micro and meso estimate the RMS differently). Catches input corruption and
    exploding activations; at macro it watches the pooled RMS only."""

    name = "activation_scale"

    def __init__(self, factor: float = 10.0, warmup: int = 10, beta: float = 0.9) -> None:
        super().__init__()
        self.factor, self.warmup, self.beta = factor, warmup, beta
        self._ema: dict[str, float] = {}
        self._n: dict[str, int] = {}

    def update(self, step, obs, loss):
        alarms = []
        for o in obs:
            rms = o.rms
            if o.kind != "act" or not math.isfinite(rms):
                continue
            key = (o.layer, o.level)  # levels estimate RMS differently: one baseline each
            n, ema = self._n.get(key, 0), self._ema.get(key, rms)
            r = rms / ema if ema > 0 else 1.0  # a baseline of exactly 0 has no scale to leave
            bad = n >= self.warmup and (r > self.factor or r < 1 / self.factor)
            if self._edge(o.layer, bad):
                alarms.append(Alarm(step, self.name, "act", o.layer, o.level,
                                    f"activation RMS {rms:.3g} = {r:.3g}x its EMA {ema:.3g}", r))
            if not bad:
                self._ema[key] = rms if n == 0 else self.beta * ema + (1 - self.beta) * rms
                self._n[key] = n + 1
        return alarms


class LossDetector(Detector):
    """Loss spikes, divergence, plateaus and non-finite losses: the rules of
    :class:`adaptive_kit.anomaly.SeriesMonitor` on the step's loss (sent at every level)."""

    name = "loss"

    def __init__(self, config: SeriesConfig = SeriesConfig()) -> None:
        super().__init__()
        self.monitor = SeriesMonitor("loss", config)

    def update(self, step, obs, loss):
        if loss is None:
            return []
        alarms = self.monitor.update(step, loss)
        if not math.isfinite(loss):  # the monitor reports every bad step; report the first
            return alarms if self._edge("nonfinite", True) else []
        self._edge("nonfinite", False)
        return alarms


class DetectorSuite:
    """Runs detectors on every :class:`StepRecord`; pass it as ``Telemetry(on_record=suite)``.

    A detector that raises is counted in :attr:`errors` (with one warning) and skipped for
    that step: detection never breaks the training step. :attr:`latency_s` keeps the
    analysis time of every step.
    """

    def __init__(self, detectors: Iterable[Detector]) -> None:
        self.detectors = list(detectors)
        self.alarms: list[Alarm] = []
        self.latency_s: list[float] = []
        self.errors = 0
        self.last_observations: list[Observation] = []

    @classmethod
    def standard(cls, param_layers: list[str], relu_layers: Iterable[str],
                 loss_config: SeriesConfig = SeriesConfig()) -> DetectorSuite:
        """The standard detectors for a model with these parameter and ReLU layers."""
        return cls([
            NonFiniteDetector(),
            GradientRatioDetector(param_layers[0], param_layers[-1]),
            DeadReLUDetector(relu_layers),
            ActivationScaleDetector(),
            LossDetector(loss_config),
        ])

    @classmethod
    def for_telemetry(cls, tel, loss_config: SeriesConfig = SeriesConfig()) -> DetectorSuite:
        """The standard detectors wired to a :class:`~adaptive_kit.telemetry.Telemetry`'s layers."""
        return cls.standard(tel.param_layers, tel.relu_layers, loss_config)

    def __call__(self, record: StepRecord) -> list[Alarm]:
        start = time.perf_counter()
        obs = observations(record)
        self.last_observations = obs
        found: list[Alarm] = []
        for d in self.detectors:
            try:
                found.extend(d.update(record.step, obs, record.loss))
            except Exception as e:  # a detector must never break training
                self.errors += 1
                if self.errors == 1:
                    warnings.warn(f"detector {d.name} failed at step {record.step}: {e!r}", stacklevel=2)
        self.latency_s.append(time.perf_counter() - start)
        self.alarms.extend(found)
        return found
