"""Closing the loop: detectors read each step's records, a policy sets the next step's levels."""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import numpy as np

from ..anomaly import Alarm
from ..stats import EMA
from .collector import LEVELS, StepRecord, Telemetry
from .policies import Plan, Policy, State
from .suite import DetectorSuite

LOOK_LEVELS = frozenset(LEVELS[LEVELS.index("meso"):])  # levels that see each layer


class StateTracker:
    """Builds the :class:`State` a policy sees from each step's alarms, loss, gradients and looks."""

    def __init__(self, steps_total: int, keys: Iterable[tuple[str, str]] = (), memory: int = 5,
                 beta: float = 0.9) -> None:
        self.steps_total, self.memory, self.beta = steps_total, memory, beta
        self.keys = tuple(keys)
        self._recent: list[Alarm] = []
        self._last_alarm = -(10**9)
        self._last_look: dict[tuple[str, str], int] = {}
        self._cx = EMA(beta)  # of log10 gradient variance
        self._loss = EMA(beta)
        self.state = State(0, steps_total, keys=self.keys)

    def update(self, step: int, alarms: list[Alarm], grad_var: float | None, loss: float | None,
               *, looked: Iterable[tuple[str, str]] = (), suspicion: dict | None = None,
               pending: frozenset = frozenset()) -> State:
        """Fold in one step: its alarms, gradient variance, loss and the layers it looked at."""
        if alarms:
            self._last_alarm = step
        for key in looked:
            self._last_look[key] = step
        self._recent = [a for a in self._recent if a.step > step - self.memory] + list(alarms)
        complexity = 0.0
        if grad_var is not None and grad_var > 0 and math.isfinite(grad_var):
            lv = math.log10(grad_var)
            complexity = lv - self._cx.update(lv)
        loss_z = 0.0
        if loss is not None and math.isfinite(loss):
            if self._loss.n and self._loss.var > 0:  # against the history before this loss
                loss_z = (loss - self._loss.mean) / math.sqrt(self._loss.var)
            self._loss.update(loss)
        elif loss is not None:
            loss_z = 5.0
        since = {k: step + 1 - t for k, t in self._last_look.items()}
        self.state = State(step + 1, self.steps_total, list(self._recent), step + 1 - self._last_alarm,
                           complexity, loss_z, self.keys, since, dict(suspicion or {}), frozenset(pending))
        return self.state


def grad_variance(suite: DetectorSuite) -> float | None:
    """Data complexity of the last step: mean variance of the gradient values seen."""
    var = [o.std ** 2 for o in suite.last_observations if o.kind == "grad" and math.isfinite(o.std)]
    return float(np.mean(var)) if var else None


def level_of(plan: dict, kind: str, layer: str) -> str:
    return plan.get("layers", {}).get((kind, layer), plan["kinds"][kind])


class Controller:
    """Drives a live :class:`Telemetry` with a policy: pass it as ``on_step``.

    ``Controller(tel, RulePolicy())`` installs itself: every step's record goes through the
    detectors, the policy sees the new :class:`State`, and its plan becomes the levels of the
    next collected step (hooks stay registered; only levels change). The levels the collector
    had before are the levels of step 0 when ``keep_levels`` is true; otherwise the policy's
    first plan replaces them (and a warning says so if they differed).
    """

    def __init__(self, tel: Telemetry, policy: Policy, suite: DetectorSuite | None = None,
                 steps_total: int = 1000, keep_levels: bool = False) -> None:
        self.tel = tel
        self.policy = policy
        self.suite = suite if suite is not None else DetectorSuite.for_telemetry(tel)
        self.tracker = StateTracker(steps_total, tel.plan.keys())
        self.plans: list[Plan] = []
        policy.reset()
        tel.on_step = self
        before = dict(tel.plan)
        first = policy.act(self.tracker.state)
        if keep_levels:
            self.plans.append(first)
        else:
            self.apply(first)
            if tel.plan != before and set(before.values()) != {"off"}:
                changed = sorted({f"{k}={lv}" for (k, _), lv in before.items()})
                warnings.warn(f"Controller: the policy's first plan replaces the collector's levels "
                              f"({', '.join(changed)}); pass keep_levels=True to start from them",
                              stacklevel=2)

    def apply(self, plan: Plan) -> None:
        """Set the collector's levels to ``plan``."""
        self.tel.set_levels(plan["kinds"])
        for (kind, layer), level in plan.get("layers", {}).items():
            if layer != "*" and (kind, layer) in self.tel.plan:
                self.tel.set_levels(level, kind=kind, layers=[layer])
        self.plans.append(plan)

    def __call__(self, record: StepRecord) -> list[Alarm]:
        alarms = self.suite(record)
        looked = [(o.kind, o.layer) for o in self.suite.last_observations if o.level in LOOK_LEVELS]
        state = self.tracker.update(record.step, alarms, grad_variance(self.suite), record.loss,
                                    looked=looked, suspicion=self.suite.suspicion,
                                    pending=self.suite.pending)
        self.apply(self.policy.act(state))
        return alarms
