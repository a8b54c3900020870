"""Level policies: which granularity each data kind, and each layer, gets at the next step.

A policy sees a :class:`State` (what the last step's telemetry and detectors said) and returns
a plan: a level per data kind, and finer levels for named layers. Coarse statistics cannot see
a fault confined to one layer, so every policy but the static ones spends a small budget of
fine-grained *looks* before any alarm:

- :class:`StaticPolicy`: the same plan every step.
- :class:`RulePolicy`: coarse while quiet, with a meso snapshot of every layer every
  ``look_every`` steps (one batch: Arrow's per-batch overhead makes one wide look far cheaper
  than many narrow ones); a layer whose look was bad is looked at again at once (the detectors
  confirm on two looks); alarmed layers (all layers of a kind when an alarm cannot localise)
  go to ``escalate`` for ``quiet`` steps.
- :class:`QLearningPolicy`: the specification's tabular Q-learning, epsilon-greedy over a discretised
  state, choosing one of :data:`ACTIONS` per step.
- :class:`LinUCBPolicy`: a contextual bandit (LinUCB, Li et al., WWW 2010) over continuous
  features, choosing one of :data:`ACTIONS` per step.

The learned policies keep the same budget of scheduled snapshots as the rule (``look_every``):
a look pays off only steps later, when what it found is confirmed, which a per-step learner
cannot credit; what they learn is what to do between snapshots.

:data:`ACTIONS` are ``base`` (the coarse plan), ``follow`` (look again at the layers with
unconfirmed evidence, per layer) and ``look`` (a meso snapshot of every layer). Rewards come
from :class:`RewardWeights`: detections and evidence found minus false alarms minus the bytes
sent beyond the coarse plan.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np

from ..anomaly import Alarm
from ..checks import check_int, check_number
from .collector import KINDS, LEVELS

Plan = dict  # {"kinds": {kind: level}, "layers": {(kind, layer): level}}


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the reward terms of one step.

    ``bytes`` charges what the step sent beyond the coarse (static macro) plan, in units of
    that plan's bytes, so that the exchange rate between a detection and a look does not
    depend on how many values the model has. ``latency`` charges a model of the analysis time
    (``latency_ms_per_row`` per record row plus ``latency_ms_per_value`` per raw/micro value,
    fitted to the detectors' measured time on the benchmark machine), not the measured time,
    which would make training depend on the machine's load; the measured time is reported.
    """

    detection: float = 10.0  # per true alarm (fired while a fault is active)
    false_positive: float = 10.0  # per false alarm (clean run, or before the fault)
    evidence: float = 2.0  # per layer whose look turned bad: + while a fault is active, - before
    bytes: float = 0.5  # per step, times (bytes sent / coarse plan's bytes - 1)
    latency: float = 0.0  # per (modelled) millisecond of analysis time
    latency_ms_per_row: float = 0.008  # analysis cost model: per record row ...
    latency_ms_per_value: float = 1.3e-4  # ... plus per raw or micro value

    def analysis_ms(self, rows: int, values: int) -> float:
        """Modelled analysis time of a step with ``rows`` record rows and ``values`` values."""
        return self.latency_ms_per_row * rows + self.latency_ms_per_value * values

    def reward(self, true_alarms: int, false_alarms: int, extra_bytes: float, latency_ms: float,
               evidence: float = 0.0) -> float:
        return (self.detection * true_alarms - self.false_positive * false_alarms
                + self.evidence * evidence - self.bytes * extra_bytes - self.latency * latency_ms)


