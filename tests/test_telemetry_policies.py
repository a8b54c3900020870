"""Level policies, the live Controller and recorded episodes: rules and plans by hand, the specification's
Q-learning update by formula, a synthetic bandit for LinUCB, and replays of short recorded runs
(the kit's models and a user's own Workload)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adaptive_kit.anomaly import Alarm
from adaptive_kit.datasets import Split, digits
from adaptive_kit.stats import batched_stats
from adaptive_kit.telemetry import (
    KINDS,
    Controller,
    DetectorSuite,
    LinUCBPolicy,
    QLearningPolicy,
    RewardWeights,
    RulePolicy,
    State,
    StateTracker,
    StaticPolicy,
    Telemetry,
    TelemetryConfig,
    episodes,
)
from adaptive_kit.telemetry.detectors import Detector
from adaptive_kit.telemetry.episodes import (
    EpisodeResult,
    EpisodeSpec,
    Workload,
    _layer_choices,
    build_model,
    evaluate,
    fault_suite,
    record,
    replay,
    results_frame,
    summarize,
    train,
)
from adaptive_kit.telemetry.faults import FAULT_KINDS, LAYER_KINDS, QUIET_KINDS, Fault
from adaptive_kit.telemetry.observations import pool_rows
from adaptive_kit.telemetry.policies import ACTIONS, action_plan
from adaptive_kit.training import mlp

KEYS = (("grad", "0"), ("grad", "2"), ("act", "1"))


def alarm(step: int, kind: str = "act", layer: str = "1", detector: str = "test") -> Alarm:
    return Alarm(step, detector, kind, layer, "meso", "hand-made", 1.0)


# ---------------------------------------------------------------------------- reward and state
def test_reward_arithmetic():
    w = RewardWeights(detection=2.0, false_positive=3.0, bytes=4.0, latency=0.5, evidence=1.5)
    assert w.reward(5, 1, 0.25, 10.0) == pytest.approx(10 - 3 - 1 - 5)
    assert w.reward(5, 1, 0.25, 10.0, evidence=-2) == pytest.approx(10 - 3 - 1 - 5 - 3)
    assert w.reward(0, 0, 0.0, 0.0) == 0.0
    d = RewardWeights()  # no timing in the default reward: training does not depend on the machine
    assert d.reward(1, 2, 0.5, 3.0, evidence=1) == pytest.approx(10 * 1 - 10 * 2 - 0.5 * 0.5 + 2.0)
    assert d.analysis_ms(100, 1000) == pytest.approx(0.008 * 100 + 1.3e-4 * 1000)


@pytest.mark.parametrize("kwargs, expected", [
    ({"step": 0, "steps_total": 100}, (0, 0, 0, 0)),  # no keys: nothing is stale
    ({"step": 9, "steps_total": 100}, (0, 0, 0, 0)),
    ({"step": 10, "steps_total": 100}, (1, 0, 0, 0)),
    ({"step": 49, "steps_total": 100}, (1, 0, 0, 0)),
    ({"step": 50, "steps_total": 100}, (2, 0, 0, 0)),
    ({"step": 5, "steps_total": 0}, (2, 0, 0, 0)),  # steps_total 0: no division by zero
    ({"step": 50, "steps_total": 100, "steps_since_alarm": 5}, (2, 1, 0, 0)),
    ({"step": 50, "steps_total": 100, "steps_since_alarm": 6}, (2, 0, 0, 0)),
    ({"step": 50, "steps_total": 100, "pending": frozenset({("act", "1")})}, (2, 0, 1, 0)),
    ({"step": 50, "steps_total": 100, "keys": KEYS, "since_look": {k: 3 for k in KEYS}}, (2, 0, 0, 0)),
    ({"step": 50, "steps_total": 100, "keys": KEYS, "since_look": {k: 4 for k in KEYS}}, (2, 0, 0, 1)),
    ({"step": 50, "steps_total": 100, "keys": KEYS,
      "since_look": {("grad", "0"): 1, ("grad", "2"): 1, ("act", "1"): 8}}, (2, 0, 0, 2)),
    ({"step": 50, "steps_total": 100, "keys": KEYS}, (2, 0, 0, 2)),  # never looked at: stale
    ({"step": 50, "steps_total": 100, "complexity": 3.0, "loss_z": 9.0}, (2, 0, 0, 0)),
])
def test_state_discrete_buckets(kwargs, expected):
    assert State(**kwargs).discrete() == expected


def test_state_staleness_and_features():
    s = State(25, 100, steps_since_alarm=5, complexity=7.0, loss_z=-9.0, keys=KEYS,
              since_look={("grad", "0"): 8, ("grad", "2"): 2, ("act", "1"): 1},
              suspicion={("grad", "0"): 0.5, ("act", "1"): 6.0}, pending=frozenset({("act", "1")}))
    assert s.staleness() == 8
    np.testing.assert_allclose(s.features(), [1.0, 0.25, math.exp(-1.0), 1.0, 1.0, 0.5, 1.0, -1.0])
    assert State(0, 100).features().tolist() == [1.0] + [0.0] * 7  # never an alarm, no keys
    assert State(30, 100, keys=KEYS).staleness() == 31  # never looked at: since before step 0
    assert State(30, 100, keys=KEYS, since_look={k: 100 for k in KEYS}).features()[5] == 1.0  # capped


# ---------------------------------------------------------------------------- static
def test_static_policy_from_a_string_and_a_mapping():
    p = StaticPolicy("micro")
    assert p.act(State(0, 10)) == {"kinds": {k: "micro" for k in KINDS}, "layers": {}}
    assert p.name == "static:micro"
    m = StaticPolicy({"grad": "raw", "weight": "macro", "act": "meso"})
    assert m.act(State(3, 10))["kinds"] == {"grad": "raw", "weight": "macro", "act": "meso"}
    assert m.name == "static:grad=raw,weight=macro,act=meso"
    part = StaticPolicy({"grad": "meso"})  # kinds left out are not collected
    assert part.act(State(0, 10))["kinds"] == {"grad": "meso", "weight": "off", "act": "off"}


@pytest.mark.parametrize("levels, needle", [
    ("fine", "'fine'"), ({"grads": "meso"}, "'grads'"), ({"grad": "coarse"}, "'coarse'"),
])
def test_static_policy_rejects_unknown_kinds_and_levels(levels, needle):
    with pytest.raises(ValueError, match=needle):
        StaticPolicy(levels)


# ---------------------------------------------------------------------------- actions
BASE = {"grad": "macro", "weight": "macro", "act": "off"}


def test_action_plans_by_hand():
    s = State(3, 100, keys=KEYS, pending=frozenset({("act", "1"), ("grad", "*")}))
    assert ACTIONS == ("base", "follow", "look")
    assert action_plan("base", s, BASE) == {"kinds": BASE, "layers": {}, "action": "base"}
    # follow: look again where the evidence is; evidence in pooled statistics: the whole kind
    assert action_plan("follow", s, BASE) == {
        "kinds": {"grad": "meso", "weight": "macro", "act": "off"}, "layers": {("act", "1"): "meso"},
        "action": "follow"}
    assert action_plan("look", s, BASE) == {
        "kinds": {"grad": "meso", "weight": "meso", "act": "meso"}, "layers": {("act", "1"): "meso"},
        "action": "look"}
    assert action_plan("follow", State(3, 100), BASE)["layers"] == {}  # no evidence: the base plan
    # a look never makes a level coarser
    fine = {"grad": "raw", "weight": "micro", "act": "macro"}
    assert action_plan("look", s, fine)["kinds"] == {"grad": "raw", "weight": "micro", "act": "meso"}
    assert action_plan("follow", s, fine, look="micro")["layers"] == {("act", "1"): "micro"}
    assert BASE == {"grad": "macro", "weight": "macro", "act": "off"}  # not modified
    with pytest.raises(ValueError, match=r"action='peek'.*\('base', 'follow', 'look'\)"):
        action_plan("peek", s, BASE)


# ---------------------------------------------------------------------------- rule
def levels_over(policy: RulePolicy, states: list[State]) -> list[dict]:
    return [policy.act(s) for s in states]


def test_rule_policy_looks_at_every_layer_every_look_every_steps():
    p = RulePolicy(base="macro", look_every=4)
    plans = levels_over(p, [State(s, 100, keys=KEYS) for s in range(9)])
    for s, plan in enumerate(plans):
        assert plan["kinds"] == {k: ("meso" if s % 4 == 0 else "macro") for k in KINDS}, s
        assert plan["action"] == ("look" if s % 4 == 0 else "follow") and plan["layers"] == {}
    never = RulePolicy(base="macro", look_every=0)
    assert all(pl["kinds"] == {k: "macro" for k in KINDS} for pl in levels_over(never, [State(s, 100) for s in range(9)]))


def test_rule_policy_follows_a_bad_look_at_once_on_that_layer_only():
    p = RulePolicy(base="macro", look_every=4, look="meso")
    plan = p.act(State(5, 100, keys=KEYS, pending=frozenset({("grad", "2")})))
    assert plan["kinds"] == {k: "macro" for k in KINDS} and plan["layers"] == {("grad", "2"): "meso"}
    assert p.act(State(6, 100, keys=KEYS))["layers"] == {}  # confirmed or cleared: back to coarse


def test_rule_policy_escalates_the_alarmed_layer_for_quiet_steps_then_relaxes():
    p = RulePolicy(base="macro", escalate="raw", quiet=3, look_every=0)
    a = alarm(9, "act", "1")
    # as StateTracker builds them: the alarm of step 9 stays in State.alarms for 5 steps
    states = [State(s, 100, alarms=[a] if 10 <= s <= 14 else []) for s in range(8, 17)]
    plans = levels_over(p, states)
    for s, plan in zip(range(8, 17), plans):
        assert plan["kinds"] == {k: "macro" for k in KINDS}, s
        assert plan["layers"] == ({("act", "1"): "raw"} if 10 <= s <= 12 else {}), s


def test_rule_policy_a_new_alarm_extends_the_escalation():
    p = RulePolicy(base="meso", escalate="micro", quiet=2, look_every=0)
    assert p.act(State(5, 100, alarms=[alarm(4)]))["layers"] == {("act", "1"): "micro"}
    assert p.act(State(6, 100, alarms=[alarm(4), alarm(5)]))["layers"] == {("act", "1"): "micro"}
    assert p.act(State(7, 100, alarms=[alarm(4), alarm(5)]))["layers"] == {("act", "1"): "micro"}
    assert p.act(State(8, 100, alarms=[alarm(4), alarm(5)]))["layers"] == {}


@pytest.mark.parametrize("a, kinds", [
    (alarm(0, "loss", "", "spike"), {"grad": "raw", "weight": "raw", "act": "raw"}),
    (alarm(0, "grad", "*", "exploding_grad"), {"grad": "raw", "weight": "macro", "act": "macro"}),
])
def test_rule_policy_escalates_whole_kinds_when_the_alarm_cannot_localise(a, kinds):
    p = RulePolicy(escalate="raw", quiet=2, look_every=0)
    plans = levels_over(p, [State(1, 100, alarms=[a]), State(2, 100), State(3, 100)])
    assert [pl["kinds"] for pl in plans] == [kinds, kinds, {k: "macro" for k in KINDS}]
    assert all(pl["layers"] == {} for pl in plans)
    p.reset()
    assert p.act(State(1, 100))["kinds"] == {k: "macro" for k in KINDS}


def test_rule_policy_escalation_is_never_coarser_than_a_snapshot():
    p = RulePolicy(base="macro", escalate="meso", look="micro", look_every=2, quiet=5)
    plan = p.act(State(4, 100, alarms=[alarm(3, "grad", "0")]))  # a snapshot step
    assert plan["kinds"] == {k: "micro" for k in KINDS} and plan["layers"] == {("grad", "0"): "micro"}


@pytest.mark.parametrize("kwargs, needle", [
    ({"quiet": 0}, "quiet"), ({"quiet": 2.5}, "quiet"), ({"escalate": "finest"}, "'finest'"),
    ({"base": "coarse"}, "'coarse'"), ({"base": {"weights": "macro"}}, "'weights'"),
    ({"look": "peek"}, r"RulePolicy.look.*'peek'"),
])
def test_rule_policy_rejects_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        RulePolicy(**kwargs)


# ---------------------------------------------------------------------------- q-learning
def test_q_learning_update_is_the_seed_formula():
    q = QLearningPolicy(epsilon=0.0, learning_rate=0.1, discount=0.9, seed=0, look_every=0)
    s, s2 = State(0, 100), State(60, 100, steps_since_alarm=2)
    assert s.discrete() != s2.discrete()
    plan = q.act(s)
    assert plan["action"] == "base" and plan["kinds"] == {k: "macro" for k in KINDS}  # all tied: the first
    q.q[s.discrete()][0] = 2.0
    q.q[s2.discrete()] = np.array([0.1, 0.5, 0.3])
    before = q.q[s.discrete()].copy()
    q.learn(s, plan, 1.5, s2)
    assert q.q[s.discrete()][0] == pytest.approx((1 - 0.1) * 2.0 + 0.1 * (1.5 + 0.9 * 0.5))
    np.testing.assert_array_equal(q.q[s.discrete()][1:], before[1:])
    # an unseen next state starts at zeros, as in the specification
    s3 = State(20, 100, pending=frozenset({("act", "1")}))
    q.learn(s, plan, -1.0, s3)
    assert q.q[s3.discrete()].tolist() == [0.0] * len(ACTIONS)
    assert q.q[s.discrete()][0] == pytest.approx(0.9 * (0.9 * 2.0 + 0.1 * (1.5 + 0.9 * 0.5)) + 0.1 * -1.0)
    look = action_plan("look", s, q.base)
    q.learn(s, look, 4.0, s)  # the action is read from the plan
    assert q.q[s.discrete()][2] == pytest.approx(0.1 * (4.0 + 0.9 * q.q[s.discrete()][0]))


def test_q_learning_does_not_learn_when_not_training():
    q = QLearningPolicy(seed=0, look_every=0)
    s = State(0, 100)
    plan = q.act(s)
    q.training = False
    q.learn(s, plan, 100.0, s)
    assert not q.q[s.discrete()].any()


def test_q_learning_with_epsilon_zero_is_greedy_and_follows_per_layer():
    q = QLearningPolicy(epsilon=0.0, seed=0, base={"grad": "macro", "weight": "off", "act": "macro"},
                        look_every=0)
    s = State(30, 100, keys=KEYS, pending=frozenset({("act", "1")}))
    q.q[s.discrete()] = np.array([0.0, 0.5, 0.0])
    plans = [q.act(s) for _ in range(30)]
    assert {p["action"] for p in plans} == {"follow"}
    assert plans[0]["kinds"] == {"grad": "macro", "weight": "off", "act": "macro"}
    assert plans[0]["layers"] == {("act", "1"): "meso"}  # one layer, not the whole kind
    # ties among the best are broken at random, but only among them
    q.q[s.discrete()][2] = 0.5
    assert {q.act(s)["action"] for _ in range(50)} == {"follow", "look"}


def test_q_learning_is_deterministic_under_a_seed_and_explores():
    def actions(seed: int) -> list[str]:
        q = QLearningPolicy(epsilon=0.5, seed=seed, look_every=0)
        return [q.act(State(i, 100))["action"] for i in range(100)]

    assert actions(3) == actions(3)
    assert actions(3) != actions(4)
    assert set(actions(3)) == set(ACTIONS)
    q = QLearningPolicy(epsilon=1.0, seed=0, look_every=0)
    q.training = False  # evaluation: no exploration
    assert {q.act(State(i, 100))["action"] for i in range(20)} == {"base"}


@pytest.mark.parametrize("field", ["epsilon", "learning_rate", "discount"])
@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan])
def test_q_learning_rejects_out_of_range_parameters(field, value):
    with pytest.raises(ValueError, match=rf"QLearningPolicy\.{field}"):
        QLearningPolicy(**{field: value})


@pytest.mark.parametrize("make", [lambda: QLearningPolicy(epsilon=1.0, seed=0, look_every=4),
                                  lambda: LinUCBPolicy(alpha=5.0, look_every=4)])
def test_learned_policies_keep_a_schedule_of_snapshots_they_do_not_learn_from(make):
    pol = make()
    s = State(8, 100, keys=KEYS, pending=frozenset({("act", "1")}))
    plan = pol.act(s)  # step 8: a snapshot of every layer, whatever the policy would choose
    assert plan["scheduled"] and plan["kinds"] == {k: "meso" for k in KINDS}
    assert plan["layers"] == {("act", "1"): "meso"}
    table = repr(getattr(pol, "q", None)) + repr(getattr(pol, "b", None))
    pol.learn(s, plan, 100.0, State(9, 100))
    assert repr(getattr(pol, "q", None)) + repr(getattr(pol, "b", None)) == table  # not a decision
    between = {pol.act(State(k, 100))["action"] for k in range(9, 12) for _ in range(10)}
    assert between <= set(ACTIONS) and not any(pol.act(State(k, 100)).get("scheduled") for k in (9, 10, 11))


@pytest.mark.parametrize("cls", [QLearningPolicy, LinUCBPolicy, RulePolicy])
@pytest.mark.parametrize("value", [-1, True, 2.5])
def test_look_every_is_an_int_of_at_least_zero(cls, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.look_every.*{value!r}"):
        cls(look_every=value)


# ---------------------------------------------------------------------------- linucb
def random_state(rng: np.random.Generator) -> State:
    pending = frozenset({("act", "1")}) if rng.random() < 0.5 else frozenset()
    return State(int(rng.integers(0, 100)), 100, steps_since_alarm=int(rng.integers(0, 20)),
                 complexity=float(rng.normal()), loss_z=float(rng.normal()), keys=KEYS,
                 since_look={k: int(rng.integers(0, 10)) for k in KEYS}, pending=pending,
                 suspicion={("act", "1"): float(rng.uniform(0, 2))})


def bandit_reward(state: State, action: str) -> float:
    """Linear in the features: following pays with evidence, the base plan without it."""
    p = float(bool(state.pending))
    return {"base": 1.0 - p, "follow": 0.5 + 0.5 * p, "look": 0.5 * p}[action]


def test_linucb_learns_the_action_with_the_higher_reward_per_context():
    pol = LinUCBPolicy(alpha=1.0, look_every=0)
    rng = np.random.default_rng(0)
    regret = []
    for _ in range(300):
        s = random_state(rng)
        plan = pol.act(s)
        pol.learn(s, plan, bandit_reward(s, plan["action"]), s)
        regret.append(max(bandit_reward(s, a) for a in ACTIONS) - bandit_reward(s, plan["action"]))
    assert sum(regret[-100:]) <= 5  # exploration has settled
    pol.training = False
    for _ in range(50):
        s = random_state(rng)
        assert pol.act(s)["action"] == ("follow" if s.pending else "base")
    # the ridge estimate of the action it picks recovers that action's linear reward
    for _ in range(20):
        s = random_state(rng)
        a = pol.act(s)["action"]
        theta = np.linalg.solve(pol.A[a], pol.b[a])
        assert theta @ s.features() == pytest.approx(bandit_reward(s, a), abs=0.1)


def test_linucb_does_not_learn_when_not_training_and_validates():
    pol = LinUCBPolicy(look_every=0)
    assert set(pol.A) == set(ACTIONS) and pol.A["base"].shape == (8, 8)
    pol.training = False
    s = State(1, 10)
    pol.learn(s, pol.act(s), 5.0, s)
    assert all(not b.any() for b in pol.b.values())
    for kwargs in ({"alpha": -1.0}, {"ridge": 0.0}, {"alpha": math.nan}):
        with pytest.raises(ValueError, match="LinUCBPolicy"):
            LinUCBPolicy(**kwargs)


# ---------------------------------------------------------------------------- state tracker
def test_state_tracker_keeps_alarms_for_memory_steps():
    tr = StateTracker(steps_total=50, memory=5)
    s = tr.update(3, [alarm(3)], grad_var=1e-2, loss=2.0)
    assert (s.step, s.steps_since_alarm, len(s.alarms)) == (4, 1, 1)
    for step in range(4, 8):
        s = tr.update(step, [], grad_var=1e-2, loss=2.0)
        assert len(s.alarms) == 1 and s.steps_since_alarm == step + 1 - 3
    s = tr.update(8, [], grad_var=1e-2, loss=2.0)
    assert s.alarms == [] and s.discrete()[1] == 0
    assert tr.update(9, [], None, math.nan).loss_z == 5.0


def test_state_tracker_counts_steps_since_each_layer_was_seen():
    tr = StateTracker(steps_total=50, keys=KEYS)
    assert tr.state.keys == KEYS and tr.state.staleness() == 1
    s = tr.update(0, [], None, 1.0, looked=KEYS)
    assert s.since_look == {k: 1 for k in KEYS} and s.staleness() == 1
    for step in (1, 2, 3):
        s = tr.update(step, [], None, 1.0, looked=[("grad", "0")])
    assert s.since_look == {("grad", "0"): 1, ("grad", "2"): 4, ("act", "1"): 4} and s.staleness() == 4
    sus, pend = {("act", "1"): 1.5}, frozenset({("act", "1")})
    s = tr.update(4, [], None, 1.0, suspicion=sus, pending=pend)
    assert s.suspicion == sus and s.suspicion is not sus and s.pending == pend
    assert s.discrete() == (1, 0, 1, 1)  # step 5 of 50: the second phase


# ---------------------------------------------------------------------------- controller
class FiresAt(Detector):
    """A detector that raises one hand-made alarm at a chosen step."""

    name = "fires_at"

    def __init__(self, step: int, kind: str, layer: str) -> None:
        super().__init__()
        self.step, self.kind, self.layer = step, kind, layer

    def update(self, step, obs, loss):
        return [alarm(step, self.kind, self.layer, self.name)] if step == self.step else []


class PendingAt(Detector):
    """A detector whose look at ``step`` was bad but not confirmed."""

    name = "pending_at"

    def __init__(self, step: int, key: tuple[str, str]) -> None:
        super().__init__()
        self.step, self.key, self.pending = step, key, set()

    def update(self, step, obs, loss):
        self.pending = {self.key} if step == self.step else set()
        return []


def drive(tel: Telemetry, model, steps: int) -> list[dict]:
    plans = []
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x, y = torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)
        with tel.step(step):
            loss = F.cross_entropy(model(x), y)
            tel.log_loss(loss)
            model.zero_grad()
            loss.backward()
        plans.append(dict(tel.plan))  # the levels the next step will use
    return plans


def levels_used(rec) -> dict[tuple[str, str], str]:
    """(kind, layer) -> level of every tensor row of a record (the logged loss's row aside)."""
    return {(r["kind"], r["layer"]): r["level"] for b in rec.batches.values() for r in b.to_pylist()
            if r["kind"] != "loss"}


def levels_sent(rec) -> list[str]:
    return sorted(set(levels_used(rec).values()))


def test_controller_escalates_the_alarmed_layer_on_the_next_step_then_relaxes():
    torch.manual_seed(0)
    model = mlp([64, 32, 16, 10])
    tel = Telemetry(model, "raw")
    with pytest.warns(UserWarning, match=r"replaces the collector's levels.*raw.*keep_levels=True"):
        ctl = Controller(tel, RulePolicy(base="meso", escalate="raw", quiet=3, look_every=0),
                         suite=DetectorSuite([FiresAt(5, "act", "1")]), steps_total=20)
    assert tel.on_step is ctl
    assert set(tel.plan.values()) == {"meso"}  # the policy's first plan replaced "raw"
    plans = drive(tel, model, 13)
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    tel.close()
    for step, plan in enumerate(plans):
        escalated = 5 <= step <= 7  # after the records of steps 5..7: steps 6..8 are fine
        assert plan[("act", "1")] == ("raw" if escalated else "meso"), step
        assert {v for k, v in plan.items() if k != ("act", "1")} == {"meso"}, step
    for rec in tel.records:
        used = levels_used(rec)
        assert used[("act", "1")] == ("raw" if 6 <= rec.step <= 8 else "meso"), rec.step
        assert {v for k, v in used.items() if k != ("act", "1")} == {"meso"}
    assert [a.step for a in tel.records[5].alarms] == [5]
    assert len(ctl.plans) == 1 + 13
    assert hooks == 5  # levels changed every step; the five hooks stayed
    assert ctl.tracker.state.step == 13
    assert ctl.tracker.state.since_look[("act", "1")] == 1  # seen at meso or finer every step


def test_controller_escalates_every_kind_after_a_loss_alarm():
    torch.manual_seed(0)
    model = mlp([64, 16, 10])
    tel = Telemetry(model, "off")
    Controller(tel, RulePolicy(base="macro", escalate="raw", quiet=2, look_every=0),
               suite=DetectorSuite([FiresAt(1, "loss", "")]))
    plans = drive(tel, model, 6)
    tel.close()
    assert [sorted(set(p.values())) for p in plans] == [["macro"], ["raw"], ["raw"], ["macro"], ["macro"], ["macro"]]
    assert [levels_sent(r) for r in tel.records] == [["macro"], ["macro"], ["raw"], ["raw"], ["macro"], ["macro"]]


def test_controller_follows_unconfirmed_evidence_on_one_layer():
    torch.manual_seed(0)
    model = mlp([64, 16, 10])
    tel = Telemetry(model, "off")
    ctl = Controller(tel, RulePolicy(base="macro", look_every=0), suite=DetectorSuite([PendingAt(2, ("grad", "2"))]))
    plans = drive(tel, model, 5)
    tel.close()
    assert [p[("grad", "2")] for p in plans] == ["macro", "macro", "meso", "macro", "macro"]
    assert all(v == "macro" for p in plans for k, v in p.items() if k != ("grad", "2"))
    assert levels_used(tel.records[3])[("grad", "2")] == "meso"
    assert ctl.tracker.state.since_look == {("grad", "2"): 2}


def test_controller_says_when_it_replaces_the_user_s_levels_or_keeps_them():
    model = mlp([64, 16, 10])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing set (all off) or the same plan: nothing to say
        Controller(Telemetry(model, "off"), StaticPolicy("meso")).tel.close()
        Controller(Telemetry(model, "meso"), StaticPolicy("meso")).tel.close()
        tel = Telemetry(model, {"grad": "raw"})
        ctl = Controller(tel, StaticPolicy("macro"), keep_levels=True)
    assert tel.plan[("grad", "0")] == "raw" and tel.plan[("act", "1")] == "off"  # kept for step 0
    assert ctl.plans == [StaticPolicy("macro").act(State(0, 1))]
    drive(tel, model, 2)
    tel.close()
    assert levels_sent(tel.records[0]) == ["raw"] and levels_sent(tel.records[1]) == ["macro"]
    with pytest.warns(UserWarning, match=r"grad=raw"):
        Controller(Telemetry(model, {"grad": "raw"}), StaticPolicy("macro")).tel.close()


# ---------------------------------------------------------------------------- episodes
STEPS = 60


class Net(nn.Module):
    """A user's own model: nested, named modules, a Tanh and a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.body(x))


def regression_data() -> Split:
    d = digits(seed=0)
    w = torch.randn(64, generator=torch.Generator().manual_seed(0)) / 8
    return Split(d.x_train, d.x_train @ w, d.x_test, d.x_test @ w)


MINE = Workload("net", Net)
REGRESSION = Workload("reg", lambda: nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 1)),
                      regression_data, n_classes=0)


@pytest.fixture(scope="module")
def clean_trace():
    return record(EpisodeSpec("mlp", None, steps=STEPS, seed=0))


@pytest.fixture(scope="module")
def dead_trace():
    return record(EpisodeSpec("mlp", Fault("dead_relu", 30), steps=STEPS, seed=0))


@pytest.fixture(scope="module")
def quiet_trace():
    return record(EpisodeSpec("mlp", Fault("layer_grad_vanish", 30, layer="2"), steps=STEPS, seed=0))


def test_episode_spec_validation():
    with pytest.raises(ValueError, match="model='resnet'"):
        EpisodeSpec(model="resnet")
    with pytest.raises(ValueError, match=r"fault\.step=60"):
        EpisodeSpec(fault=Fault("dead_relu", 60), steps=60)
    with pytest.raises(ValueError, match=r"EpisodeSpec\.steps.*0"):
        EpisodeSpec(steps=0)
    with pytest.raises(ValueError, match=r"EpisodeSpec\.batch_size"):
        EpisodeSpec(batch_size=True)
    with pytest.raises(ValueError, match="'vgg'"):
        build_model("vgg")
    assert EpisodeSpec(fault=Fault("dead_relu", 59), steps=60).label == "mlp/dead_relu/seed0"
    assert EpisodeSpec(MINE, Fault("stall", 3), seed=2).label == "net/stall/seed2"
    for kind in ("label_noise", "label_permute"):
        with pytest.raises(ValueError, match=rf"'{kind}' needs class labels.*'reg' is a regression"):
            EpisodeSpec(REGRESSION, Fault(kind, 3))


@pytest.mark.parametrize("kwargs, needle", [
    ({"name": ""}, r"Workload.name.*''"), ({"n_classes": 1}, r"n_classes.*1"),
    ({"n_classes": -2}, r"n_classes.*-2"), ({"n_classes": True}, r"n_classes.*True"),
    ({"build": "mlp"}, r"build and data must be callables"),
])
def test_workload_validation(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Workload(**{"name": "w", "build": Net, **kwargs})


def test_record_keeps_every_tensor_and_is_deterministic(clean_trace):
    t = clean_trace
    assert t.param_layers == ["0", "2", "4"] and t.relu_layers == ["1", "3"]
    assert t.act_layers == ["0", "1", "2", "3", "4"]
    assert len(t.values) == STEPS and t.losses.shape == (STEPS,)
    assert t.values[0][("grad", "0")].numel() == 64 * 64 + 64  # uncapped
    assert t.values[0][("act", "1")].numel() == 32 * 64
    assert np.isfinite(t.losses).all() and t.losses[-1] < t.losses[0]
    assert 0 < t.test_accuracy <= 1
    again = record(EpisodeSpec("mlp", None, steps=STEPS, seed=0))
    np.testing.assert_array_equal(again.losses, t.losses)
    for step in (0, STEPS - 1):
        assert again.values[step].keys() == t.values[step].keys()
        assert all(torch.equal(again.values[step][k], t.values[step][k]) for k in t.values[step])
    assert again.test_accuracy == t.test_accuracy


def test_trace_stats_and_observations_are_the_collector_s(clean_trace):
    t = clean_trace
    assert [k for k, _ in t.keys] == ["grad"] * 3 + ["weight"] * 3 + ["act"] * 5
    stats = t.stats()
    assert stats.shape == (STEPS, len(t.keys), 8) and t.stats() is stats  # computed once
    np.testing.assert_allclose(stats[7], batched_stats([t.values[7][k] for k in t.keys]).numpy())
    config = TelemetryConfig()
    levels = {k: "macro" for k in t.keys}
    levels[("grad", "2")], levels[("act", "1")], levels[("weight", "0")] = "meso", "raw", "off"
    obs = t.observe(7, levels, config)
    got = {(o.kind, o.layer, o.level) for o in obs}
    assert got == {("grad", "2", "meso"), ("act", "1", "raw"), ("grad", "*", "macro"),
                   ("weight", "*", "macro"), ("act", "*", "macro")}
    assert t.observe(7, levels, config) == obs  # the raw estimate comes from the cache the second time
    sent = t.bytes_of(levels, config)
    cached = len(t._cache["bytes"])
    assert sent > 0 and t.bytes_of(dict(levels), config) == sent and len(t._cache["bytes"]) == cached
    pooled = next(o for o in obs if (o.kind, o.layer) == ("weight", "*"))
    idx = [i for i, k in enumerate(t.keys) if k in (("weight", "2"), ("weight", "4"))]  # "0" is off
    assert pooled.count == int(stats[7, idx, 0].sum()) and pooled.norm == pytest.approx(
        math.sqrt(float((stats[7, idx, 5] ** 2).sum())))


finite = st.floats(-1e3, 1e3, width=32)
entries = st.one_of(finite, finite, finite, st.just(0.0), st.sampled_from([math.nan, math.inf, -math.inf]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(entries, min_size=1, max_size=40), min_size=1, max_size=5))
def test_pooled_rows_are_the_statistics_of_the_concatenation(layers):
    """What a replayed macro row sends: the layers' rows pooled (detectors.pool_rows)."""
    tensors = [torch.tensor(v, dtype=torch.float32) for v in layers]
    pooled = pool_rows(batched_stats(tensors).numpy())
    whole = batched_stats([torch.cat(tensors)]).numpy()[0]
    np.testing.assert_allclose(pooled, whole, rtol=1e-5, atol=1e-3, equal_nan=True)


def test_pooled_rows_ignore_an_empty_layer():
    tensors = [torch.tensor([1.0, 0.0, math.nan]), torch.zeros(0), torch.tensor([2.0, 3.0])]
    pooled = pool_rows(batched_stats(tensors).numpy())
    whole = batched_stats([torch.cat(tensors)]).numpy()[0]
    np.testing.assert_allclose(pooled, whole, rtol=1e-6, equal_nan=True)


def test_replay_bytes_raw_equals_raw_bytes_and_coarser_levels_send_less(dead_trace):
    config = TelemetryConfig()
    res = {lv: replay(dead_trace, StaticPolicy(lv)) for lv in ("macro", "meso", "micro", "raw")}
    assert res["raw"].bytes == res["raw"].raw_bytes == dead_trace.raw_bytes(config) * STEPS
    assert res["macro"].bytes == res["macro"].macro_bytes
    assert res["macro"].bytes < res["meso"].bytes < res["micro"].bytes < res["raw"].bytes
    assert res["meso"].level_steps == {"off": 0, "macro": 0, "meso": 11 * STEPS, "micro": 0, "raw": 0}
    assert all(r.raw_bytes == res["raw"].raw_bytes and r.macro_bytes == res["macro"].bytes
               and r.steps == STEPS for r in res.values())


@pytest.fixture(scope="module")
def short_trace():
    return record(EpisodeSpec("mlp", Fault("stall", 4), steps=8, seed=0))


@settings(max_examples=8, deadline=None)
@given(window=st.integers(1, 64), cap=st.integers(1, 5000))
def test_replay_raw_bytes_under_any_config(short_trace, window, cap):
    config = TelemetryConfig(window=window, raw_cap=cap)
    r = replay(short_trace, StaticPolicy("raw"), config=config)
    assert r.bytes == r.raw_bytes == short_trace.raw_bytes(config) * 8


def test_dead_relu_episode_is_detected_at_meso_and_a_clean_one_is_quiet(dead_trace, clean_trace):
    r = replay(dead_trace, StaticPolicy("meso"))
    assert r.fault == "dead_relu" and r.fault_step == 30
    assert r.detected and 0 <= r.delay <= 10
    assert r.false_alarms == 0 and r.true_alarms == len(r.alarms) > 0
    dead = [a for a in r.alarms if a.detector == "dead_relu" and a.layer != "*"]
    assert dead and dead[0].layer == "1" and dead[0].step - 30 <= 10  # Linear "0" feeds ReLU "1"
    c = replay(clean_trace, StaticPolicy("meso"))
    assert c.alarms == [] and c.false_alarms == 0 and not c.detected and c.delay is None


def test_rule_policy_on_a_quiet_fault_sends_between_macro_and_meso(quiet_trace):
    res = {p.name: replay(quiet_trace, p) for p in (StaticPolicy("macro"), StaticPolicy("meso"), RulePolicy())}
    rule = res["rule"]
    assert res["static:macro"].bytes < rule.bytes < res["static:meso"].bytes
    assert rule.level_steps["meso"] > 0 and rule.level_steps["macro"] > 0  # it looked, and not always
    assert rule.false_alarms == 0 and all(a.step >= 30 for a in rule.alarms)


def test_replay_counts_alarms_from_the_fault_step_on_and_rewards_them(dead_trace, monkeypatch):
    """With the detectors replaced by alarms at chosen steps: 29 is false, 30 and 45 are true."""
    monkeypatch.setattr(episodes.DetectorSuite, "standard", classmethod(
        lambda cls, *a, **k: cls([FiresAt(29, "grad", "0"), FiresAt(30, "act", "1"), FiresAt(45, "loss", "")])))
    w = RewardWeights(detection=3.0, false_positive=5.0, bytes=0.25, latency=0.0)
    r = replay(dead_trace, StaticPolicy("macro"), weights=w)
    assert (r.true_alarms, r.false_alarms, r.detection_step, r.delay) == (2, 1, 30, 0)
    assert r.reward == pytest.approx(3.0 * 2 - 5.0 * 1)  # macro sends nothing beyond macro
    meso = replay(dead_trace, StaticPolicy("meso"), weights=w)
    extra = meso.bytes / meso.macro_bytes - 1.0  # per step, in units of the macro plan
    assert meso.reward == pytest.approx(3.0 * 2 - 5.0 * 1 - 0.25 * STEPS * extra)
    clean = replay(record(EpisodeSpec("mlp", None, steps=31, seed=0)), StaticPolicy("macro"), weights=w)
    assert (clean.true_alarms, clean.false_alarms, clean.detected) == (0, 2, False)


def test_train_q_learning_on_short_traces_changes_its_table(clean_trace, dead_trace):
    def trained(seed: int) -> tuple[QLearningPolicy, list[float]]:
        q = QLearningPolicy(epsilon=0.2, seed=seed)
        rewards = train(q, [clean_trace, dead_trace], episodes=3, seed=seed, progress=False)
        return q, rewards

    q, rewards = trained(0)
    assert len(rewards) == 3 and all(math.isfinite(r) for r in rewards)
    assert q.q and any(row.any() for row in q.q.values())
    assert q.training is False
    q2, rewards2 = trained(0)
    assert rewards2 == rewards
    assert q2.q.keys() == q.q.keys() and all(np.array_equal(q.q[k], q2.q[k]) for k in q.q)
    results = evaluate(q, [dead_trace])
    assert len(results) == 1 and results[0].policy == "q-learning" and q.training is False
    assert sum(results[0].level_steps.values()) == 11 * STEPS


def test_train_linucb_on_short_traces(quiet_trace, clean_trace):
    pol = LinUCBPolicy()
    rewards = train(pol, [quiet_trace, clean_trace], episodes=2, progress=False)
    assert len(rewards) == 2 and all(math.isfinite(r) for r in rewards) and pol.training is False
    assert any(pol.b[a].any() for a in ACTIONS)
    r = evaluate(pol, [quiet_trace])[0]
    assert r.policy == "linucb" and r.steps == STEPS and r.bytes >= r.macro_bytes


def test_fault_suite_seeds_steps_and_layers():
    specs = fault_suite(models=["mlp", MINE], seeds=(0, 1), steps=STEPS, clean_per_seed=2)
    assert len(specs) == 2 * 2 * (len(FAULT_KINDS) + 2)
    assert fault_suite(models=["mlp", MINE], seeds=(0, 1), steps=STEPS, clean_per_seed=2) == specs
    for s in specs:
        assert s.steps == STEPS
        if s.fault is None:
            continue
        assert STEPS // 4 <= s.fault.step < 3 * STEPS // 4 and s.fault.seed == s.seed
        if s.fault.kind in LAYER_KINDS:
            assert s.fault.layer in _layer_choices(s.workload, s.fault.kind)
        else:
            assert s.fault.layer is None
    assert _layer_choices(MINE, "dead_units") == ["body.0", "body.2"]  # not the output layer
    assert _layer_choices(MINE, "layer_grad_vanish") == ["body.0", "body.2", "head"]
    cleans = [(s.workload.name, s.seed) for s in specs if s.fault is None]
    assert cleans == [(m, sd) for m in ("mlp", "net") for base in (0, 1) for sd in (base, base + 1000)]
    quiet = fault_suite(models=[REGRESSION], kinds=QUIET_KINDS, seeds=(0,), steps=STEPS, clean_per_seed=0)
    assert [s.fault.kind for s in quiet] == [k for k in QUIET_KINDS if k != "label_permute"]


def test_fault_suite_on_a_single_layer_model():
    linear = Workload("linear", lambda: nn.Linear(64, 1), regression_data, n_classes=0)
    assert len(fault_suite(models=[linear], kinds=("weight_drift",), seeds=(0,), steps=20)) == 2


def test_a_user_workload_runs_end_to_end():
    specs = fault_suite(models=[MINE], kinds=("layer_grad_explode", "stall"), seeds=(3,), steps=30)
    traces = [record(s) for s in specs]
    t = traces[0]
    assert t.param_layers == ["body.0", "body.2", "head"] and t.relu_layers == ["body.3"]
    assert ("act", "body.1") in t.keys and 0 <= t.test_accuracy <= 1  # the Tanh is watched too
    results = evaluate(RulePolicy(), traces) + evaluate(StaticPolicy("macro"), traces)
    assert [r.label for r in results[:3]] == ["net/layer_grad_explode/seed3", "net/stall/seed3", "net/clean/seed3"]
    s = summarize(results)
    assert 0 <= s["recall"] <= 1 and s["bytes_vs_macro"] >= 1.0 and s["bytes_vs_raw"] < 1.0


def test_a_regression_workload_reports_nan_accuracy_and_refuses_label_faults():
    t = record(EpisodeSpec(REGRESSION, Fault("input_corrupt", 5), steps=12, seed=0))
    assert math.isnan(t.test_accuracy) and np.isfinite(t.losses).all()
    assert t.losses[5:].mean() > t.losses[:5].min()  # noise rows of std 3 cost a regression dearly
    r = replay(t, RulePolicy())
    assert r.steps == 12 and r.bytes > 0
    with pytest.raises(ValueError, match="regression"):
        EpisodeSpec(REGRESSION, Fault("label_permute", 5), steps=12)


def result(fault: str, fault_step, true: int, false: int, detection, bytes_: float, raw: float,
           macro: float, latency: float, steps: int) -> EpisodeResult:
    return EpisodeResult(f"mlp/{fault}/seed0", "p", fault, fault_step, [], true, false, detection,
                         bytes_, raw, macro, steps, latency, 0.0,
                         {"off": 0, "macro": 0, "meso": 3 * steps, "micro": 0, "raw": 0})


def test_summarize_arithmetic():
    results = [
        result("dead_relu", 30, 3, 1, 33, 100.0, 1000.0, 50.0, 2.0, 60),
        result("nan_batch", 20, 0, 2, None, 200.0, 1000.0, 50.0, 4.0, 60),
        result("lr_spike", 10, 1, 0, 17, 300.0, 1000.0, 100.0, 3.0, 30),
        result("clean", None, 0, 2, None, 50.0, 500.0, 25.0, 1.0, 60),
        result("clean", None, 0, 0, None, 50.0, 500.0, 25.0, 0.0, 60),
    ]
    assert [r.delay for r in results[:3]] == [3, None, 7]
    s = summarize(results)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["precision"] == pytest.approx(4 / 9)
    assert s["clean_false_alarm_rate"] == pytest.approx(1 / 2)
    assert s["median_delay"] == pytest.approx(5.0)
    assert s["bytes_vs_raw"] == pytest.approx(700 / 4000)
    assert s["bytes_vs_macro"] == pytest.approx(700 / 250)
    assert s["bytes_per_step"] == pytest.approx(700 / 270)
    assert s["latency_ms"] == pytest.approx(2.0)
    only_clean = summarize(results[3:])
    assert math.isnan(only_clean["recall"]) and math.isnan(only_clean["median_delay"])
    assert math.isnan(summarize([results[4]])["precision"])
    frame = results_frame(results)
    assert frame["detected"].tolist() == [True, False, True, False, False]
    assert frame.loc[0, "delay"] == 3 and frame.loc[2, "delay"] == 7 and pd.isna(frame.loc[1, "delay"])
    assert frame["bytes_vs_raw"].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.1, 0.1])


