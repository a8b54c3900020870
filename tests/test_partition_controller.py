"""The re-partitioning controller: noise tolerance, reaction to a slow device, patience, cooldown,
hysteresis, planner failures and the migration trade-off."""
import networkx as nx
import numpy as np
import pytest

from adaptive_kit.partition import ControllerConfig, EmulatedPipeline, best_plan, emulate, simulate
from adaptive_kit.partition.controller import Controller, migration_seconds
from adaptive_kit.partition.forecast import ForecastConfig

# forecasts that repeat the last load (min_history is never reached): deviation = |load - 1|,
# so the decision logic can be checked window by window without ETS in the loop
NAIVE = ForecastConfig(season=0, window=64, min_history=10 ** 6)


def chain(n=16, param_bytes=1000):
    g = nx.path_graph(n, create_using=nx.DiGraph)
    nx.set_node_attributes(g, 1.0, "cost_s")
    nx.set_node_attributes(g, param_bytes, "param_bytes")
    return g


class Planner:
    """best_plan for the given speeds, counting calls; ``fail`` makes it raise instead."""

    def __init__(self, g, k, fail=None):
        self.g, self.k, self.fail, self.calls = g, k, fail, []

    def __call__(self, speeds):
        self.calls.append(np.asarray(speeds).copy())
        if self.fail is not None:
            raise self.fail
        return best_plan(self.g, self.k, speeds, cost="cost_s")


def make(k=4, n=16, migration=0.0, planner=None, **cfg):
    g = chain(n)
    planner = planner or Planner(g, k)
    plan = best_plan(g, k, cost="cost_s")
    cost = migration if callable(migration) else (lambda a, b: migration)
    return Controller(planner, plan, cost, config=ControllerConfig(**{"forecast": NAIVE, **cfg})), planner


def predicted(c):
    """Speed-1 seconds per stage of the plan in force."""
    return np.array(c.plan.stage_s) * 1.0