@dataclass
class State:
    """What a policy knows before choosing the next step's levels: only what the training job
    itself produced (its alarms, loss, gradients and which layers it has looked at), never the
    host's load, which on a shared machine is other people's noise."""

    step: int
    steps_total: int
    alarms: list[Alarm] = field(default_factory=list)  # alarms of the last `memory` steps
    steps_since_alarm: int = 10**9
    complexity: float = 0.0  # log10 variance of gradient values relative to its running mean
    loss_z: float = 0.0  # z-score of the last loss against its EMA
    keys: tuple[tuple[str, str], ...] = ()  # every (kind, layer) the telemetry watches
    since_look: dict[tuple[str, str], int] = field(default_factory=dict)  # steps since seen at meso+
    suspicion: dict[tuple[str, str], float] = field(default_factory=dict)  # last look / threshold
    pending: frozenset[tuple[str, str]] = frozenset()  # a bad look not yet confirmed: look again

    def staleness(self) -> int:
        """Steps since the least recently looked-at layer was seen at meso or finer."""
        if not self.keys:
            return 0
        return max(self.since_look.get(k, self.step + 1) for k in self.keys)

    def discrete(self) -> tuple[int, int, int, int]:
        """(phase, anomaly, evidence, stale), each a small integer: the specification's phase and
        anomaly, with the job's own evidence (an unconfirmed bad look) and how long layers have
        gone unseen in place of host utilisation and data complexity."""
        frac = self.step / max(self.steps_total, 1)
        phase = 0 if frac < 0.1 else (1 if frac < 0.5 else 2)
        anomaly = 1 if self.steps_since_alarm <= 5 else 0
        evidence = 1 if self.pending else 0
        stale = min(self.staleness() // 4, 2)
        return phase, anomaly, evidence, stale

    def features(self) -> np.ndarray:
        """Continuous features for learned policies (bias first)."""
        recent = math.exp(-self.steps_since_alarm / 5.0) if self.steps_since_alarm < 10**9 else 0.0
        top = max(self.suspicion.values(), default=0.0)
        return np.array([1.0, self.step / max(self.steps_total, 1), recent, min(top, 3.0) / 3.0,
                         float(bool(self.pending)), min(self.staleness(), 16) / 16.0,
                         float(np.clip(self.complexity, -3, 3)) / 3.0, float(np.clip(self.loss_z, -5, 5)) / 5.0])


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


def _finer(a: str, b: str) -> str:
    return a if LEVELS.index(a) >= LEVELS.index(b) else b


ACTIONS: tuple[str, ...] = ("base", "follow", "look")


def action_plan(action: str, state: State, base: dict[str, str], look: str = "meso") -> Plan:
    """The plan of one of :data:`ACTIONS`: ``base`` levels per kind; ``follow`` adds ``look``
    for the layers with unconfirmed evidence; ``look`` puts every kind at ``look``."""
    if action not in ACTIONS:
        raise ValueError(f"action={action!r}: expected one of {ACTIONS}")
    kinds = dict(base)
    layers: dict[tuple[str, str], str] = {}
    if action == "look":
        kinds = {k: _finer(lv, look) for k, lv in kinds.items()}
    if action in ("follow", "look"):
        for key in state.pending:
            if key[1] == "*":  # evidence in pooled statistics: look at every layer of the kind
                kinds[key[0]] = _finer(kinds[key[0]], look)
            else:
                layers[key] = _finer(kinds.get(key[0], "off"), look)
    return {"kinds": kinds, "layers": layers, "action": action}


def _check_look_every(v: int, owner: str) -> int:
    return check_int(f"{owner}.look_every", v, 0)


class RulePolicy(Policy):
    """Coarse by default, with periodic and evidence-driven looks, and escalation on alarms.

    Every ``look_every`` steps every layer is seen at ``look`` (0: never); a layer whose last
    look was bad but not yet confirmed is seen at ``look`` at the next step; alarmed layers go
    to ``escalate`` until ``quiet`` steps pass without alarms (a loss alarm, or one at macro,
    says nothing about where: every layer of the kind goes).
    """

    name = "rule"

    def __init__(self, base: str | dict[str, str] = "macro", escalate: str = "meso", quiet: int = 10,
                 look_every: int = 4, look: str = "meso") -> None:
        check_int("RulePolicy.quiet", quiet, 1)
        _check_look_every(look_every, "RulePolicy")
        self.base = StaticPolicy(base).levels
        self.escalate = _check_level(escalate, "RulePolicy.escalate")
        self.look = _check_level(look, "RulePolicy.look")
        self.quiet, self.look_every = quiet, look_every
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
        snapshot = self.look_every and state.step % self.look_every == 0
        plan = action_plan("look" if snapshot else "follow", state, self.base, self.look)
        kinds, layers = plan["kinds"], plan["layers"]
        for (kind, layer), _ in self._until.items():
            if layer == "*":
                kinds[kind] = _finer(kinds[kind], self.escalate)
            else:
                layers[(kind, layer)] = _finer(layers.get((kind, layer), kinds[kind]), self.escalate)
        return plan


class _Scheduled(Policy):
    """A learned policy's fixed budget of looks: a meso snapshot every ``look_every`` steps is
    not a decision (it gives every layer a history to be compared with); the policy learns
    what to do on the other steps."""

    look_every = 0
    base: dict[str, str]

    def scheduled(self, state: State) -> Plan | None:
        if self.look_every and state.step % self.look_every == 0:
            return {**action_plan("look", state, self.base), "scheduled": True}
        return None


class QLearningPolicy(_Scheduled):
    """The specification's tabular Q-learning agent (epsilon-greedy, learning rate 0.1, discount 0.9).

    State: :meth:`State.discrete`. Action: one of :data:`ACTIONS` over the coarse ``base`` plan
    (``follow`` acts per layer). The discount lets it learn that a look pays off later, when
    the evidence it found is confirmed.
    """

    name = "q-learning"
    learning = True

    def __init__(self, epsilon: float = 0.1, learning_rate: float = 0.1, discount: float = 0.9,
                 seed: int = 0, base: str | dict[str, str] = "macro", look_every: int = 4) -> None:
        for name, v in (("epsilon", epsilon), ("learning_rate", learning_rate), ("discount", discount)):
            check_number(f"QLearningPolicy.{name}", v, 0.0, 1.0)
        self.epsilon, self.learning_rate, self.discount = epsilon, learning_rate, discount
        self.base = StaticPolicy(base).levels
        self.look_every = _check_look_every(look_every, "QLearningPolicy")
        self.q: dict[tuple, np.ndarray] = {}
        self._rng = random.Random(seed)
        self.training = True

    def _row(self, s: tuple) -> np.ndarray:
        if s not in self.q:
            self.q[s] = np.zeros(len(ACTIONS))
        return self.q[s]

    def act(self, state: State) -> Plan:
        fixed = self.scheduled(state)
        if fixed is not None:
            return fixed
        s = state.discrete()
        if self.training and self._rng.random() < self.epsilon:
            a = self._rng.randrange(len(ACTIONS))
        else:
            row = self._row(s)
            best = np.flatnonzero(row == row.max())
            a = int(best[0]) if len(best) == len(row) else int(self._rng.choice(list(best)))
        return action_plan(ACTIONS[a], state, self.base)

    def learn(self, state: State, plan: Plan, reward: float, next_state: State) -> None:
        if not self.training or plan.get("scheduled"):
            return
        s, s2, a = state.discrete(), next_state.discrete(), ACTIONS.index(plan["action"])
        row = self._row(s)
        row[a] = (1 - self.learning_rate) * row[a] + self.learning_rate * (
            reward + self.discount * self._row(s2).max())


class LinUCBPolicy(_Scheduled):
    """A LinUCB contextual bandit over :meth:`State.features`, one of :data:`ACTIONS` per step.

    Each action keeps a ridge regression of the step's reward on the features and the policy
    picks the highest upper confidence bound ``theta.x + alpha sqrt(x' A^-1 x)`` (the bound only
    while training).
    """

    name = "linucb"
    learning = True

    def __init__(self, alpha: float = 1.0, ridge: float = 1.0, base: str | dict[str, str] = "macro",
                 look_every: int = 4) -> None:
        check_number("LinUCBPolicy.alpha", alpha, 0.0)
        check_number("LinUCBPolicy.ridge", ridge, 0.0, open_low=True)
        self.alpha = alpha
        self.base = StaticPolicy(base).levels
        self.look_every = _check_look_every(look_every, "LinUCBPolicy")
        d = len(State(0, 1).features())
        self.A = {a: np.eye(d) * ridge for a in ACTIONS}
        self.b = {a: np.zeros(d) for a in ACTIONS}
        self.training = True

    def act(self, state: State) -> Plan:
        fixed = self.scheduled(state)
        if fixed is not None:
            return fixed
        x = state.features()
        best, best_score = ACTIONS[0], -math.inf
        for a in ACTIONS:
            a_inv = np.linalg.inv(self.A[a])
            score = (a_inv @ self.b[a]) @ x + (self.alpha * math.sqrt(x @ a_inv @ x) if self.training else 0.0)
            if score > best_score:
                best, best_score = a, score
        return action_plan(best, state, self.base)

    def learn(self, state: State, plan: Plan, reward: float, next_state: State) -> None:
        if not self.training or plan.get("scheduled"):
            return
        x = state.features()
        a = plan["action"]
        self.A[a] += np.outer(x, x)
        self.b[a] += reward * x
