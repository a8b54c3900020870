"""Level policies: which granularity each data kind gets at the next step.

A policy sees a :class:`State` (what the last step's telemetry and detectors said) and returns
a plan: a level per data kind, and optionally finer levels for named layers. Four are here:

- :class:`StaticPolicy`: the same plan every step.
- :class:`RulePolicy`: coarse while quiet; on an alarm, the alarmed layers (all layers of the
  kind when the alarm cannot localise, ``layer == "*"``) go fine; back after a quiet period.
- :class:`QLearningPolicy`: the seed's tabular Q-learning, epsilon-greedy over a discretised
  state (training phase, recent anomalies, resource utilisation, data complexity), one joint
  action = a level per data kind.
- :class:`LinUCBPolicy`: a contextual bandit (LinUCB, Li et al., WWW 2010) per data kind on
  continuous features; it generalises across states the table must visit one by one.

Rewards come from :class:`RewardWeights`: detections minus false positives minus bytes minus
analysis latency, each with a configurable weight.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

import numpy as np

from ..anomaly import Alarm
from .collector import KINDS, LEVELS

Plan = dict  # {"kinds": {kind: level}, "layers": {(kind, layer): level}}
ACTION_LEVELS: tuple[str, ...] = ("macro", "meso", "micro", "raw")


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the reward terms; analysis latency comes from a cost model (see below).

    Measured analysis time depends on the machine's load, which would make training
    irreproducible, so the reward charges a model of it instead: ``latency_ms_per_row`` per
    record row plus ``latency_ms_per_value`` per raw/micro value analysed (fitted to the
    detectors' measured time on the benchmark machine: 0.19 ms for a meso step of 22 rows,
    2.8 ms for a raw step of ~20,000 values). The measured time is still reported.
    """

    detection: float = 10.0  # per true alarm (fired while a fault is active)
    false_positive: float = 10.0  # per false alarm (clean run, or before the fault)
    bytes: float = 1.0  # per step, times bytes sent / bytes that always-raw would send
    latency: float = 0.1  # per (modelled) millisecond of analysis time
    latency_ms_per_row: float = 0.008  # analysis cost model: per record row ...
    latency_ms_per_value: float = 1.3e-4  # ... plus per raw or micro value

    def analysis_ms(self, rows: int, values: int) -> float:
        """Modelled analysis time of a step with ``rows`` record rows and ``values`` values."""
        return self.latency_ms_per_row * rows + self.latency_ms_per_value * values

    def reward(self, true_alarms: int, false_alarms: int, bytes_frac: float, latency_ms: float) -> float:
        return (self.detection * true_alarms - self.false_positive * false_alarms
                - self.bytes * bytes_frac - self.latency * latency_ms)


@dataclass
class State:
    """What a policy knows before choosing the next step's levels."""

    step: int
    steps_total: int
    alarms: list[Alarm] = field(default_factory=list)  # alarms of the last `memory` steps
    steps_since_alarm: int = 10**9
    utilisation: float = 0.0  # CPU (or GPU) utilisation in [0, 100]
    complexity: float = 0.0  # log10 variance of gradient values relative to its running mean
    loss_z: float = 0.0  # z-score of the last loss against its EMA

    def discrete(self) -> tuple[int, int, int, int]:
        """The seed's state: (phase, anomaly, utilisation, complexity), each a small integer."""
        frac = self.step / max(self.steps_total, 1)
        phase = 0 if frac < 0.1 else (1 if frac < 0.5 else 2)
        anomaly = 1 if self.steps_since_alarm <= 5 else 0
        util = 1 if self.utilisation >= 70 else 0
        cx = 0 if self.complexity < -0.5 else (2 if self.complexity > 0.5 else 1)
        return phase, anomaly, util, cx

    def features(self) -> np.ndarray:
        """Continuous features for learned policies (bias first)."""
        recent = math.exp(-self.steps_since_alarm / 5.0) if self.steps_since_alarm < 10**9 else 0.0
        return np.array([1.0, self.step / max(self.steps_total, 1), recent, self.utilisation / 100.0,
                         float(np.clip(self.complexity, -3, 3)), float(np.clip(self.loss_z, -5, 5))])


class Policy:
    """Base: ``act(state) -> plan``; ``learn(...)`` after the step's reward is known."""

    name = "policy"
    learning = False

    def reset(self) -> None:
        """Start of an episode."""

    def act(self, state: State) -> Plan:
        raise NotImplementedError

    def learn(self, state: State, plan: Plan, reward: float, next_state: State) -> None:
        """Update from one transition (no-op for fixed policies)."""


def _check_level(level: str, field_name: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"{field_name}={level!r}: expected one of {LEVELS}")
    return level


class StaticPolicy(Policy):
    """The same level(s) every step: one level, or a mapping kind -> level (kinds left out are off)."""

    def __init__(self, levels: str | dict[str, str] = "meso") -> None:
        if isinstance(levels, str):
            levels = {k: levels for k in KINDS}
        for k, lv in levels.items():
            if k not in KINDS:
                raise ValueError(f"StaticPolicy: kind={k!r}: expected one of {KINDS}")
            _check_level(lv, f"StaticPolicy.levels[{k!r}]")
        self.levels = {k: levels.get(k, "off") for k in KINDS}  # a plan names every kind
        self.name = "static:" + ",".join(f"{k}={v}" for k, v in self.levels.items()) \
            if len(set(self.levels.values())) > 1 else f"static:{next(iter(self.levels.values()))}"

    def act(self, state: State) -> Plan:
        return {"kinds": dict(self.levels), "layers": {}}


