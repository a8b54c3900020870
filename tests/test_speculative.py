"""Speculative training in one process: exactness against oracles, bytes, the Region Manager's rules
and hysteresis, reconciliation and rollback, health, the network model, tasks and bad input.

The multi-process twins (real gloo collectives, torch's own DDP and model averagers) are in
``test_speculative_dist.py``.
"""
from __future__ import annotations

import math
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import adaptive_kit.speculative as sp
from adaptive_kit.datasets import digits, dirichlet_split
from adaptive_kit.devices import rank_generator
from adaptive_kit.speculative.comm import Collective, DistComm, SimComm
from adaptive_kit.speculative.model import region_index
from adaptive_kit.speculative.network import (
    NetworkProfile,
    profile,
    ring_allreduce_s,
    simulated_time,
    traffic_frame,
)
from adaptive_kit.speculative.regions import (
    FULL,
    GLOBAL,
    HYBRID,
    ManagerConfig,
    RegionManager,
    RegionStats,
)
from adaptive_kit.speculative.result import NotReached
from adaptive_kit.training import TrainConfig

TRAIN = TrainConfig(lr=0.05, momentum=0.9, batch_size=16, steps=29)
K = 2
SKETCH = 16  # SpeculativeConfig.sketch, the default


@pytest.fixture(scope="module")
def task() -> sp.Task:
    return sp.tasks.digits_task(K, 0.5)  # MLP 64-128-128-10: layers "0", "2", "4"


@pytest.fixture(scope="module")
def small() -> sp.Task:
    return sp.tasks.digits_task(K, 0.5, hidden=(16,))  # 64-16-10, for runs that only need to run


@pytest.fixture(scope="module")
def n_params(task) -> int:
    return sum(p.numel() for p in task.build().parameters())


def run(task, config, train_config=TRAIN, **kw) -> sp.RunResult:
    return sp.train(task, config, train_config, **kw)


# --- exactness in one process --------------------------------------------------------------------

def periodic_oracle(task: sp.Task, train: TrainConfig, period: int, outer_lr: float = 1.0,
                    outer_momentum: float = 0.0) -> torch.Tensor:
    """Local SGD / DiLoCo from plain torch: one model and ``torch.optim.SGD`` per worker, batches
    drawn as the engine draws them; after every step ``t`` with ``t % period == 0`` an outer SGD
    step (Nesterov when it has momentum) on the pseudo-gradient ``anchor - mean`` sets every
    worker to the anchor; a last outer step makes the consensus if the last step was not one."""
    torch.manual_seed(train.seed)
    base = task.build()
    models = [pickle.loads(pickle.dumps(base)) for _ in task.shards]
    inner = [torch.optim.SGD(m.parameters(), lr=train.lr, momentum=train.momentum) for m in models]
    anchor = nn.Parameter(nn.utils.parameters_to_vector(base.parameters()).detach().clone())
    outer = torch.optim.SGD([anchor], lr=outer_lr, momentum=outer_momentum, nesterov=outer_momentum > 0)
    gens = [rank_generator(train.seed, r) for r in range(len(models))]

    def outer_step() -> None:
        mean = torch.stack([nn.utils.parameters_to_vector(m.parameters()) for m in models]).mean(0)
        anchor.grad = (anchor - mean).detach()
        outer.step()
        for m in models:
            nn.utils.vector_to_parameters(anchor.detach().clone(), m.parameters())

    for t in range(train.steps):
        for (x, y), m, opt, g in zip(task.shards, models, inner, gens):
            i = torch.randint(0, len(x), (train.batch_size,), generator=g)
            opt.zero_grad()
            task.loss(m(x[i]), y[i]).backward()
            opt.step()
        if t % period == 0:
            outer_step()
    if (train.steps - 1) % period:
        outer_step()
    return anchor.detach()


@pytest.mark.parametrize("steps", [29, 27])  # the last step averages (28 = 7 * 4), or does not
@pytest.mark.parametrize(("name", "config", "outer"), [
    ("local_sgd", sp.baselines.local_sgd(4), (1.0, 0.0)),
    ("diloco", sp.baselines.diloco(4, outer_lr=0.7, outer_momentum=0.9), (0.7, 0.9)),
])
def test_periodic_methods_equal_a_plain_torch_oracle(task, steps, name, config, outer):
    train = replace(TRAIN, steps=steps)
    res = run(task, config, train)
    expected = periodic_oracle(task, train, 4, *outer)
    torch.testing.assert_close(res.theta, expected, atol=2e-6, rtol=0)
    # one average after each step 0, 4, ..., and one consensus average only if the last step had none
    averages = len(range(0, steps, 4)) + bool((steps - 1) % 4)
    assert sum(c.kind == "weights" for c in res.log) == averages
    assert res.final_test_loss == pytest.approx(loss_of(task, expected), abs=1e-5)


def loss_of(task: sp.Task, theta: torch.Tensor) -> float:
    model = task.build()
    nn.utils.vector_to_parameters(theta, model.parameters())
    with torch.no_grad():
        return float(task.loss(model(task.test[0]), task.test[1]))


def test_ddp_preset_is_every_weight_global_every_step(task, n_params):
    res = run(task, sp.baselines.ddp())
    h = res.history
    assert res.regions == ["0", "2", "4"]
    assert (res.p == 0).all()
    assert [c.kind for c in res.log if c.kind != "eval"] == ["grad"] * TRAIN.steps
    # bytes per worker per step: every gradient in float32, plus one health flag per worker
    assert (h["payload_bytes"] == 4 * n_params).all() and (h["control_bytes"] == 4 * K).all()
    assert res.bytes_per_worker() == {"payload": 4 * n_params * TRAIN.steps,
                                      "control": 4 * K * TRAIN.steps,
                                      "total": (4 * n_params + 4 * K) * TRAIN.steps}
    assert not h["tagged"].any() and h["reconciled"].sum() == 0 and res.rollback_rate() == 0.0