# ---------------------------------------------------------------------------- devices, on_step
def test_episodes_run_and_record_on_the_device_they_are_given(monkeypatch):
    import adaptive_kit.telemetry.episodes as episodes_module

    spec = EpisodeSpec("mlp", Fault("nan_batch", 5), steps=12, seed=3)
    picked = []
    monkeypatch.setattr(episodes_module, "pick_device", lambda: picked.append(1) or torch.device("cpu"))
    default = episodes.run(spec, "meso")  # no device: pick_device() decides
    assert picked and all(p.device.type == "cpu" for p in default.tel.model.parameters())
    explicit = episodes.run(spec, "meso", device="cpu")
    np.testing.assert_array_equal(default.losses, explicit.losses)  # same seed, same run
    trace = record(spec, device=torch.device("cpu"))
    assert all(v.device.type == "cpu" for step in trace.values for v in step.values())
    np.testing.assert_array_equal(trace.losses, explicit.losses)  # recording changes nothing
    with pytest.raises((RuntimeError, TypeError, NotImplementedError)):  # the device is used: meta cannot train
        episodes.run(spec, "off", device="meta")


def test_on_step_is_the_callback():
    spec = EpisodeSpec("mlp", None, steps=4)
    seen = []
    episodes.run(spec, "macro", device="cpu", on_step=lambda rec, alarms, obs: seen.append(rec.step))
    assert seen == [0, 1, 2, 3]
    assert Telemetry(mlp([4, 3]), "macro", on_step=print).on_step is print
