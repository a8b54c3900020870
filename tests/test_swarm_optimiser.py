"""The swarm optimiser's pure decisions: fitness from goals, step allocation (against the seed's
pseudocode), the diversity penalty and the exploit / breed plan."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_kit.swarm import (
    RANDOM_SEARCH,
    Action,
    Goals,
    OptimiserConfig,
    allocate,
    diversity_penalty,
    fitness,
    plan,
)

fits = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12)


def seed_rule(f, total, min_share):
    """The seed's pseudocode, written out: p = f / sum f, mixed with an equal floor of min_share,
    steps = p x total rounded by largest remainder."""
    f = np.asarray(f, float)
    n = f.size
    p = f / f.sum() if f.sum() > 0 else np.full(n, 1 / n)
    p = min_share / n + (1 - min_share) * p
    raw = p * total
    steps = [math.floor(r) for r in raw]
    order = sorted(range(n), key=lambda i: -(raw[i] - steps[i]))  # stable: ties to the lower index
    for i in order[: total - sum(steps)]:
        steps[i] += 1
    return np.array(steps)


# --- allocation ----------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(f=fits, total=st.integers(0, 500), data=st.data(),
       allocation=st.sampled_from(["proportional", "equal"]), temperature=st.sampled_from([0.25, 1.0, 3.0]),
       min_share=st.floats(0.0, 1.0))
def test_allocate_sums_exactly_and_gives_inactive_nothing(f, total, data, allocation, temperature, min_share):
    active = np.array(data.draw(st.lists(st.booleans(), min_size=len(f), max_size=len(f))))
    cfg = OptimiserConfig(allocation=allocation, temperature=temperature, min_share=min_share)
    steps = allocate(np.array(f), total, active, cfg)
    assert steps.dtype == np.int64 and steps.shape == (len(f),)
    assert (steps >= 0).all() and (steps[~active] == 0).all()
    assert steps.sum() == (total if active.any() else 0)
    if active.any() and min_share > 0:  # the floor: every active member keeps a share
        floor = math.floor(min_share * total / active.sum())
        assert (steps[active] >= floor).all()


@settings(max_examples=60, deadline=None)
@given(f=fits, total=st.integers(0, 500))
def test_equal_policy_is_equal_within_one(f, total):
    active = np.ones(len(f), bool)
    active[0] = len(f) == 1  # one inactive member when there are others
    steps = allocate(np.array(f), total, active, OptimiserConfig(allocation="equal"))
    s = steps[active]
    assert s.max() - s.min() <= 1 and s.sum() == total


@settings(max_examples=100, deadline=None)
@given(f=fits, total=st.integers(1, 500), min_share=st.floats(0.0, 1.0))
def test_temperature_one_is_the_seed_pseudocode(f, total, min_share):
    cfg = OptimiserConfig(temperature=1.0, min_share=min_share)
    steps = allocate(np.array(f), total, np.ones(len(f), bool), cfg)
    np.testing.assert_array_equal(steps, seed_rule(f, total, min_share))


def test_temperature_one_by_hand():
    # f = (1, 1, 2, 4) / 8, min_share 0.5, 64 steps: p = 0.5 / 4 + 0.5 f = (3, 3, 4, 6) / 16
    steps = allocate(np.array([0.125, 0.125, 0.25, 0.5]), 64, np.ones(4, bool),
                     OptimiserConfig(temperature=1.0, min_share=0.5))
    np.testing.assert_array_equal(steps, [12, 12, 16, 24])
    # equal thirds of 10: the remainder goes to the lowest index
    steps = allocate(np.ones(3), 10, np.ones(3, bool), OptimiserConfig(temperature=1.0, min_share=0.0))
    np.testing.assert_array_equal(steps, [4, 3, 3])
    # no floor: exactly proportional
    steps = allocate(np.array([1.0, 3.0]), 40, np.ones(2, bool), OptimiserConfig(temperature=1.0, min_share=0.0))
    np.testing.assert_array_equal(steps, [10, 30])
    # a lower temperature sharpens: p ∝ f ** 4
    steps = allocate(np.array([1.0, 2.0]), 170, np.ones(2, bool), OptimiserConfig(temperature=0.25, min_share=0.0))
    np.testing.assert_array_equal(steps, [10, 160])


@settings(max_examples=100, deadline=None)
@given(f=st.lists(st.integers(0, 20), min_size=1, max_size=12), total=st.integers(0, 500),
       temperature=st.sampled_from([0.25, 1.0]), min_share=st.floats(0.0, 0.99))
def test_allocate_is_monotone_in_fitness(f, total, temperature, min_share):
    # fitness on a grid of 0.05 (equal raw shares are tied by index, so fitness values that differ
    # by less than rounding are not a monotonicity case); min_share < 1 (1 is the equal policy)
    f = np.array(f) / 20
    steps = allocate(f, total, np.ones(f.size, bool), OptimiserConfig(temperature=temperature, min_share=min_share))
    for i in range(f.size):
        for j in range(f.size):
            if f[i] > f[j]:
                assert steps[i] >= steps[j]


def test_all_zero_or_nan_fitness_is_equal():
    for f in (np.zeros(5), np.full(5, np.nan)):
        steps = allocate(f, 52, np.ones(5, bool), OptimiserConfig())
        assert steps.max() - steps.min() <= 1 and steps.sum() == 52
    assert allocate(np.ones(3), 10, np.zeros(3, bool), OptimiserConfig()).tolist() == [0, 0, 0]
    assert allocate(np.ones(3), 0, np.ones(3, bool), OptimiserConfig()).tolist() == [0, 0, 0]


def test_fitter_members_get_more_steps_with_the_default_policy():
    steps = allocate(np.array([0.9, 0.5, 0.1, 0.7]), 80, np.ones(4, bool), OptimiserConfig())
    assert list(np.argsort(-steps)) == [0, 3, 1, 2]
    assert steps[2] >= math.floor(0.1 * 80 / 4)  # the floor


# --- fitness -------------------------------------------------------------------------------------

def test_fitness_accuracy_only_is_val_acc_and_nan_is_zero():
    acc = np.array([0.2, 0.9, np.nan, 0.5])
    f = fitness(Goals(), acc, np.array([1.0, 0.1, 2.0, np.nan]), np.ones(4), np.ones(4))
    np.testing.assert_allclose(f, [0.2, 0.9, 0.0, 0.5])
    f = fitness(Goals(accuracy=1, loss=1), acc, np.array([1.0, 0.1, 2.0, np.nan]), np.ones(4), np.ones(4))
    np.testing.assert_allclose(f, [(0.2 + math.exp(-1)) / 2, (0.9 + math.exp(-0.1)) / 2, 0.0, 0.0])


def test_fitness_efficiency_cheapest_is_one():
    cost = np.array([2.0, 1.0, 4.0, np.nan])
    f = fitness(Goals(accuracy=0, efficiency=1), np.full(4, 0.5), np.ones(4), cost, np.ones(4))
    np.testing.assert_allclose(f, [0.5, 1.0, 0.25, 1.0])  # unmeasured cost: no penalty


def test_fitness_generalisation_and_weighted_mean():
    acc, train = np.array([0.8, 0.8, 0.9]), np.array([0.9, 0.7, 1.0])
    f = fitness(Goals(accuracy=0, generalisation=1), acc, np.ones(3), np.ones(3), train)
    np.testing.assert_allclose(f, [0.9, 1.0, 0.9])
    f = fitness(Goals(accuracy=3, generalisation=1), acc, np.ones(3), np.ones(3), train)
    np.testing.assert_allclose(f, [(3 * 0.8 + 0.9) / 4, (3 * 0.8 + 1.0) / 4, (3 * 0.9 + 0.9) / 4])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(allow_nan=True), st.floats(allow_nan=True), st.floats(allow_nan=True),
                          st.floats(allow_nan=True)), min_size=1, max_size=6),
       st.tuples(*[st.floats(0, 5)] * 4).filter(lambda w: sum(w) > 0))
def test_fitness_is_always_in_unit_interval(rows, weights):
    a, lo, c, t = (np.array(col, float) for col in zip(*rows))
    f = fitness(Goals(*weights), a, lo, c, t)
    assert np.isfinite(f).all() and (f >= 0).all() and (f <= 1).all()


# --- diversity -----------------------------------------------------------------------------------

def test_diversity_penalty_leaves_the_best_and_penalises_a_clone():
    fit = np.array([0.9, 0.8, 0.6])
    sim = np.array([[1.0, 1.0, 0.3],
                    [1.0, 1.0, 0.5],
                    [0.3, 0.5, 1.0]])
    out = diversity_penalty(fit, sim, 0.1)
    assert out[0] == fit[0]  # the best: nothing fitter
    assert out[1] == pytest.approx(0.8 - 0.1 * 1.0)  # a clone of member 0
    assert out[2] == pytest.approx(0.6 - 0.1 * 0.5)  # the largest similarity to a fitter one
    np.testing.assert_array_equal(diversity_penalty(fit, sim, 0.0), fit)
    assert diversity_penalty(np.array([0.05, 0.9]), np.ones((2, 2)), 1.0).tolist() == [0.0, 0.9]  # never below 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=8), st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_diversity_penalty_never_raises_fitness_and_keeps_the_max(f, weight, seed):
    f = np.array(f)
    s = np.random.default_rng(seed).uniform(size=(f.size, f.size))
    s = (s + s.T) / 2
    np.fill_diagonal(s, 1.0)
    out = diversity_penalty(f, s, weight)
    assert (out <= f).all() and (out >= 0).all()
    assert out[np.argmax(f)] == f.max()


# --- plan ----------------------------------------------------------------------------------------

def test_plan_replaces_the_bottom_from_the_top():
    fit = np.array([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.6, 0.7])  # order: 1 4 7 6 2 3 5 0
    cfg = OptimiserConfig(truncation=0.25, breed_rate=0.0)
    actions = plan(fit, np.ones(8, bool), np.zeros(8, bool), cfg, np.random.default_rng(0))
    assert sorted(a.dst for a in actions) == [0, 5]
    assert all(a.kind == "exploit" and len(a.parents) == 1 and a.parents[0] in (1, 4) for a in actions)


def test_plan_refills_quarantined_members():
    fit = np.array([0.1, 0.9, 0.0, 0.3, 0.8, 0.2, 0.0, 0.7])
    active = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
    for refill in (True, False):
        cfg = OptimiserConfig(truncation=0.2, breed_rate=0.0, refill_quarantined=refill)
        actions = plan(fit, active, ~active, cfg, np.random.default_rng(1))
        dsts = [a.dst for a in actions]
        assert dsts == ([0, 2, 6] if refill else [0])  # k = round(0.2 x 6) = 1: the bottom active one
        assert all(a.parents[0] == 1 for a in actions)  # the top one
        assert not set(dsts) & {p for a in actions for p in a.parents}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=6, max_size=12), st.integers(0, 2**32 - 1))
def test_plan_breed_rate_one_breeds_with_two_distinct_top_parents(f, seed):
    f = np.array(f)
    cfg = OptimiserConfig(truncation=0.25, breed_rate=1.0)  # k = round(n / 4) >= 2 for n >= 6
    actions = plan(f, np.ones(f.size, bool), np.zeros(f.size, bool), cfg, np.random.default_rng(seed))
    k = round(0.25 * f.size)
    order = np.argsort(-f, kind="stable")
    top = set(order[:k].tolist())
    assert sorted(a.dst for a in actions) == sorted(order[-k:].tolist())
    assert len(actions) == k
    for a in actions:
        assert a.kind == "breed" and len(a.parents) == 2 and a.parents[0] != a.parents[1]
        assert set(a.parents) <= top


def test_plan_is_deterministic_for_a_seed():
    f = np.random.default_rng(3).uniform(size=16)
    active, q = np.ones(16, bool), np.zeros(16, bool)
    cfg = OptimiserConfig(breed_rate=0.5)
    a = plan(f, active, q, cfg, np.random.default_rng(7))
    assert a == plan(f, active, q, cfg, np.random.default_rng(7))
    assert all(isinstance(x, Action) for x in a)
    others = [plan(f, active, q, cfg, np.random.default_rng(s)) for s in range(8, 14)]
    assert any(o != a for o in others)
    assert {x.kind for x in a + sum(others, [])} == {"exploit", "breed"}


def test_plan_needs_two_active_members():
    assert plan(np.array([0.5, 0.4]), np.array([True, False]), np.zeros(2, bool), OptimiserConfig(),
                np.random.default_rng(0)) == []


@pytest.mark.parametrize("n", [3, 7])
def test_plan_never_replaces_a_member_with_itself(n):
    f = np.linspace(1.0, 0.1, n)
    cfg = OptimiserConfig(truncation=0.5, breed_rate=0.5)
    for seed in range(20):
        actions = plan(f, np.ones(n, bool), np.zeros(n, bool), cfg, np.random.default_rng(seed))
        dsts = {a.dst for a in actions}
        assert not dsts & {p for a in actions for p in a.parents}


def test_plan_refills_quarantined_even_with_one_active_member():
    active = np.array([True, False, False])
    actions = plan(np.array([0.5, 0.0, 0.0]), active, ~active, OptimiserConfig(), np.random.default_rng(0))
    assert sorted(a.dst for a in actions) == [1, 2]
    assert all(a.parents == (0,) for a in actions)


# --- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"allocation": "greedy"}, "allocation='greedy'"),
    ({"perturb": "walk"}, "perturb='walk'"),
    ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
    ({"temperature": float("nan")}, "temperature must be > 0, got nan"),
    ({"min_share": 1.5}, "min_share must be in [0, 1], got 1.5"),
    ({"mutation_rate": -0.1}, "mutation_rate must be in [0, 1], got -0.1"),
    ({"resample": 2}, "resample must be in [0, 1], got 2"),
    ({"breed_rate": 1.1}, "breed_rate must be in [0, 1], got 1.1"),
    ({"arch_mutation": -1}, "arch_mutation must be in [0, 1], got -1"),
    ({"truncation": 0.0}, "truncation must be in (0, 0.5], got 0.0"),
    ({"truncation": 0.6}, "truncation must be in (0, 0.5], got 0.6"),
    ({"exploit_every": -1}, "exploit_every must be an int >= 0, got -1"),
    ({"exploit_every": 1.5}, "exploit_every must be an int >= 0, got 1.5"),
    ({"warmup_rounds": True}, "warmup_rounds must be an int >= 0, got True"),
    ({"diversity": -0.1}, "diversity must be >= 0, got -0.1"),
])
def test_invalid_optimiser_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError) as e:
        OptimiserConfig(**kwargs)
    assert "OptimiserConfig." + field in str(e.value)


@pytest.mark.parametrize("kwargs", [{"accuracy": -1.0}, {"accuracy": 0.0}, {"loss": "1"}, {"efficiency": float("nan")}])
def test_invalid_goals_raise(kwargs):
    with pytest.raises(ValueError, match="Goals"):
        Goals(**kwargs)


def test_random_search_twin_is_equal_allocation_without_exploit():
    assert RANDOM_SEARCH.allocation == "equal" and RANDOM_SEARCH.exploit_every == 0