def test_zero_threshold_rolls_back_every_time_and_equals_the_blocking_run(task):
    zero = run(task, sp.baselines.speculative(reconcile_threshold=0.0, period=4))
    blocking = run(task, sp.baselines.speculative(speculate=False, period=4))
    assert torch.equal(zero.theta, blocking.theta)
    assert zero.history["loss"].equals(blocking.history["loss"])
    assert zero.evals.equals(blocking.evals) and np.array_equal(zero.p, blocking.p)
    assert zero.rollback_rate() == 1.0
    assert zero.history["tagged"].sum() > 0 and not blocking.history["tagged"].any()
    # the same collectives and bytes; only when the weight averages were waited for differs
    strip = [(c.step, c.kind, c.payload_bytes, c.control_bytes) for c in zero.log]
    assert strip == [(c.step, c.kind, c.payload_bytes, c.control_bytes) for c in blocking.log]
    assert {c.overlapped for c in zero.log if c.kind == "weights" and c.step < TRAIN.steps - 1} == {True}
    assert {c.overlapped for c in blocking.log if c.kind == "weights"} == {False}
    # never rolling back keeps stale work: a different trajectory (so the equality above is not vacuous)
    never = run(task, sp.baselines.speculative(reconcile_threshold=1e9, period=4))
    assert not torch.equal(never.theta, blocking.theta)


def test_rollback_accounting(task):
    cfg = sp.baselines.speculative(period=4)
    zero = run(task, replace(cfg, reconcile_threshold=0.0))
    never = run(task, replace(cfg, reconcile_threshold=1e9))
    R = len(zero.regions)
    for res in (zero, never):
        h = res.history
        # a reconciliation of computed-ahead work: each region averaged, of every worker, on tagged steps only
        rec = h["reconciled"].to_numpy()
        assert (rec % K == 0).all() and (rec[~h["tagged"].to_numpy()] == 0).all()
        assert ((rec[h["tagged"].to_numpy()] >= K) & (rec[h["tagged"].to_numpy()] <= R * K)).all()
        assert h["tagged"].sum() >= 3
    h = zero.history
    assert (h["rollbacks"] == h["reconciled"]).all()
    assert (h["recomputes"] == np.where(h["tagged"], K, 0)).all()  # rows recomputed, per step
    h = never.history
    assert h["rollbacks"].sum() == 0 and h["recomputes"].sum() == 0 and never.rollback_rate() == 0.0
    # recompute is priced in simulated time: one extra compute per step with a rollback
    redo = (zero.history["recomputes"] > 0).to_numpy()
    expected = simulated_time(zero.log, len(zero.history), K, zero.compute_s, redo, "lan")
    np.testing.assert_allclose(zero.simulated_time("lan"), expected)
    no_redo = simulated_time(zero.log, len(zero.history), K, zero.compute_s, None, "lan")
    assert zero.simulated_time("lan")[-1] - no_redo[-1] == pytest.approx(redo.sum() * zero.compute_s)


def test_speculative_bytes_are_gradients_weights_stats_and_flags(task, n_params):
    res = run(task, sp.baselines.speculative(period=4))
    R, ctrl = len(res.regions), 4 * (len(res.regions) * (SKETCH + 1) + 1 + K)
    # initial p = 0.5: the first ceil(n_r / 2) weights of each region's fixed order speculate
    sizes = [p.numel() for p in task.build().parameters()]
    spec = sum(math.ceil((sizes[i] + sizes[i + 1]) / 2) for i in range(0, 2 * R, 2))
    first = [c for c in res.log if c.step == 0]
    assert [(c.kind, c.payload_bytes) for c in first] == [
        ("grad", 4 * (n_params - spec)), ("weights", 4 * spec), ("eval", 4 * n_params)]
    # the control statistics ride on the step's first collective every control_every = 8 steps
    assert [(c.step, c.kind) for c in res.log if c.control_bytes == ctrl] == [
        (0, "grad"), (8, "grad"), (16, "grad"), (24, "grad")]
    # a weight average also carries each worker's squared update per region averaged (the drift evidence)
    weights = {c.control_bytes for c in res.log if c.kind == "weights"}
    assert weights <= {4 * (K + r) for r in range(1, R + 1)} and 4 * (K + R) in weights
    assert {c.control_bytes for c in res.log if c.kind == "grad"} == {4 * K, ctrl}
    pay = sum(c.payload_bytes for c in res.log if c.kind != "eval")
    assert res.bytes_per_worker()["payload"] == pay == res.history["payload_bytes"].sum()
    assert res.bytes_per_worker()["control"] == res.history["control_bytes"].sum()


def test_global_weights_stay_identical_across_workers(task):
    """Whatever the Region Manager does to p, a Global weight is the same on every worker, and the
    run ends with one consensus model."""
    seen = []

    def check(step, eng):
        glob = ~eng.speculative_mask
        seen.append((eng.p.copy(), bool((eng.theta[:, glob] == eng.theta[0, glob]).all())))

    res = run(task, sp.baselines.speculative(period=4), on_step=check)
    ps = np.array([p for p, _ in seen])
    assert (ps.min(0) < ps.max(0)).any(), "p never changed: the test needs a run where it does"
    assert all(same for _, same in seen)
    # finish() leaves every worker at one model: worker 0's weights score as the workers' average
    assert loss_of(task, res.theta) == pytest.approx(res.final_test_loss, abs=1e-6)


def test_same_seed_same_run_other_seed_other_run(task):
    cfg = sp.baselines.speculative(period=4)
    a, b = run(task, cfg), run(task, cfg)
    c = run(task, cfg, replace(TRAIN, seed=1))
    assert a.history.equals(b.history) and a.evals.equals(b.evals)
    assert torch.equal(a.theta, b.theta) and np.array_equal(a.p, b.p) and a.log == b.log
    assert not torch.equal(a.theta, c.theta)