def feed(c, loads, remaining=1000):
    """One window where device j runs loads[j] times slower than predicted."""
    p = predicted(c)
    return c.observe(p * np.asarray(loads, dtype=float), p, remaining)


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(threshold=0.0), "threshold"), (dict(threshold=float("nan")), "threshold"),
    (dict(patience=0), "patience"), (dict(patience=1.5), "patience"), (dict(patience=True), "patience"),
    (dict(horizon=0), "horizon"), (dict(cooldown=-1), "cooldown"), (dict(cooldown=1.0), "cooldown"),
    (dict(release=1.5), "release"), (dict(release=-0.1), "release"), (dict(margin=-1.0), "margin"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} must be .*got {list(kwargs.values())[0]!r}"):
        ControllerConfig(**kwargs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ten_percent_noise_never_repartitions(seed):
    rng = np.random.default_rng(seed)
    g = chain(8)
    planner = Planner(g, 2)
    plan = best_plan(g, 2, cost="cost_s")
    c = Controller(planner, plan, lambda a, b: 0.0)  # the default config: ETS forecasts
    p = np.array(plan.stage_s)
    decisions = [c.observe(p * rng.uniform(0.9, 1.1, 2), p, 1000) for _ in range(60)]
    assert not any(d.repartition for d in decisions) and planner.calls == []
    assert {d.reason for d in decisions} == {"steady"}
    assert max(d.deviation for d in decisions) < ControllerConfig().threshold
    assert c.plan is plan


def rate(stage_s, micro=8):
    f = np.asarray(stage_s, dtype=float) / (3 * micro)  # a stage's step: a third forward, two thirds backward
    return 1 / simulate(f, 2 * f, micro=micro).makespan_s


@pytest.mark.parametrize("seed", [0, 1])
def test_a_slow_device_triggers_a_repartition_that_recovers_throughput(seed):
    start = 4
    pipe = emulate(chain(), 4, 14, slowdown={1: (start, 2.0)}, noise=0.05, seed=seed)
    frame = pipe.frame()
    fired = frame.index[frame.repartition].tolist()
    assert len(fired) == 1 and start <= fired[0] < start + 3
    assert (frame.throughput[:start] == frame.optimum[:start]).all()
    before = frame.throughput[start] / frame.optimum[start]
    # stages 4,4,4,4 with device 1 at half speed: 8 s against the optimum's 5 (5, 2, 5, 4)
    assert before == pytest.approx(rate([4, 8, 4, 4]) / rate([5, 4, 5, 4]))
    after = frame.throughput[fired[0] + 1:] / frame.optimum[fired[0] + 1:]
    assert (after >= 0.9).all()
    assert frame.optimum[start] == pytest.approx(rate([5, 4, 5, 4]))
    stage_sizes = np.bincount(list(pipe.controller.plan.stage_of.values()), minlength=4)
    assert stage_sizes[1] == 2  # the slow device keeps two nodes


def test_without_adaptation_the_slow_plan_stays():
    pipe = emulate(chain(), 4, 6, slowdown={1: (2, 2.0)}, noise=0.0, adapt=False)
    frame = pipe.frame()
    assert set(frame.reason) == {"off"} and not frame.repartition.any()
    np.testing.assert_allclose(frame.throughput[2:] / frame.optimum[2:], rate([4, 8, 4, 4]) / rate([5, 4, 5, 4]))


def test_the_gain_is_the_time_saved_over_the_remaining_steps():
    c, planner = make(patience=1, cooldown=0)
    d = feed(c, [1, 2, 1, 1], remaining=100)
    assert d.repartition and d.reason == "repartition" and len(planner.calls) == 1
    np.testing.assert_allclose(planner.calls[0], [1, 0.5, 1, 1])
    # in force: 4 nodes on the half-speed device = 8 s; the new plan's bottleneck is 5 s
    assert d.gain_s == pytest.approx((8 - 5) * 100) and d.cost_s == 0.0
    assert c.plan.bottleneck_s == pytest.approx(5.0)
    np.testing.assert_allclose(c.assumed, [1, 0.5, 1, 1])
    # the new plan's assumption holds: the same loads are now steady
    assert feed(c, [1, 2, 1, 1]).reason == "steady"


def test_a_single_window_spike_does_not_trigger():
    c, planner = make(patience=2)
    reasons = [feed(c, [1, 2, 1, 1] if w == 5 else [1, 1, 1, 1]).reason for w in range(10)]
    assert reasons == ["steady"] * 5 + ["deviating"] + ["steady"] * 4
    assert planner.calls == [] and c.decisions[5].deviation == pytest.approx(1.0)
    # two windows in a row do
    assert feed(c, [1, 2, 1, 1]).reason == "deviating"
    assert feed(c, [1, 2, 1, 1]).repartition and len(planner.calls) == 1


def test_no_second_repartition_within_the_cooldown():
    c, planner = make(patience=1, cooldown=3)
    assert feed(c, [1, 2, 1, 1]).repartition
    first = c.plan
    # device 2 slows down right after: the cooldown holds the plan for 3 windows
    held = [feed(c, [1, 2, 2, 1]) for _ in range(3)]
    assert [d.reason for d in held] == ["cooldown"] * 3 and not any(d.repartition for d in held)
    assert len(planner.calls) == 1 and c.plan is first
    assert feed(c, [1, 2, 2, 1]).repartition and c.plan is not first
    np.testing.assert_allclose(planner.calls[1], [1, 0.5, 0.5, 1])
    assert c.plan.bottleneck_s == pytest.approx(6.0)  # 6, 3, 3, 4 nodes at speeds 1, .5, .5, 1


def test_hysteresis_keeps_the_count_between_release_and_threshold():
    # threshold 0.25, release 0.5: a deviation of 0.2 neither counts nor resets
    c, planner = make(patience=3, threshold=0.25, release=0.5, cooldown=0)
    counts = []
    for load in (1.5, 1.2, 1.5):
        feed(c, [load, 1, 1, 1])
        counts.append(int(c.over[0]))
    assert counts == [1, 1, 2] and planner.calls == []
    assert feed(c, [1.5, 1, 1, 1]).repartition and len(planner.calls) == 1
    # below release x threshold (0.1 < 0.125) the count starts again
    c, planner = make(patience=3, threshold=0.25, release=0.5, cooldown=0)
    counts = []
    for load in (1.5, 1.1, 1.5, 1.5):
        feed(c, [load, 1, 1, 1])
        counts.append(int(c.over[0]))
    assert counts == [1, 0, 1, 2] and planner.calls == []
    assert [d.reason for d in c.decisions] == ["deviating", "steady", "deviating", "deviating"]


def test_a_failing_planner_keeps_the_plan():
    c, planner = make(patience=1, cooldown=2, planner=None)
    planner.fail = RuntimeError("solver exploded")
    plan = c.plan
    d = feed(c, [1, 2, 1, 1])
    assert not d.repartition and c.plan is plan and c.failures == 1
    assert d.reason.startswith("planner failed") and "RuntimeError: solver exploded" in d.reason
    np.testing.assert_allclose(c.assumed, 1.0)
    assert [feed(c, [1, 2, 1, 1]).reason for _ in range(2)] == ["cooldown"] * 2
    assert feed(c, [1, 2, 1, 1]).reason.startswith("planner failed") and c.failures == 2
    planner.fail = None  # the planner recovers: the next attempt goes through
    feed(c, [1, 2, 1, 1])
    feed(c, [1, 2, 1, 1])
    assert feed(c, [1, 2, 1, 1]).repartition and c.plan is not plan


@pytest.mark.parametrize(("remaining", "migration", "margin"), [
    (0, 0.0, 1.0),  # nothing left to gain
    (10, 1e6, 1.0),  # moving costs more than 30 s saved
    (10, 20.0, 2.0),  # 30 s saved, but not twice the 20 s it costs
])
def test_no_repartition_when_migration_outweighs_the_gain(remaining, migration, margin):
    c, planner = make(patience=1, cooldown=0, migration=migration, margin=margin)
    plan = c.plan
    d = feed(c, [1, 2, 1, 1], remaining=remaining)
    assert not d.repartition and d.reason == "no gain" and c.plan is plan
    assert d.gain_s == pytest.approx(3.0 * remaining) and d.cost_s == migration
    assert len(planner.calls) == 1
    np.testing.assert_allclose(c.assumed, [1, 0.5, 1, 1])  # known now, so it is not re-planned for again
    assert not c.over.any()  # the counts start again after a decision
    # the same trade with a cheaper move goes through
    c, _ = make(patience=1, cooldown=0, migration=10.0, margin=margin)
    assert feed(c, [1, 2, 1, 1], remaining=10).repartition == (30 > margin * 10)


def test_history_has_the_forecast_interval():
    g = chain(8)
    c = Controller(Planner(g, 2), best_plan(g, 2, cost="cost_s"), lambda a, b: 0.0)
    rng = np.random.default_rng(0)
    p = predicted(c)
    loads = []
    for _ in range(16):
        load = rng.uniform(0.95, 1.05, 2)
        loads.append(load)
        c.observe(p * load, p, 1000)
    h = c.history()
    assert list(h.columns) == ["window", "device", "load", "forecast", "lower", "upper", "assumed"]
    assert len(h) == 32 and h.window.tolist() == [w for w in range(16) for _ in range(2)]
    np.testing.assert_allclose(h.load, np.concatenate(loads))
    assert (h.lower <= h.forecast).all() and (h.forecast <= h.upper).all()
    late = h[h.window >= 13]  # ETS from min_history on: finite intervals around the loads
    assert np.isfinite(late[["lower", "upper"]].to_numpy()).all()
    assert ((late.forecast > 0.9) & (late.forecast < 1.1)).all()
    assert (h.assumed == 1.0).all()


def test_observe_validates_its_input():
    c, _ = make()
    p = predicted(c)
    with pytest.raises(ValueError, match="need 4 entries"):
        c.observe(p[:3], p, 10)
    with pytest.raises(ValueError, match="need 4 entries"):
        c.observe(p, p[:, None], 10)
    for bad_m, bad_p in ((np.where(np.arange(4) == 0, 0.0, p), p), (p, -p), (p * np.nan, p),
                         (p * np.inf, p)):
        with pytest.raises(ValueError, match="must be finite and > 0"):
            c.observe(bad_m, bad_p, 10)
    assert c.window == 0 and c.decisions == []  # rejected windows leave no trace


def test_migration_seconds_counts_only_moved_nodes():
    g = nx.DiGraph()
    g.add_nodes_from([("a", {"param_bytes": 100}), ("b", {"param_bytes": 300}), ("c", {"param_bytes": 50}),
                      ("d", {})])
    old = {"a": 0, "b": 0, "c": 1, "d": 1}
    assert migration_seconds(g, old, dict(old), 10.0) == 0.0
    new = {"a": 0, "b": 1, "c": 1, "d": 0}  # b moves (300 bytes), d moves (no parameters)
    assert migration_seconds(g, old, new, 10.0) == pytest.approx(2 * 300 / 10)
    assert migration_seconds(g, old, new, 10.0, state_copies=3, fixed_s=1.5) == pytest.approx(1.5 + 90)
    assert migration_seconds(g, {}, {"a": 0}, 10.0) == pytest.approx(20.0)  # new to the plan


def test_bad_construction_raises():
    g = chain(8)
    plan = best_plan(g, 2, cost="cost_s")
    with pytest.raises(ValueError, match="speeds must be 2 positive numbers"):
        Controller(Planner(g, 2), plan, lambda a, b: 0.0, speeds=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="speeds must be 2 positive numbers"):
        Controller(Planner(g, 2), plan, lambda a, b: 0.0, speeds=[1.0, 0.0])
    with pytest.raises(ValueError, match="noise must be >= 0"):
        EmulatedPipeline(g, 2, noise=-0.1)
    with pytest.raises(ValueError, match=r"slowdown needs a device in \[0, 2\)"):
        emulate(g, 2, 3, slowdown={2: (0, 2.0)})
    with pytest.raises(ValueError, match="factor > 0"):
        emulate(g, 2, 3, slowdown={0: (0, 0.0)})
    pipe = EmulatedPipeline(g, 2, adapt=False)
    pipe.speeds = np.array([1.0, -1.0])
    with pytest.raises(ValueError, match="speeds must be finite and > 0"):
        pipe.step()


def test_scattered_deviations_on_different_devices_do_not_add_up():
    # each device deviates once, never twice in a row: per-device counts stay at 1
    c, planner = make(patience=2, threshold=0.25, release=0.5, cooldown=0)
    for j in range(4):
        load = [1.0] * 4
        load[j] = 1.5
        assert not feed(c, load).repartition
    assert planner.calls == []