class RulePolicy(Policy):
    """Coarse by default; alarmed layers go to ``escalate`` until ``quiet`` steps pass without alarms."""

    name = "rule"

    def __init__(self, base: str | dict[str, str] = "macro", escalate: str = "raw", quiet: int = 10) -> None:
        if isinstance(quiet, bool) or not isinstance(quiet, int) or quiet < 1:
            raise ValueError(f"RulePolicy.quiet must be an int >= 1, got {quiet!r}")
        self.base = StaticPolicy(base).levels
        self.escalate = _check_level(escalate, "RulePolicy.escalate")
        self.quiet = quiet
        self.reset()

    def reset(self) -> None:
        self._until: dict[tuple[str, str], int] = {}

    def act(self, state: State) -> Plan:
        for a in state.alarms:
            # quiet counts from the alarm's own step: State.alarms repeats it for `memory` steps
            keys = [(a.kind, a.layer)] if a.kind in KINDS else [(k, "*") for k in KINDS]
            for key in keys:  # a loss alarm says nothing about where: look everywhere
                self._until[key] = max(self._until.get(key, a.step), a.step + self.quiet)
        self._until = {key: t for key, t in self._until.items() if t >= state.step}
        kinds = dict(self.base)
        layers = {}
        for (kind, layer), _ in self._until.items():
            if layer == "*":
                kinds[kind] = self.escalate
            else:
                layers[(kind, layer)] = self.escalate
        return {"kinds": kinds, "layers": layers}


JOINT_ACTIONS: tuple[tuple[str, ...], ...] = tuple(itertools.product(ACTION_LEVELS, repeat=len(KINDS)))


class QLearningPolicy(Policy):
    """The seed's tabular Q-learning agent (epsilon-greedy, learning rate 0.1, discount 0.9).

    State: :meth:`State.discrete`. Action: one level per data kind (``len(ACTION_LEVELS)**3``
    joint actions), applied to all layers of that kind.
    """

    name = "q-learning"
    learning = True

    def __init__(self, epsilon: float = 0.1, learning_rate: float = 0.1, discount: float = 0.9,
                 seed: int = 0) -> None:
        for name, v in (("epsilon", epsilon), ("learning_rate", learning_rate), ("discount", discount)):
            if not 0 <= v <= 1:
                raise ValueError(f"QLearningPolicy.{name} must be in [0, 1], got {v!r}")
        self.epsilon, self.learning_rate, self.discount = epsilon, learning_rate, discount
        self.q: dict[tuple, np.ndarray] = {}
        self._rng = random.Random(seed)
        self.training = True

    def _row(self, s: tuple) -> np.ndarray:
        if s not in self.q:
            self.q[s] = np.zeros(len(JOINT_ACTIONS))
        return self.q[s]

    def act(self, state: State) -> Plan:
        s = state.discrete()
        if self.training and self._rng.random() < self.epsilon:
            a = self._rng.randrange(len(JOINT_ACTIONS))
        else:
            row = self._row(s)
            best = np.flatnonzero(row == row.max())
            a = int(best[0]) if len(best) == len(row) else int(self._rng.choice(list(best)))
        self._last = a
        return {"kinds": dict(zip(KINDS, JOINT_ACTIONS[a])), "layers": {}, "action": a}

    def learn(self, state: State, plan: Plan, reward: float, next_state: State) -> None:
        if not self.training:
            return
        s, s2, a = state.discrete(), next_state.discrete(), plan["action"]
        row = self._row(s)
        row[a] = (1 - self.learning_rate) * row[a] + self.learning_rate * (
            reward + self.discount * self._row(s2).max())


class LinUCBPolicy(Policy):
    """A LinUCB contextual bandit per data kind over :meth:`State.features`.

    Each kind keeps, per level, a ridge regression of the step's reward on the features and
    picks the level with the highest upper confidence bound ``theta.x + alpha sqrt(x' A^-1 x)``.
    The step's reward is shared by the three kinds' choices.
    """

    name = "linucb"
    learning = True

    def __init__(self, alpha: float = 1.0, ridge: float = 1.0) -> None:
        if not alpha >= 0 or not ridge > 0:
            raise ValueError(f"LinUCBPolicy(alpha={alpha!r}, ridge={ridge!r}): need alpha >= 0, ridge > 0")
        self.alpha = alpha
        d = len(State(0, 1).features())
        self.A = {(k, lv): np.eye(d) * ridge for k in KINDS for lv in ACTION_LEVELS}
        self.b = {(k, lv): np.zeros(d) for k in KINDS for lv in ACTION_LEVELS}
        self.training = True

    def act(self, state: State) -> Plan:
        x = state.features()
        kinds = {}
        for k in KINDS:
            best, best_score = ACTION_LEVELS[0], -math.inf
            for lv in ACTION_LEVELS:
                a_inv = np.linalg.inv(self.A[(k, lv)])
                theta = a_inv @ self.b[(k, lv)]
                score = theta @ x + (self.alpha * math.sqrt(x @ a_inv @ x) if self.training else 0.0)
                if score > best_score:
                    best, best_score = lv, score
            kinds[k] = best
        return {"kinds": kinds, "layers": {}}

    def learn(self, state: State, plan: Plan, reward: float, next_state: State) -> None:
        if not self.training:
            return
        x = state.features()
        for k, lv in plan["kinds"].items():
            if lv in ACTION_LEVELS:
                self.A[(k, lv)] += np.outer(x, x)
                self.b[(k, lv)] += reward * x