def test_evaluation_schedule_and_early_stop(small):
    res = run(small, sp.baselines.ddp(), replace(TRAIN, steps=25), eval_every=10)
    assert res.evals["step"].tolist() == [0, 10, 20, 24]
    assert [c.step for c in res.log if c.kind == "eval"] == [0, 10, 20, 24]
    stopped = run(small, sp.baselines.local_sgd(4), on_step=lambda t, eng: t == 6)
    assert len(stopped.history) == 7 and stopped.evals["step"].tolist() == [0, 6]
    assert max(c.step for c in stopped.log) == 6
    assert np.isfinite(stopped.evals[["test_loss", "test_accuracy"]].to_numpy()).all()


def test_custom_regions_reach_the_manager(small):
    regions = {"hidden": ["0.weight", "0.bias"], "head": ["2.weight", "2.bias"]}
    res = run(small, sp.baselines.speculative(regions=regions, period=4), replace(TRAIN, steps=9))
    assert res.regions == ["hidden", "head"] and res.p.shape == (9, 2)
    res = run(small, sp.baselines.speculative(regions="param", period=4), replace(TRAIN, steps=9))
    assert res.regions == ["0.weight", "0.bias", "2.weight", "2.bias"] and res.p.shape == (9, 4)


def test_everything_a_run_returns_pickles(small):
    """Spawned workers receive the task and config and send the result back by pickle."""
    res = run(small, sp.baselines.speculative(period=4), replace(TRAIN, steps=5))
    task2, res2 = pickle.loads(pickle.dumps(small)), pickle.loads(pickle.dumps(res))
    assert isinstance(task2.build(), nn.Module) and torch.equal(task2.shards[1][0], small.shards[1][0])
    assert torch.equal(res2.theta, res.theta) and res2.log == res.log and res2.history.equals(res.history)


# --- health: a non-finite worker -----------------------------------------------------------------

def poison(rank: int, at: int, record: list | None = None):
    def on_step(step, eng):
        if step == at:
            eng.theta[rank, :5] = float("nan")
        if record is not None:
            record.append((step, eng.theta.clone(), eng.anchor.clone()))
    return on_step


def test_nan_in_one_worker_is_left_out_of_the_average_and_repaired(task):
    record: list = []
    res = run(task, sp.baselines.local_sgd(4), on_step=poison(1, 5, record))
    # weights averaged after steps 0, 4, 8, ...: the one after step 8 sees worker 1's NaN
    assert [(a["step"], a["kind"], a["ranks"]) for a in res.alarms] == [(8, "weights", [1])]
    theta = {s: th for s, th, _ in record}
    anchor = {s: a for s, _, a in record}
    assert all(torch.isfinite(th[0]).all() for th in theta.values())  # worker 0 never corrupted
    assert not torch.isfinite(theta[8][1]).all()
    # the average adopted at step 9 is worker 0's weights alone, and worker 1 is finite again
    torch.testing.assert_close(anchor[9], theta[8][0], atol=1e-6, rtol=0)
    assert torch.isfinite(theta[9]).all()
    assert torch.isfinite(res.theta).all() and np.isfinite(res.evals["test_loss"]).all()


def test_nan_in_one_worker_under_ddp(task):
    clean = run(task, sp.baselines.ddp())
    record: list = []
    res = run(task, replace(sp.baselines.ddp(), health_every=4), on_step=poison(1, 5, record))
    assert [(a["step"], a["kind"], a["ranks"]) for a in res.alarms] == [(6, "grad", [1])]
    theta = {s: th for s, th, _ in record}
    assert all(torch.isfinite(th[0]).all() for th in theta.values())
    assert not torch.isfinite(theta[6][1]).all()
    assert torch.isfinite(theta[7]).all() and torch.equal(theta[7][0], theta[7][1])  # repaired at 7
    assert torch.isfinite(res.theta).all()
    assert res.final_test_loss == pytest.approx(clean.final_test_loss, rel=0.05)


def test_every_worker_non_finite_raises(small):
    def all_nan(step, eng):
        if step == 2:
            eng.theta[:, 0] = float("nan")

    with pytest.raises(FloatingPointError, match="every worker"):
        run(small, sp.baselines.ddp(), on_step=all_nan)


# --- the Region Manager --------------------------------------------------------------------------

def stats(loss: float = 1.0, regions: int = 1) -> RegionStats:
    z = np.zeros(regions)
    return RegionStats(loss, z + 1, z, z, z, z * np.nan)


def evidence(mgr: RegionManager, h: list[float], steps: int = 8, noise: float = 1.0) -> np.ndarray:
    """Feed one average of every non-Global region whose harmful drift is ``h``, then decide.

    With per-step disagreement ``noise`` (x), a spread/progress ratio r has harmful part
    r * ((r P / x - 1) / (P - 1)); solve for r so that it equals h."""
    regions = np.array([r for r in range(len(h)) if mgr.state[r] != GLOBAL])
    mgr._noise[:] = noise
    if len(regions):
        hh = np.asarray(h, float)[regions]
        # h = r (r P / x - 1) / (P - 1)  ->  r = (x + sqrt(x^2 + 4 P x h (P - 1))) / (2 P)
        r = (noise + np.sqrt(noise ** 2 + 4 * steps * noise * hh * (steps - 1))) / (2 * steps)
        mgr.observe_sync(regions, r * 3.0, np.full(len(regions), 3.0), np.full(len(regions), steps))
    return mgr.decide(stats(regions=len(h)))


def fresh(h0: float = 0.5, **kw) -> RegionManager:
    return RegionManager(["a"], replace(ManagerConfig(), **kw))


def test_drift_evidence_against_the_formula():
    mgr = RegionManager(["noise", "bias", "mixed"], ManagerConfig(fast=0.0))
    mgr._noise[:] = 2.0
    P = 8
    # noise only: spread / progress = x / P -> no harmful drift; bias only: = x -> all of it
    mgr.observe_sync(np.arange(3), np.array([2.0 / P, 2.0, 1.0]), np.ones(3), np.full(3, P))
    r = 1.0
    assert mgr.drift[0] == pytest.approx(0.0, abs=1e-12)
    assert mgr.drift[1] == pytest.approx(2.0)
    assert mgr.drift[2] == pytest.approx(r * (r * P / 2.0 - 1) / (P - 1))
    # the reconciliation's scale: the spread per step
    np.testing.assert_allclose(mgr.spread, np.array([2.0 / P, 2.0, 1.0]) / P)


