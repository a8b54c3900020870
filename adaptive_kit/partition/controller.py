"""The runtime adaptation controller: re-partition when devices depart from the plan, and only
when it pays.

Every monitoring window the controller gets each stage's measured seconds and what the cost model
predicted for them (for the batches that ran, at speed 1). Their ratio is the device's *load
factor* (1 = as predicted, 2 = twice as slow). A :class:`~adaptive_kit.partition.Forecaster` per
device predicts the next windows' load with an interval. A device *deviates* when its load, now
or as forecast, is off the load the plan assumed by more than ``threshold``. After ``patience``
deviating windows in a row on one device (its count resets only when it is back within
``release`` x threshold: hysteresis) and outside the ``cooldown`` after the last re-partition,
the controller plans for the recent loads and re-partitions when the new plan's step is at least
``min_improvement`` shorter and the time saved over the remaining steps exceeds the migration
cost. A planner that fails leaves the old plan in force.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import networkx as nx
import numpy as np
import pandas as pd

from ..checks import check_int
from .forecast import ForecastConfig, Forecaster
from .plan import GraphPlan, best_plan
from .simulate import simulate


@dataclass(frozen=True)
class ControllerConfig:
    threshold: float = 0.25  # relative departure of a device's load from the plan's assumption
    patience: int = 2  # deviating windows in a row before acting
    release: float = 0.5  # the count resets when every device is within release x threshold
    cooldown: int = 4  # windows after a re-partition (or a failed one) without another
    margin: float = 1.0  # re-partition when saving > margin x migration cost
    min_improvement: float = 0.10  # ... and the new plan's step is at least this much shorter
    horizon: int = 2  # windows ahead the forecast looks
    forecast: ForecastConfig = field(default_factory=lambda: ForecastConfig(season=0, refit_every=8, window=64))

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold!r}")
        for name in ("patience", "horizon"):
            check_int(name, getattr(self, name), 1)
        check_int("cooldown", self.cooldown, 0)
        if not 0 <= self.release <= 1:
            raise ValueError(f"release must be in [0, 1], got {self.release!r}")
        if not self.margin >= 0:
            raise ValueError(f"margin must be >= 0, got {self.margin!r}")
        if not 0 <= self.min_improvement < 1:
            raise ValueError(f"min_improvement must be in [0, 1), got {self.min_improvement!r}")


@dataclass(frozen=True)
class Decision:
    window: int
    repartition: bool
    reason: str  # "steady", "deviating", "cooldown", "no gain", "planner failed: ...", "repartition"
    load: tuple[float, ...]  # measured load factor per device
    deviation: float  # largest departure from the assumed load, now or forecast
    gain_s: float = 0.0  # seconds saved over the remaining steps by the candidate plan
    cost_s: float = 0.0  # its migration cost


def migration_seconds(g: nx.DiGraph, old: dict[str, int], new: dict[str, int], bandwidth: float,
                      state_copies: int = 2, fixed_s: float = 0.0) -> float:
    """Seconds to move the parameters (and ``state_copies - 1`` optimiser buffers each, e.g. SGD
    momentum) of every node that changes stage over links of ``bandwidth`` bytes/s."""
    moved = sum(g.nodes[v].get("param_bytes", 0) for v in new if old.get(v) != new[v])
    return fixed_s + state_copies * moved / bandwidth


class Controller:
    """Watches per-stage times against predictions and decides when to re-partition.

    Args:
        planner: speeds (k,) -> a plan with ``stage_s`` and ``bottleneck_s`` (seconds per step)
            and ``stage_of``; it may raise, which keeps the old plan.
        plan: the plan in force, made for ``speeds``.
        migration_cost: (old plan, new plan) -> seconds to apply the new one.
    """

    def __init__(self, planner: Callable[[np.ndarray], GraphPlan], plan: GraphPlan,
                 migration_cost: Callable[[GraphPlan, GraphPlan], float],
                 speeds: Sequence[float] | None = None, config: ControllerConfig = ControllerConfig()) -> None:
        self.planner, self.plan, self.migration_cost, self.config = planner, plan, migration_cost, config
        k = len(plan.stage_s)
        self.assumed = np.ones(k) if speeds is None else np.asarray(speeds, dtype=float)
        if self.assumed.shape != (k,) or (self.assumed <= 0).any():
            raise ValueError(f"speeds must be {k} positive numbers, got {speeds!r}")
        self.forecasters = [Forecaster(config.forecast) for _ in range(k)]
        self.window = 0
        self.over = np.zeros(k, dtype=int)  # deviating windows in a row, per device
        self.cool = 0
        self.recent: list[np.ndarray] = []
        self.decisions: list[Decision] = []
        self.rows: list[tuple] = []
        self.failures = 0

    def observe(self, measured_s: Sequence[float], predicted_s: Sequence[float], remaining_steps: int) -> Decision:
        """One monitoring window: measured and predicted (speed 1) seconds per stage per step."""
        cfg = self.config
        measured = np.asarray(measured_s, dtype=float)
        predicted = np.asarray(predicted_s, dtype=float)
        k = len(self.assumed)
        if measured.shape != (k,) or predicted.shape != (k,):
            raise ValueError(f"measured_s and predicted_s need {k} entries, got {measured.shape}, {predicted.shape}")
        if not (np.isfinite(measured).all() and (measured > 0).all() and (predicted > 0).all()):
            raise ValueError(f"stage seconds must be finite and > 0, got measured={measured.tolist()} "
                             f"predicted={predicted.tolist()}")
        load = measured / predicted
        assumed_load = 1 / self.assumed
        fc = np.empty(k)
        for j, f in enumerate(self.forecasters):
            f.update(float(load[j]))
            out = f.forecast(cfg.horizon)
            fc[j] = out.mean[-1]
            self.rows.append((self.window, j, load[j], out.mean[0], out.lower[0], out.upper[0], assumed_load[j]))
        dev = np.maximum(np.abs(load / assumed_load - 1), np.abs(fc / assumed_load - 1))
        deviation = float(dev.max())
        self.recent = [*self.recent[-(cfg.patience - 1):], load] if cfg.patience > 1 else [load]
        self.over = np.where(dev > cfg.threshold, self.over + 1,
                             np.where(dev < cfg.release * cfg.threshold, 0, self.over))
        decision = Decision(self.window, False, "steady", tuple(load.tolist()), deviation)
        if self.cool > 0:
            self.cool -= 1
            decision = replace(decision, reason="cooldown")
        elif self.over.max() >= cfg.patience:
            decision = self._consider(decision, remaining_steps, predicted)
        elif self.over.any():
            decision = replace(decision, reason="deviating")
        self.decisions.append(decision)
        self.window += 1
        return decision

    def _consider(self, decision: Decision, remaining: int, predicted: np.ndarray) -> Decision:
        speeds = 1 / np.median(np.stack(self.recent), axis=0)
        try:
            candidate = self.planner(speeds)
        except Exception as e:  # noqa: BLE001 - any planner failure keeps the old plan
            self.failures += 1
            self.cool = self.config.cooldown
            return replace(decision, reason=f"planner failed: {type(e).__name__}: {e}")
        current = float((predicted / speeds).max())  # the plan in force at the new speeds
        gain = (current - candidate.bottleneck_s) * remaining
        cost = float(self.migration_cost(self.plan, candidate))
        self.over[:] = 0
        self.cool = self.config.cooldown
        small = candidate.bottleneck_s > (1 - self.config.min_improvement) * current
        if gain <= self.config.margin * cost or gain <= 0 or small:
            self.assumed = speeds  # known now: no need to re-plan for them again
            return replace(decision, reason="no gain", gain_s=gain, cost_s=cost)
        self.plan, self.assumed = candidate, speeds
        for f in self.forecasters:  # the new plan's loads start afresh
            f.reset()
        return replace(decision, repartition=True, reason="repartition", gain_s=gain, cost_s=cost)

    def history(self) -> pd.DataFrame:
        """Per window and device: measured load, forecast (mean, interval) and the assumed load."""
        return pd.DataFrame(self.rows, columns=["window", "device", "load", "forecast", "lower", "upper", "assumed"])


class EmulatedPipeline:
    """A pipeline of ``k`` emulated devices under the controller, one monitoring window per
    :meth:`step`: stage times are the graph's costs over each device's speed (``speeds``, which
    may change between steps, e.g. from a panel's slider) times log-normal noise.

    ``throughput`` is the 1F1B step rate of the plan in force at the true speeds (noise-free),
    ``optimum`` the best plan's, so their ratio is the share recovered.
    """

    def __init__(self, g: nx.DiGraph, k: int, *, noise: float = 0.05, micro: int = 8, steps: int = 1000,
                 steps_per_window: int = 10, bandwidth: float = float("inf"), cost: str = "cost_s",
                 config: ControllerConfig = ControllerConfig(), adapt: bool = True, seed: int = 0) -> None:
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0, got {noise!r}")
        self.g, self.k, self.noise, self.micro, self.cost, self.bandwidth = g, k, noise, micro, cost, bandwidth
        self.steps, self.steps_per_window, self.adapt = steps, steps_per_window, adapt
        self.rng = np.random.default_rng(seed)
        self.speeds = np.ones(k)
        self._plans: dict[tuple, GraphPlan] = {}
        link = 1e9 if not np.isfinite(bandwidth) else bandwidth
        self.controller = Controller(self._plan, self._plan(np.ones(k)),
                                     lambda a, b: migration_seconds(g, a.stage_of, b.stage_of, link), config=config)
        self.rows: list[dict] = []

    def _plan(self, speeds: np.ndarray) -> GraphPlan:
        key = tuple(np.round(np.asarray(speeds, dtype=float), 12))
        if key not in self._plans:  # the optimum is re-asked every window at the same speeds
            self._plans[key] = best_plan(self.g, self.k, speeds, self.bandwidth, self.cost)
        return self._plans[key]

    def _rate(self, stage_s: np.ndarray) -> float:
        """Steps per second of 1F1B for stages taking ``stage_s`` per step (a third forward)."""
        f = stage_s / (3 * self.micro)
        return 1 / simulate(f, 2 * f, micro=self.micro).makespan_s

    def step(self) -> dict:
        """One window: measure, let the controller decide, record throughput against the optimum."""
        if not (np.isfinite(self.speeds).all() and (self.speeds > 0).all()):
            raise ValueError(f"speeds must be finite and > 0, got {self.speeds.tolist()}")
        w = len(self.rows)
        predicted = np.zeros(self.k)
        for v, j in self.controller.plan.stage_of.items():
            predicted[j] += self.g.nodes[v][self.cost]
        true = predicted / self.speeds
        measured = true * np.exp(self.rng.normal(0, self.noise, self.k))
        row = {"window": w, "throughput": self._rate(true), "optimum": self._rate(np.array(self._plan(self.speeds).stage_s)),
               "measured": self._rate(measured), "repartition": False, "reason": "off", "deviation": float("nan")}
        if self.adapt:
            remaining = max(self.steps - w * self.steps_per_window, 0)
            d = self.controller.observe(measured, predicted, remaining)
            row.update(repartition=d.repartition, reason=d.reason, deviation=d.deviation)
        self.rows.append(row)
        return row

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def emulate(g: nx.DiGraph, k: int, windows: int, slowdown: dict[int, tuple[int, float]] | None = None,
            **kwargs) -> EmulatedPipeline:
    """Run :class:`EmulatedPipeline` for ``windows``; ``slowdown`` maps a device to (window, factor)."""
    pipe = EmulatedPipeline(g, k, **kwargs)
    for dev, (_, factor) in (slowdown or {}).items():
        if not 0 <= dev < k or not factor > 0:
            raise ValueError(f"slowdown needs a device in [0, {k}) and a factor > 0, got {dev}: {factor}")
    for w in range(windows):
        pipe.speeds = np.ones(k)
        for dev, (start, factor) in (slowdown or {}).items():
            if w >= start:
                pipe.speeds[dev] = 1 / factor
        pipe.step()
    return pipe
