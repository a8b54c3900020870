"""Level policies, the live Controller and recorded episodes: rules by hand, the seed's Q-learning
update by formula, a synthetic bandit for LinUCB, and replays of short recorded digits runs."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from adaptive_kit.anomaly import Alarm
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
)
from adaptive_kit.telemetry.detectors import Detector
from adaptive_kit.telemetry.episodes import (
    EpisodeResult,
    EpisodeSpec,
    build_model,
    evaluate,
    record,
    replay,
    results_frame,
    summarize,
    train,
)
from adaptive_kit.telemetry.faults import Fault
from adaptive_kit.telemetry.policies import ACTION_LEVELS, JOINT_ACTIONS
from adaptive_kit.training import mlp


def alarm(step: int, kind: str = "act", layer: str = "1", detector: str = "test") -> Alarm:
    return Alarm(step, detector, kind, layer, "meso", "hand-made", 1.0)


# ---------------------------------------------------------------------------- reward and state
def test_reward_arithmetic():
    w = RewardWeights(detection=2.0, false_positive=3.0, bytes=4.0, latency=0.5)
    assert w.reward(5, 1, 0.25, 10.0) == pytest.approx(10 - 3 - 1 - 5)
    assert w.reward(0, 0, 0.0, 0.0) == 0.0
    d = RewardWeights()
    assert d.reward(1, 2, 0.5, 3.0) == pytest.approx(10 * 1 - 10 * 2 - 1 * 0.5 - 0.1 * 3.0)


@pytest.mark.parametrize("kwargs, expected", [
    ({"step": 0, "steps_total": 100}, (0, 0, 0, 1)),
    ({"step": 9, "steps_total": 100}, (0, 0, 0, 1)),
    ({"step": 10, "steps_total": 100}, (1, 0, 0, 1)),
    ({"step": 49, "steps_total": 100}, (1, 0, 0, 1)),
    ({"step": 50, "steps_total": 100}, (2, 0, 0, 1)),
    ({"step": 5, "steps_total": 0}, (2, 0, 0, 1)),  # steps_total 0: no division by zero
    ({"step": 50, "steps_total": 100, "steps_since_alarm": 5}, (2, 1, 0, 1)),
    ({"step": 50, "steps_total": 100, "steps_since_alarm": 6}, (2, 0, 0, 1)),
    ({"step": 50, "steps_total": 100, "utilisation": 69.9}, (2, 0, 0, 1)),
    ({"step": 50, "steps_total": 100, "utilisation": 70.0}, (2, 0, 1, 1)),
    ({"step": 50, "steps_total": 100, "complexity": -0.6}, (2, 0, 0, 0)),
    ({"step": 50, "steps_total": 100, "complexity": 0.5}, (2, 0, 0, 1)),
    ({"step": 50, "steps_total": 100, "complexity": 0.51}, (2, 0, 0, 2)),
])
def test_state_discrete_buckets(kwargs, expected):
    assert State(**kwargs).discrete() == expected


def test_state_features():
    x = State(25, 100, steps_since_alarm=5, utilisation=50.0, complexity=7.0, loss_z=-9.0).features()
    np.testing.assert_allclose(x, [1.0, 0.25, math.exp(-1.0), 0.5, 3.0, -5.0])
    assert State(0, 100).features()[2] == 0.0  # never an alarm: no recency signal


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


# ---------------------------------------------------------------------------- rule
def levels_over(policy: RulePolicy, states: list[State]) -> list[dict]:
    return [policy.act(s) for s in states]


def test_rule_policy_escalates_the_alarmed_layer_for_quiet_steps_then_relaxes():
    p = RulePolicy(base="macro", escalate="raw", quiet=3)
    a = alarm(9, "act", "1")
    # as StateTracker builds them: the alarm of step 9 stays in State.alarms for 5 steps
    states = [State(s, 100, alarms=[a] if 10 <= s <= 14 else []) for s in range(8, 17)]
    plans = levels_over(p, states)
    for s, plan in zip(range(8, 17), plans):
        assert plan["kinds"] == {k: "macro" for k in KINDS}, s
        assert plan["layers"] == ({("act", "1"): "raw"} if 10 <= s <= 12 else {}), s


def test_rule_policy_a_new_alarm_extends_the_escalation():
    p = RulePolicy(base="meso", escalate="micro", quiet=2)
    assert p.act(State(5, 100, alarms=[alarm(4)]))["layers"] == {("act", "1"): "micro"}
    assert p.act(State(6, 100, alarms=[alarm(4), alarm(5)]))["layers"] == {("act", "1"): "micro"}
    assert p.act(State(7, 100, alarms=[alarm(4), alarm(5)]))["layers"] == {("act", "1"): "micro"}
    assert p.act(State(8, 100, alarms=[alarm(4), alarm(5)]))["layers"] == {}


@pytest.mark.parametrize("a, kinds", [
    (alarm(0, "loss", "", "spike"), {"grad": "raw", "weight": "raw", "act": "raw"}),
    (alarm(0, "grad", "*", "exploding_grad"), {"grad": "raw", "weight": "macro", "act": "macro"}),
])
def test_rule_policy_escalates_whole_kinds_when_the_alarm_cannot_localise(a, kinds):
    p = RulePolicy(quiet=2)
    plans = levels_over(p, [State(1, 100, alarms=[a]), State(2, 100), State(3, 100)])
    assert [pl["kinds"] for pl in plans] == [kinds, kinds, {k: "macro" for k in KINDS}]
    assert all(pl["layers"] == {} for pl in plans)
    p.reset()
    assert p.act(State(1, 100))["kinds"] == {k: "macro" for k in KINDS}


@pytest.mark.parametrize("kwargs, needle", [
    ({"quiet": 0}, "quiet"), ({"quiet": 2.5}, "quiet"), ({"escalate": "finest"}, "'finest'"),
    ({"base": "coarse"}, "'coarse'"), ({"base": {"weights": "macro"}}, "'weights'"),
])
def test_rule_policy_rejects_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        RulePolicy(**kwargs)


# ---------------------------------------------------------------------------- q-learning
def test_joint_actions_are_every_level_per_kind():
    assert ACTION_LEVELS == ("macro", "meso", "micro", "raw")
    assert len(JOINT_ACTIONS) == 64 and len(set(JOINT_ACTIONS)) == 64


def test_q_learning_update_is_the_seed_formula():
    q = QLearningPolicy(epsilon=0.0, learning_rate=0.1, discount=0.9, seed=0)
    s, s2 = State(0, 100), State(60, 100, steps_since_alarm=2)
    assert s.discrete() != s2.discrete()
    plan = q.act(s)
    assert plan["action"] == 0 and plan["kinds"] == dict(zip(KINDS, JOINT_ACTIONS[0]))
    q.q[s.discrete()][0] = 2.0
    q.q[s2.discrete()] = np.arange(64) * 0.1  # max 6.3
    before = q.q[s.discrete()].copy()
    q.learn(s, plan, 1.5, s2)
    assert q.q[s.discrete()][0] == pytest.approx((1 - 0.1) * 2.0 + 0.1 * (1.5 + 0.9 * 6.3))
    np.testing.assert_array_equal(q.q[s.discrete()][1:], before[1:])
    # an unseen next state starts at zeros, as in the seed
    s3 = State(20, 100, utilisation=90.0)
    q.learn(s, plan, -1.0, s3)
    assert q.q[s3.discrete()].tolist() == [0.0] * 64
    assert q.q[s.discrete()][0] == pytest.approx(0.9 * (0.9 * 2.0 + 0.1 * (1.5 + 0.9 * 6.3)) + 0.1 * -1.0)


def test_q_learning_does_not_learn_when_not_training():
    q = QLearningPolicy(seed=0)
    s = State(0, 100)
    plan = q.act(s)
    q.training = False
    q.learn(s, plan, 100.0, s)
    assert not q.q[s.discrete()].any()


def test_q_learning_with_epsilon_zero_is_greedy():
    q = QLearningPolicy(epsilon=0.0, seed=0)
    s = State(30, 100)
    q.q[s.discrete()] = np.zeros(64)
    q.q[s.discrete()][17] = 0.5
    plans = [q.act(s) for _ in range(30)]
    assert {p["action"] for p in plans} == {17}
    assert plans[0]["kinds"] == dict(zip(KINDS, JOINT_ACTIONS[17]))
    # ties among the best are broken at random, but only among them
    q.q[s.discrete()][40] = 0.5
    assert {q.act(s)["action"] for _ in range(50)} == {17, 40}


def test_q_learning_is_deterministic_under_a_seed_and_explores():
    def actions(seed: int) -> list[int]:
        q = QLearningPolicy(epsilon=0.5, seed=seed)
        return [q.act(State(i, 100))["action"] for i in range(100)]

    assert actions(3) == actions(3)
    assert actions(3) != actions(4)
    assert len(set(actions(3))) > 20  # half the steps explore over 64 joint actions
    q = QLearningPolicy(epsilon=1.0, seed=0)
    q.training = False  # evaluation: no exploration
    assert {q.act(State(i, 100))["action"] for i in range(20)} == {0}


@pytest.mark.parametrize("field", ["epsilon", "learning_rate", "discount"])
@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan])
def test_q_learning_rejects_out_of_range_parameters(field, value):
    with pytest.raises(ValueError, match=rf"QLearningPolicy\.{field}"):
        QLearningPolicy(**{field: value})


# ---------------------------------------------------------------------------- linucb
def random_state(rng: np.random.Generator) -> State:
    return State(int(rng.integers(0, 100)), 100, steps_since_alarm=int(rng.integers(0, 20)),
                 utilisation=float(rng.uniform(0, 100)), complexity=float(rng.normal()),
                 loss_z=float(rng.normal()))


def test_linucb_learns_the_level_with_the_higher_reward():
    pol = LinUCBPolicy(alpha=1.0)
    rng = np.random.default_rng(0)
    chosen = []
    for _ in range(200):
        s = random_state(rng)
        plan = pol.act(s)
        reward = 1.0 if plan["kinds"]["grad"] == "meso" else 0.0
        pol.learn(s, plan, reward, s)
        chosen.append(plan["kinds"]["grad"])
    assert chosen[-50:].count("meso") >= 45  # exploration has settled
    pol.training = False
    picks = [pol.act(random_state(rng))["kinds"]["grad"] for _ in range(50)]
    assert picks == ["meso"] * 50
    # the learned value of meso for grads is near 1, of the others near 0
    x = random_state(rng).features()
    theta = {lv: np.linalg.solve(pol.A[("grad", lv)], pol.b[("grad", lv)]) for lv in ACTION_LEVELS}
    assert theta["meso"] @ x == pytest.approx(1.0, abs=0.1)
    assert all(abs(theta[lv] @ x) < 0.2 for lv in ACTION_LEVELS if lv != "meso")


def test_linucb_does_not_learn_when_not_training_and_validates():
    pol = LinUCBPolicy()
    pol.training = False
    s = State(1, 10)
    pol.learn(s, pol.act(s), 5.0, s)
    assert all(not b.any() for b in pol.b.values())
    for kwargs in ({"alpha": -1.0}, {"ridge": 0.0}, {"alpha": math.nan}):
        with pytest.raises(ValueError, match="LinUCBPolicy"):
            LinUCBPolicy(**kwargs)


# ---------------------------------------------------------------------------- controller
class FiresAt(Detector):
    """A detector that raises one hand-made alarm at a chosen step."""

    name = "fires_at"

    def __init__(self, step: int, kind: str, layer: str) -> None:
        super().__init__()
        self.step, self.kind, self.layer = step, kind, layer

    def update(self, step, obs, loss):
        return [alarm(step, self.kind, self.layer, self.name)] if step == self.step else []


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
    return {(r["kind"], r["layer"]): r["level"] for b in rec.batches.values() for r in b.to_pylist()}


def test_controller_escalates_the_alarmed_layer_on_the_next_step_then_relaxes():
    torch.manual_seed(0)
    model = mlp([64, 32, 16, 10])
    tel = Telemetry(model, "raw")
    ctl = Controller(tel, RulePolicy(base="meso", escalate="raw", quiet=3),
                     suite=DetectorSuite([FiresAt(5, "act", "1")]), steps_total=20)
    assert tel.on_record is ctl
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


def test_controller_escalates_every_kind_after_a_loss_alarm():
    torch.manual_seed(0)
    model = mlp([64, 16, 10])
    tel = Telemetry(model, "meso")
    Controller(tel, RulePolicy(base="macro", quiet=2), suite=DetectorSuite([FiresAt(1, "loss", "")]))
    plans = drive(tel, model, 6)
    tel.close()
    assert [sorted(set(p.values())) for p in plans] == [["macro"], ["raw"], ["raw"], ["macro"], ["macro"], ["macro"]]
    assert [sorted(r.batches) for r in tel.records] == [["macro"], ["macro"], ["raw"], ["raw"], ["macro"], ["macro"]]


def test_state_tracker_keeps_alarms_for_memory_steps():
    tr = StateTracker(steps_total=50, memory=5)
    s = tr.update(3, [alarm(3)], grad_var=1e-2, loss=2.0, utilisation=10.0)
    assert (s.step, s.steps_since_alarm, len(s.alarms)) == (4, 1, 1)
    for step in range(4, 8):
        s = tr.update(step, [], grad_var=1e-2, loss=2.0, utilisation=10.0)
        assert len(s.alarms) == 1 and s.steps_since_alarm == step + 1 - 3
    s = tr.update(8, [], grad_var=1e-2, loss=2.0, utilisation=10.0)
    assert s.alarms == [] and s.discrete()[1] == 0
    assert tr.update(9, [], None, math.nan, 0.0).loss_z == 5.0


# ---------------------------------------------------------------------------- episodes
STEPS = 60


@pytest.fixture(scope="module")
def clean_trace():
    return record(EpisodeSpec("mlp", None, steps=STEPS, seed=0))


@pytest.fixture(scope="module")
def dead_trace():
    return record(EpisodeSpec("mlp", Fault("dead_relu", 30), steps=STEPS, seed=0))


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


def test_record_keeps_every_tensor_and_is_deterministic(clean_trace):
    t = clean_trace
    assert t.param_layers == ["0", "2", "4"] and t.relu_layers == ["1", "3"]
    assert t.act_layers == ["0", "1", "2", "3", "4"]
    assert len(t.values) == STEPS and t.losses.shape == (STEPS,)
    assert t.values[0][("grad", "0")].numel() == 64 * 64 + 64  # uncapped
    assert t.values[0][("act", "1")].numel() == 32 * 64
    assert np.isfinite(t.losses).all() and t.losses[-1] < t.losses[0]
    again = record(EpisodeSpec("mlp", None, steps=STEPS, seed=0))
    np.testing.assert_array_equal(again.losses, t.losses)
    for step in (0, STEPS - 1):
        assert again.values[step].keys() == t.values[step].keys()
        assert all(torch.equal(again.values[step][k], t.values[step][k]) for k in t.values[step])
    assert again.test_accuracy == t.test_accuracy


def test_replay_bytes_raw_equals_raw_bytes_and_coarser_levels_send_less(dead_trace):
    res = {lv: replay(dead_trace, StaticPolicy(lv)) for lv in ("macro", "meso", "micro", "raw")}
    assert res["raw"].bytes == res["raw"].raw_bytes == float(dead_trace.raw_bytes(TelemetryConfig()).sum())
    assert res["macro"].bytes < res["meso"].bytes < res["micro"].bytes < res["raw"].bytes
    assert res["meso"].level_steps == {"off": 0, "macro": 0, "meso": 3 * STEPS, "micro": 0, "raw": 0}
    assert all(r.raw_bytes == res["raw"].raw_bytes for r in res.values())


def test_dead_relu_episode_is_detected_at_meso_and_a_clean_one_is_quiet(dead_trace, clean_trace):
    r = replay(dead_trace, StaticPolicy("meso"))
    assert r.fault == "dead_relu" and r.fault_step == 30
    assert r.detected and 0 <= r.delay <= 10
    assert r.false_alarms == 0 and r.true_alarms == len(r.alarms) > 0
    dead = [a for a in r.alarms if a.detector == "dead_relu"]
    assert dead and dead[0].layer == "1" and dead[0].step - 30 <= 10  # Linear "0" feeds ReLU "1"
    c = replay(clean_trace, StaticPolicy("meso"))
    assert c.alarms == [] and c.false_alarms == 0 and not c.detected and c.delay is None


def test_rule_policy_replay_detects_with_fewer_bytes_than_raw(dead_trace):
    r = replay(dead_trace, RulePolicy(base="macro", escalate="raw", quiet=5))
    assert r.detected and r.delay <= 10 and r.false_alarms == 0
    assert r.bytes < 0.5 * r.raw_bytes
    assert any(a.detector == "dead_relu" and a.layer == "1" for a in r.alarms)


def test_train_q_learning_on_short_traces_changes_its_table(clean_trace, dead_trace):
    def trained(seed: int) -> tuple[QLearningPolicy, list[float]]:
        q = QLearningPolicy(epsilon=0.2, seed=seed)
        rewards = train(q, [clean_trace, dead_trace], episodes=3, seed=seed, progress=False,
                        weights=RewardWeights(latency=0.0))  # no timing in the reward: reproducible
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
    assert sum(results[0].level_steps.values()) == 3 * STEPS


def result(fault: str, fault_step, true: int, false: int, detection, bytes_: float, raw: float,
           latency: float, steps: int) -> EpisodeResult:
    return EpisodeResult(f"mlp/{fault}/seed0", "p", fault, fault_step, [], true, false, detection,
                         bytes_, raw, latency, 0.0, {"off": 0, "macro": 0, "meso": 3 * steps, "micro": 0, "raw": 0})


def test_summarize_arithmetic():
    results = [
        result("dead_relu", 30, 3, 1, 33, 100.0, 1000.0, 2.0, 60),
        result("nan_batch", 20, 0, 2, None, 200.0, 1000.0, 4.0, 60),
        result("lr_spike", 10, 1, 0, 17, 300.0, 1000.0, 3.0, 30),
        result("clean", None, 0, 2, None, 50.0, 500.0, 1.0, 60),
        result("clean", None, 0, 0, None, 50.0, 500.0, 0.0, 60),
    ]
    assert [r.delay for r in results[:3]] == [3, None, 7]
    s = summarize(results)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["precision"] == pytest.approx(4 / 9)
    assert s["clean_false_alarm_rate"] == pytest.approx(1 / 2)
    assert s["median_delay"] == pytest.approx(5.0)
    assert s["bytes_vs_raw"] == pytest.approx(700 / 4000)
    assert s["bytes_per_step"] == pytest.approx(700 / 270)
    assert s["latency_ms"] == pytest.approx(2.0)
    only_clean = summarize(results[3:])
    assert math.isnan(only_clean["recall"]) and math.isnan(only_clean["median_delay"])
    assert math.isnan(summarize([results[4]])["precision"])
    frame = results_frame(results)
    assert frame["detected"].tolist() == [True, False, True, False, False]
    assert frame.loc[0, "delay"] == 3 and frame.loc[2, "delay"] == 7 and pd.isna(frame.loc[1, "delay"])
    assert frame["bytes_vs_raw"].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.1, 0.1])