@settings(max_examples=60, deadline=None)
@given(scale=st.floats(1e-6, 1e6), spread=st.floats(0.01, 50.0), steps=st.integers(1, 64))
def test_drift_is_scale_free(scale, spread, steps):
    """The same layer measured in other units (weights x sqrt(scale)) gets the same evidence."""
    a, b = RegionManager(["a"]), RegionManager(["a"])
    a._noise[:] = b._noise[:] = 1.5
    a.observe_sync(np.array([0]), np.array([spread]), np.array([1.0]), np.array([steps]))
    b.observe_sync(np.array([0]), np.array([spread * scale]), np.array([scale]), np.array([steps]))
    assert a.drift[0] == pytest.approx(b.drift[0], rel=1e-9)


def test_rule_walks_a_layer_through_all_three_states_and_back():
    mgr = RegionManager(["a"], ManagerConfig(p_step=0.25, global_dwell=2, max_period=4))
    assert mgr.state == [HYBRID] and mgr.p.tolist() == [0.5]
    assert evidence(mgr, [5.0]).tolist() == [0.25]  # hurts: toward Global
    assert evidence(mgr, [5.0]).tolist() == [0.0] and mgr.state == [GLOBAL]
    assert evidence(mgr, [0.0]).tolist() == [0.0]  # no drift to measure while Global: it dwells
    assert evidence(mgr, [0.0]).tolist() == [0.25] and mgr.state == [HYBRID]  # then it is probed
    assert evidence(mgr, [0.05]).tolist() == [0.5]  # small drift: speculate more
    evidence(mgr, [0.05])
    assert evidence(mgr, [0.05]).tolist() == [1.0] and mgr.state == [FULL] and mgr.mult.tolist() == [1]
    evidence(mgr, [0.05])
    assert mgr.mult.tolist() == [2]
    evidence(mgr, [0.05])
    evidence(mgr, [0.05])
    assert mgr.mult.tolist() == [4]  # capped at max_period
    evidence(mgr, [5.0], steps=32)
    assert mgr.mult.tolist() == [2] and mgr.state == [FULL]  # hurts: a Full layer halves its period first
    # without fresh evidence nothing moves
    p = mgr.decide(stats())
    assert p.tolist() == [1.0] and mgr.mult.tolist() == [2]


def test_no_per_step_part_where_the_network_cannot_hide_it():
    mgr = RegionManager(["a", "b"], ManagerConfig(), global_ok=np.array([False, True]))
    evidence(mgr, [5.0, 5.0])
    assert mgr.state == [FULL, HYBRID]  # a: a Hybrid part would cost a latency every step
    for _ in range(3):
        evidence(mgr, [5.0, 5.0])
    assert mgr.state == [FULL, GLOBAL] and mgr.p.tolist() == [1.0, 0.0]


def test_only_the_worse_layers_tighten_the_better_ones_loosen():
    mgr = RegionManager(["a", "b", "c", "d"], ManagerConfig(initial_p=1.0))
    evidence(mgr, [2.0, 4.0, 0.2, 3.0])  # a hurts but less than most; c is small against the median
    assert mgr.state == [FULL, HYBRID, FULL, HYBRID] and mgr.mult.tolist() == [1, 1, 2, 1]


@settings(max_examples=100, deadline=None)
@given(rounds=st.lists(st.lists(st.floats(0.0, 10.0), min_size=3, max_size=3), min_size=1, max_size=25),
       ok=st.lists(st.booleans(), min_size=3, max_size=3), initial_p=st.sampled_from([0.0, 0.5, 1.0]))
def test_manager_properties(rounds, ok, initial_p):
    cfg = ManagerConfig(initial_p=initial_p, max_period=8)
    mgr = RegionManager(["a", "b", "c"], cfg, global_ok=np.array(ok))
    for h in rounds:
        p = evidence(mgr, h)
        assert ((0.0 <= p) & (p <= 1.0)).all() and np.array_equal(p, mgr.p)
        for r in range(3):
            assert mgr.state[r] == (GLOBAL if p[r] == 0 else FULL if p[r] == 1 else HYBRID)
            assert mgr.mult[r] in (1, 2, 4, 8) and (mgr.mult[r] == 1 or mgr.state[r] == FULL)
            if not ok[r] and initial_p > 0:
                assert mgr.state[r] != GLOBAL  # never chosen where the network cannot hide it
    assert len(mgr.history) == len(rounds)


def test_states_change_during_a_run_and_react_to_the_network(task):
    train = replace(TRAIN, steps=120, batch_size=32)
    seen = {}
    for net in ("lan", "wan"):
        engines = []
        res = run(task, sp.baselines.speculative(period=4, network=net), train,
                  on_step=lambda t, e, engines=engines: engines.append(e) if t == 0 else None)
        seen[net] = {s for h in engines[0].manager.history for s in h["state"]}
        assert np.isfinite(res.final_test_loss)
    assert seen["lan"] == {FULL, HYBRID, GLOBAL}  # LAN hides a per-step all-reduce: all three states
    assert GLOBAL not in seen["wan"]  # WAN would pay its latency every step


def test_default_reconciliation_rolls_back_rarely(task):
    res = run(task, sp.baselines.speculative(period=4), replace(TRAIN, steps=120))
    assert res.history["reconciled"].sum() > 0 and res.rollback_rate() < 0.10


