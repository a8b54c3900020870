"""Closing the loop: detectors read each step's records, a policy sets the next step's levels."""
from __future__ import annotations

import math
import time

import numpy as np

from ..anomaly import Alarm
from ..resources import ResourceSampler
from .collector import StepRecord, Telemetry
from .detectors import DetectorSuite
from .policies import Plan, Policy, State


class StateTracker:
    """Builds the :class:`State` a policy sees from each step's alarms and observations."""

    def __init__(self, steps_total: int, memory: int = 5, beta: float = 0.9) -> None:
        self.steps_total, self.memory, self.beta = steps_total, memory, beta
        self._recent: list[Alarm] = []
        self._last_alarm = -(10**9)
        self._cx_ema: float | None = None
        self._loss_ema: float | None = None
        self._loss_var = 0.0
        self.state = State(0, steps_total)

    def update(self, step: int, alarms: list[Alarm], grad_var: float | None, loss: float | None,
               utilisation: float) -> State:
        if alarms:
            self._last_alarm = step
        self._recent = [a for a in self._recent if a.step > step - self.memory] + list(alarms)
        complexity = 0.0
        if grad_var is not None and grad_var > 0 and math.isfinite(grad_var):
            lv = math.log10(grad_var)
            self._cx_ema = lv if self._cx_ema is None else self.beta * self._cx_ema + (1 - self.beta) * lv
            complexity = lv - self._cx_ema
        loss_z = 0.0
        if loss is not None and math.isfinite(loss):
            if self._loss_ema is None:
                self._loss_ema = loss
            else:
                d = loss - self._loss_ema
                loss_z = d / math.sqrt(self._loss_var) if self._loss_var > 0 else 0.0
                self._loss_ema += (1 - self.beta) * d
                self._loss_var = self.beta * (self._loss_var + (1 - self.beta) * d * d)
        elif loss is not None:
            loss_z = 5.0
        self.state = State(step + 1, self.steps_total, list(self._recent), step + 1 - self._last_alarm,
                           utilisation, complexity, loss_z)
        return self.state


def grad_variance(suite: DetectorSuite) -> float | None:
    """Data complexity of the last step: mean variance of the gradient values seen."""
    var = [o.std ** 2 for o in suite.last_observations if o.kind == "grad" and math.isfinite(o.std)]
    return float(np.mean(var)) if var else None


def level_of(plan: dict, kind: str, layer: str) -> str:
    return plan.get("layers", {}).get((kind, layer), plan["kinds"][kind])


class Controller:
    """Drives a live :class:`Telemetry` with a policy: pass it as ``on_record``.

    ``Controller(tel, RulePolicy())`` installs itself: every step's record goes through the
    detectors, the policy sees the new :class:`State`, and its plan becomes the levels of the
    next collected step (hooks stay registered; only levels change).
    """

    def __init__(self, tel: Telemetry, policy: Policy, suite: DetectorSuite | None = None,
                 steps_total: int = 1000, util_interval_s: float = 1.0) -> None:
        self.tel = tel
        self.policy = policy
        self.suite = suite if suite is not None else DetectorSuite.for_telemetry(tel)
        self.tracker = StateTracker(steps_total)
        self.sampler = ResourceSampler()
        self.util_interval_s = util_interval_s  # utilisation is read from /proc at most this often
        self._util, self._util_at = 0.0, -math.inf
        self.plans: list[Plan] = []
        policy.reset()
        tel.on_record = self
        self.apply(policy.act(self.tracker.state))

    def apply(self, plan: Plan) -> None:
        """Set the collector's levels to ``plan``."""
        self.tel.set_levels(plan["kinds"])
        for (kind, layer), level in plan.get("layers", {}).items():
            if layer != "*" and (kind, layer) in self.tel.plan:
                self.tel.set_levels(level, kind=kind, layers=[layer])
        self.plans.append(plan)

    def __call__(self, record: StepRecord) -> list[Alarm]:
        alarms = self.suite(record)
        now = time.monotonic()
        if now - self._util_at >= self.util_interval_s:
            self._util, self._util_at = self.sampler.sample()["util_percent"][0], now
        state = self.tracker.update(record.step, alarms, grad_variance(self.suite), record.loss, self._util)
        self.apply(self.policy.act(state))
        return alarms