def test_observe_statistics_against_numpy():
    cfg = ManagerConfig()
    mgr = RegionManager(["same", "opposite", "mixed"], cfg)
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, SKETCH))
    w0 = np.stack([s[0], s[1], s[2]])  # worker 0's sketch per region
    w1 = np.stack([s[0], -s[1], rng.normal(size=SKETCH)])  # worker 1: same, opposite, unrelated
    mean = (w0 + w1) / 2
    sq = ((w0 ** 2).sum(1) + (w1 ** 2).sum(1)) / 2
    st0 = mgr.observe(torch.tensor(mean), torch.tensor(sq), 2.0)
    div = 1 - (mean ** 2).sum(1) / sq
    np.testing.assert_allclose(st0.divergence, div, atol=1e-12)
    assert st0.divergence[0] == pytest.approx(0.0, abs=1e-12) and st0.divergence[1] == pytest.approx(1.0)
    np.testing.assert_allclose(st0.grad_norm, np.sqrt((mean ** 2).sum(1)))
    # one round: no noise over time yet, except where the workers' mean is exactly zero
    assert st0.variance.tolist() == [0.0, 1.0, 0.0] and (st0.convergence == 0).all()
    # round 2: the averaged gradient flips sign (pure noise over time), the loss halves
    st1 = mgr.observe(torch.tensor(-mean), torch.tensor(sq), 1.0)
    m1 = cfg.slow * mean + (1 - cfg.slow) * -mean
    m2 = (mean ** 2).sum(1)
    keep = [0, 2]  # region 1's mean is zero: 0 / 0, which the manager counts as pure noise
    np.testing.assert_allclose(st1.variance[keep], 1 - (m1[keep] ** 2).sum(1) / m2[keep], atol=1e-12)
    assert st1.variance[0] == pytest.approx(1 - 0.8 ** 2) and st1.variance[1] == 1.0
    fast, slow = cfg.fast * 2.0 + (1 - cfg.fast) * 1.0, cfg.slow * 2.0 + (1 - cfg.slow) * 1.0
    np.testing.assert_allclose(st1.convergence, 0.5 * (slow - fast) / slow, atol=1e-12)
    assert st1.loss == 1.0


def test_manager_starts_in_the_state_of_initial_p():
    assert RegionManager(["a"], ManagerConfig(initial_p=0.0)).state == [GLOBAL]
    assert RegionManager(["a"], ManagerConfig(initial_p=1.0)).state == [FULL]
    assert RegionManager(["a", "b"], ManagerConfig(initial_p=0.3)).state == [HYBRID, HYBRID]
    assert RegionManager(["a", "b"], ManagerConfig(initial_p=0.3)).p.tolist() == [0.3, 0.3]
    with pytest.raises(ValueError, match=r"global_ok must have shape \(2,\)"):
        RegionManager(["a", "b"], global_ok=np.ones(3, bool))


# --- regions --------------------------------------------------------------------------------------

MLP_NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]
MLP_SIZES = [6, 3, 6, 2]


def test_region_index_layer_param_and_mapping():
    names, of = region_index(MLP_NAMES, MLP_SIZES, "layer")
    assert names == ["0", "2"] and of.tolist() == [0] * 9 + [1] * 8 and of.dtype == torch.int64
    names, of = region_index(MLP_NAMES, MLP_SIZES, "param")
    assert names == MLP_NAMES and of.tolist() == [0] * 6 + [1] * 3 + [2] * 6 + [3] * 2
    names, of = region_index(MLP_NAMES, MLP_SIZES, {"weights": ["2.weight", "0.weight"],
                                                    "biases": ["0.bias", "2.bias"]})
    assert names == ["weights", "biases"] and of.tolist() == [0] * 6 + [1] * 3 + [0] * 6 + [1] * 2


def test_region_index_layers_of_a_transformer():
    model = sp.tasks.TinyGPT(vocab=8, seq_len=4, width=8)
    named = list(model.named_parameters())
    names, of = region_index([n for n, _ in named], [p.numel() for _, p in named], "layer")
    assert names == ["pos", "tok", "ln1", "qkv", "proj", "ln2", "ff.0", "ff.2", "head"]
    assert len(of) == sum(p.numel() for _, p in named)
    assert torch.bincount(of).tolist()[names.index("pos")] == 4 * 8  # a bare parameter: its own region


@pytest.mark.parametrize(("mapping", "pattern"), [
    ({"a": MLP_NAMES + ["3.weight"]}, r"unknown parameters \['3.weight'\]"),
    ({"a": ["0.weight", "0.bias"], "b": ["2.weight"]}, r"missing \['2.bias'\], repeated \[\]"),
    ({"a": MLP_NAMES, "b": ["0.bias"]}, r"missing \[\], repeated \['0.bias'\]"),
])
def test_region_index_rejects_bad_mappings(mapping, pattern):
    with pytest.raises(ValueError, match=pattern):
        region_index(MLP_NAMES, MLP_SIZES, mapping)


def test_bad_region_mapping_fails_before_training(small):
    with pytest.raises(ValueError, match=r"missing \['2.bias'\]"):
        run(small, sp.baselines.speculative(regions={"a": ["0.weight", "0.bias", "2.weight"]}))


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"hurt": 0.0}, r"ManagerConfig.hurt must be a finite number .*, got 0.0"),
    ({"loosen": math.nan}, r"ManagerConfig.loosen must be a finite number .*, got nan"),
    ({"loosen": 2.0}, r"ManagerConfig.loosen must be < hurt, got loosen=2.0 hurt=1.0"),
    ({"initial_p": 1.1}, r"ManagerConfig.initial_p must be a finite number in \[0, 1\], got 1.1"),
    ({"initial_p": -0.5}, r"ManagerConfig.initial_p must be a finite number in \[0, 1\], got -0.5"),
    ({"p_step": 0.0}, r"ManagerConfig.p_step must be a finite number in \(0, 1\], got 0.0"),
    ({"p_step": 1.5}, r"ManagerConfig.p_step must be a finite number in \(0, 1\], got 1.5"),
    ({"max_period": 0}, r"ManagerConfig.max_period must be an int >= 1, got 0"),
    ({"max_period": 6}, r"ManagerConfig.max_period must be a power of two, got 6"),
    ({"global_dwell": True}, r"ManagerConfig.global_dwell must be an int >= 1, got True"),
    ({"fast": 1.0}, r"ManagerConfig.fast must be a finite number in \[0, 1\), got 1.0"),
    ({"slow": -0.1}, r"ManagerConfig.slow must be a finite number in \[0, 1\), got -0.1"),
])
def test_manager_config_rejects(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ManagerConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"period": 0}, r"SpeculativeConfig.period must be an int >= 1, got 0"),
    ({"period": 2.0}, r"SpeculativeConfig.period must be an int >= 1, got 2.0"),
    ({"period": True}, r"SpeculativeConfig.period must be an int >= 1, got True"),
    ({"control_every": -1}, r"SpeculativeConfig.control_every must be an int >= 0, got -1"),
    ({"warmup": -3}, r"SpeculativeConfig.warmup must be an int >= 0, got -3"),
    ({"sketch": 0}, r"SpeculativeConfig.sketch must be an int >= 1, got 0"),
    ({"health_every": 0}, r"SpeculativeConfig.health_every must be an int >= 1, got 0"),
    ({"reconcile_threshold": -0.1}, r"SpeculativeConfig.reconcile_threshold must be a finite number .*, got -0.1"),
    ({"reconcile_threshold": math.nan}, r"SpeculativeConfig.reconcile_threshold must be a finite number .*, got nan"),
    ({"outer_lr": 0.0}, r"SpeculativeConfig.outer_lr must be a finite number in \(0, 2\], got 0.0"),
    ({"outer_lr": 2.5}, r"SpeculativeConfig.outer_lr must be a finite number in \(0, 2\], got 2.5"),
    ({"outer_momentum": 1.0}, r"SpeculativeConfig.outer_momentum must be a finite number in \[0, 1\), got 1.0"),
    ({"control_every": 0}, r"adaptive=True needs control_every >= 1"),
    ({"regions": "block"}, r"SpeculativeConfig.regions='block': expected 'layer', 'param' or a mapping"),
    ({"network": "moon"}, r"network profile='moon': expected one of"),
    ({"step_compute_s": 0.0}, r"SpeculativeConfig.step_compute_s must be a finite number .*, got 0.0"),
])
def test_speculative_config_rejects(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        sp.SpeculativeConfig(**kwargs)


def test_speculative_config_accepts_the_edges():
    sp.SpeculativeConfig(adaptive=False, control_every=0, reconcile_threshold=0.0, outer_lr=2.0)
    ManagerConfig(hurt=1e9, loosen=1e-9, initial_p=0.0, p_step=1.0, max_period=1, global_dwell=1)


@pytest.mark.parametrize("world", [0, -2, 1.0, True])
def test_simcomm_rejects_bad_worker_counts(world):
    with pytest.raises(ValueError, match=rf"workers \(K\) must be an int >= 1, got {world!r}"):
        SimComm(world)


def test_simcomm_sums_rows_and_logs_bytes():
    comm = SimComm(3)
    buf = torch.arange(12.0).view(3, 4)
    out = comm.all_sum(buf, step=5, kind="grad", control=1)
    assert torch.equal(out, buf.sum(0, keepdim=True).expand(3, 4))
    assert comm.log == [Collective(5, "grad", 12, 4, False)]
    with pytest.raises(ValueError, match="buffer has 2 rows for 3 workers"):
        comm.all_sum(buf[:2], step=0, kind="grad")
    with pytest.raises(ValueError, match=r"collective kind='gossip'"):
        comm.all_sum(buf, step=0, kind="gossip")
    assert comm.bytes_by_kind() == {"grad": 16, "weights": 0, "control": 0, "repair": 0, "eval": 0}


def test_distcomm_needs_a_process_group():
    with pytest.raises(RuntimeError, match="DistComm needs an initialised process group"):
        DistComm()


@pytest.mark.parametrize("every", [0, -1, 2.5, True])
def test_eval_every_must_be_a_positive_int(small, every):
    with pytest.raises(ValueError, match=rf"eval_every must be an int >= 1, got {every!r}"):
        run(small, sp.baselines.ddp(), eval_every=every)


def test_shard_count_must_match_the_workers(small):
    with pytest.raises(ValueError, match="task has 2 shards for 3 workers"):
        run(small, sp.baselines.ddp(), comm=SimComm(3))


def test_models_with_buffers_are_refused(small):
    def bn() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))

    task = sp.Task("bn", bn, small.shards, small.test)
    with pytest.raises(ValueError, match=r"Sequential has buffers \(BatchNorm\?\)"):
        run(task, sp.baselines.ddp())


def test_torch_worker_rejects_an_unknown_method(small):
    with pytest.raises(ValueError, match=r"torch_worker\(method='gossip'\)"):
        sp.baselines.torch_worker(0, 2, small, "gossip", TRAIN)


# --- the network model ----------------------------------------------------------------------------

def test_profiles():
    assert sorted(sp.PROFILES) == ["datacentre", "lan", "wan"]
    got = {n: (p.latency_s, p.bandwidth_Bps * 8) for n, p in sp.PROFILES.items()}
    assert got == {"lan": (50e-6, 10e9), "datacentre": (10e-3, 1e9), "wan": (50e-3, 100e6)}
    assert profile("wan") is sp.PROFILES["wan"] and profile(sp.PROFILES["lan"]) is sp.PROFILES["lan"]
    with pytest.raises(ValueError, match=r"network profile='moon': expected one of \['datacentre', 'lan', 'wan'\]"):
        profile("moon")
    with pytest.raises(ValueError, match="latency_s must be >= 0, got -1"):
        NetworkProfile("x", -1, 1.0)
    with pytest.raises(ValueError, match="bandwidth_Bps must be > 0, got 0"):
        NetworkProfile("x", 0.0, 0)


def test_ring_allreduce_seconds():
    lan, wan = sp.PROFILES["lan"], sp.PROFILES["wan"]
    # 2 (K - 1) latency hops plus 2 (K - 1) / K of the bytes through one link
    assert float(ring_allreduce_s(1e6, 4, lan)) == pytest.approx(6 * 50e-6 + 1.5 * 1e6 / 1.25e9)
    assert float(ring_allreduce_s(1e6, 8, wan)) == pytest.approx(14 * 0.05 + 14 / 8 * 1e6 / 12.5e6)
    assert float(ring_allreduce_s(1e6, 1, wan)) == 0.0
    np.testing.assert_allclose(ring_allreduce_s(np.array([0.0, 1e3]), 2, wan),
                               [2 * 0.05, 2 * 0.05 + 1e3 / 12.5e6])


def test_simulated_time_on_a_hand_built_log():
    net = NetworkProfile("round", latency_s=0.5, bandwidth_Bps=100.0)  # K=2: 1 s + bytes / 100
    log = [Collective(0, "grad", 100, 0, True),  # 2 s, overlapped with 0.5 s of compute
           Collective(1, "grad", 40, 10, True),  # 1.5 s overlapped
           Collective(1, "weights", 150, 50, False),  # 3 s blocking
           Collective(1, "eval", 10_000, 0, False),  # evaluation is not training: free
           Collective(2, "control", 0, 0, True),  # 1 s overlapped: compute (0.5) is hidden
           Collective(7, "grad", 100, 0, True)]  # past the last step: ignored
    t = simulated_time(log, 4, 2, 0.5, np.array([0, 0, 3, 1]), net)
    # max(compute, overlapped) + blocking + recompute (at most once per step)
    np.testing.assert_allclose(np.diff(t, prepend=0.0), [2.0, 1.5 + 3.0, 1.0 + 0.5, 0.5 + 0.5])
    np.testing.assert_allclose(simulated_time(log, 4, 2, 0.5, None, net), [2.0, 6.5, 7.5, 8.0])
    frame = traffic_frame(log)
    assert list(frame.columns) == ["step", "kind", "payload_bytes", "control_bytes", "overlapped"]
    assert frame["payload_bytes"].sum() == 10_390 and len(frame) == 6


def test_time_to_target(small):
    res = run(small, sp.baselines.ddp(), replace(TRAIN, steps=21), eval_every=5)
    t = res.simulated_time("wan")
    assert (np.diff(t) > 0).all() and len(t) == 21
    assert res.time_to(math.inf, "wan") == t[0]
    best = res.evals["test_loss"].min()
    first = int(res.evals.loc[res.evals["test_loss"] <= best, "step"].iloc[0])
    assert res.time_to(best, "wan") == t[first]
    never = res.time_to(-1.0, "wan")
    assert never == math.inf and isinstance(never, NotReached) and not np.isfinite(never)
    assert str(never).startswith("not reached (target -1, best test loss")
    assert pickle.loads(pickle.dumps(never)) == math.inf
    assert res.simulated_time("wan")[-1] > res.simulated_time("lan")[-1]



def test_result_analysis_bytes_tagged_states_and_shared_compute(small):
    res = run(small, sp.baselines.speculative(period=2), replace(TRAIN, steps=9), eval_every=4)
    sent = res.history["payload_bytes"] + res.history["control_bytes"]
    np.testing.assert_array_equal(res.bytes_at_evals(), [sent[: s + 1].sum() for s in res.evals["step"]])
    kept, recomputed = res.tagged_outputs()
    assert kept + recomputed == res.history["tagged"].sum() * K and recomputed == res.history["recomputes"].sum()
    shares = res.state_shares()
    assert set(shares) == {GLOBAL, HYBRID, FULL} and sum(shares.values()) == pytest.approx(1.0)
    slow = replace(res, compute_s=res.compute_s * 10)
    priced = sp.with_shared_compute({"a": res, "b": slow})
    assert priced["a"].compute_s == priced["b"].compute_s == res.compute_s
    assert priced["b"].time_to(math.inf, "wan") == res.time_to(math.inf, "wan")


def test_rank_generator_is_the_per_rank_seed_formula():
    assert torch.equal(rank_generator(3, 2).get_state(), torch.Generator().manual_seed(3 * 100_003 + 2).get_state())


# --- tasks ----------------------------------------------------------------------------------------

def rows(x: torch.Tensor, y: torch.Tensor) -> list[bytes]:
    return sorted(xi.numpy().tobytes() + bytes([int(yi)]) for xi, yi in zip(x, y))


def test_digits_shards_are_disjoint_and_cover_the_training_set():
    task = sp.tasks.digits_task(3, 0.5, hidden=(8,))
    split = digits(seed=0)
    xs = torch.cat([x for x, _ in task.shards])
    ys = torch.cat([y for _, y in task.shards])
    assert len(xs) == len(split.x_train)
    assert rows(xs, ys) == rows(split.x_train, split.y_train)  # the same multiset of examples
    assert all(len(x) >= 8 for x, _ in task.shards)  # min_size
    assert torch.equal(task.test[0], split.x_test) and torch.equal(task.test[1], split.y_test)
    assert [p.shape[0] for p in task.build().parameters()][::2] == [8, 10]


def test_digits_shards_are_skewed_by_alpha():
    def top_share(alpha: float) -> float:
        task = sp.tasks.digits_task(4, alpha, hidden=(8,))
        return float(np.mean([torch.bincount(y, minlength=10).max() / len(y) for _, y in task.shards]))

    skewed, iid = top_share(0.1), top_share(100.0)
    assert skewed > 2 * iid and iid < 0.15  # ten classes: about 0.1 each when IID


def test_sequence_task_shapes():
    task = sp.tasks.sequence_task(3, 0.5, chains=2, vocab=16, seq_len=8, per_worker=20)
    assert len(task.shards) == 3
    for x, y in task.shards:
        assert x.shape == y.shape == (20, 8) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
        assert 0 <= int(x.min()) and int(x.max()) < 16
    xt, yt = task.test
    assert xt.shape == yt.shape == (2 * 128, 8)
    model = task.build()
    assert model(x).shape == (20, 8, 16)  # (B, T, vocab)
    res = run(task, sp.baselines.ddp(), TrainConfig(lr=0.05, momentum=0.9, batch_size=8, steps=30), eval_every=29)
    assert res.evals["test_loss"].iloc[-1] < res.evals["test_loss"].iloc[0] - 0.3


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"workers": 0}, r"workers must be an int >= 1, got 0"),
    ({"alpha": 0.0}, r"alpha=0.0"),
    ({"chains": 0}, r"chains must be an int >= 1, got 0"),
    ({"per_worker": 0}, r"per_worker must be an int >= 1, got 0"),
    ({"seq_len": 0}, r"seq_len must be an int >= 1, got 0"),
    ({"vocab": 1}, r"vocab=1"),
])
def test_sequence_task_rejects(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        sp.tasks.sequence_task(**{"workers": 2, **kwargs})


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"workers": 0}, r"workers must be an int >= 1, got 0"),
    ({"workers": True}, r"workers must be an int >= 1, got True"),
    ({"alpha": 0.0}, r"alpha=0.0"),
    ({"alpha": -1.0}, r"alpha=-1.0"),
])
def test_digits_task_rejects(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        sp.tasks.digits_task(**kwargs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labels=st.lists(st.integers(0, 4), min_size=20, max_size=200), n_parts=st.integers(1, 6),
       alpha=st.sampled_from([0.1, 0.5, 1.0, 100.0]), min_size=st.integers(0, 3), seed=st.integers(0, 3))
def test_dirichlet_split_is_a_partition(labels, n_parts, alpha, min_size, seed):
    y = torch.tensor(labels)
    try:
        parts = dirichlet_split(y, n_parts, alpha, seed=seed, min_size=min_size)
    except ValueError as e:
        assert "no draw gave" in str(e)  # the only refusal for valid arguments
        return
    assert len(parts) == n_parts
    assert all(p.dtype == torch.int64 and len(p) >= min_size for p in parts)
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(len(y)))  # disjoint, covering
    again = dirichlet_split(y, n_parts, alpha, seed=seed, min_size=min_size)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))


@pytest.mark.parametrize(("args", "pattern"), [
    ((4, 0, 1.0), r"dirichlet_split\(n_parts=0\): expected an int >= 1"),
    ((4, 2.0, 1.0), r"dirichlet_split\(n_parts=2.0\): expected an int >= 1"),
    ((4, 2, 0.0), r"dirichlet_split\(alpha=0.0\): expected > 0"),
    ((4, 2, math.nan), r"dirichlet_split\(alpha=nan\): expected > 0"),
    ((4, 2, 1.0, 0, -1), r"dirichlet_split\(min_size=-1\): expected 0 <= min_size <= 5"),
    ((4, 2, 1.0, 0, 6), r"dirichlet_split\(min_size=6\): expected 0 <= min_size <= 5 for 10 examples"),
    ((1, 5, 0.001, 0, 2), r"no draw gave all 5 parts >= 2 of 10 examples at alpha=0.001"),
])
def test_dirichlet_split_rejects(args, pattern):
    n, *rest = args
    labels = torch.tensor([0] * 10) if n == 1 else torch.arange(10) % n
    with pytest.raises(ValueError, match=pattern):
        dirichlet_split(labels, *rest)


# --- regression as a first-class task ------------------------------------------------------------

def test_regression_task_declares_only_the_loss():
    task = sp.tasks.regression_task(workers=3, alpha=0.2, per_worker=32, seed=1)
    assert task.metrics == ("loss",) and task.workers == 3
    x, y = task.shards[0]
    assert x.shape == (32, 8) and y.shape == (32,) and task.test[0].shape == (512, 8)
    res = run(task, sp.baselines.speculative(period=4), replace(TRAIN, steps=12), eval_every=4)
    assert res.evals["test_accuracy"].isna().all() and np.isfinite(res.evals["test_loss"]).all()
    # the test loss is the MSE of the averaged model, against an independent computation
    model = task.build()
    torch.nn.utils.vector_to_parameters(res.theta, model.parameters())
    with torch.no_grad():
        mse = torch.mean((model(task.test[0]).squeeze(1) - task.test[1]) ** 2)
    assert res.final_test_loss == pytest.approx(float(mse), rel=1e-5)
    assert sp.tasks.regression_task(seed=1).shards[0][1].tolist() != sp.tasks.regression_task(seed=2).shards[0][1].tolist()


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"alpha": 0.0}, r"regression_task\(alpha=0.0\): expected > 0"),
    ({"noise": -1.0}, r"regression_task\(noise=-1.0\): expected >= 0"),
    ({"features": 0}, r"regression_task: features must be an int >= 1, got 0"),
])
def test_regression_task_rejects(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        sp.tasks.regression_task(**kwargs)


def test_task_metrics_are_checked(small):
    with pytest.raises(ValueError, match=r"Task.metrics=\('accuracy',\)"):
        sp.Task("t", small.build, small.shards, small.test, metrics=("accuracy",))


def test_loss_at_bytes_interpolates_in_log_bytes(small):
    runs = [run(small, sp.baselines.local_sgd(p), replace(TRAIN, steps=16)) for p in (2, 8)]
    (b0, l0), (b1, l1) = sorted((r.bytes_per_worker()["total"], r.final_test_loss) for r in runs)
    mid = math.sqrt(b0 * b1)
    assert sp.loss_at_bytes(runs, mid) == pytest.approx((l0 + l1) / 2)
    assert sp.loss_at_bytes(runs, b0 / 10) == l0 and sp.loss_at_bytes(runs, b1 * 10) == l1
    with pytest.raises(ValueError, match="empty"):
        sp.loss_at_bytes([], 1.0)
    with pytest.raises(ValueError, match=r"nbytes=0"):
        sp.loss_at_bytes(runs, 0)
