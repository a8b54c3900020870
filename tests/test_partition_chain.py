"""The chain partitioner against an exhaustive search over every split."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_kit.partition.chain import partition_chain, stage_times


def brute_force(cost, k, speeds, cut, bandwidth):
    n = len(cost)
    return min(stage_times(cost, (0, *cuts, n), speeds, cut, bandwidth).max()
               for cuts in itertools.combinations(range(1, n), k - 1))


@st.composite
def chains(draw):
    n = draw(st.integers(1, 8))
    k = draw(st.integers(1, n))
    pos = st.floats(0, 10, allow_nan=False)
    cost = draw(st.lists(pos, min_size=n, max_size=n))
    speeds = draw(st.lists(st.floats(0.25, 4), min_size=k, max_size=k))
    cut = draw(st.lists(pos, min_size=n, max_size=n))
    bandwidth = draw(st.sampled_from([0.5, 10.0, float("inf")]))
    return cost, k, speeds, cut, bandwidth


@settings(max_examples=300, deadline=None)
@given(chains())
def test_optimal_against_exhaustive_search(case):
    cost, k, speeds, cut, bandwidth = case
    plan = partition_chain(cost, k, speeds, cut, bandwidth)
    assert plan.bounds[0] == 0 and plan.bounds[-1] == len(cost) and len(plan.bounds) == k + 1
    assert all(a < b for a, b in zip(plan.bounds[:-1], plan.bounds[1:]))  # no empty stage
    best = brute_force(cost, k, speeds, cut, bandwidth)
    assert plan.bottleneck_s == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert plan.bottleneck_s == pytest.approx(max(plan.stage_s))


def test_known_answers():
    # equal devices: [3 | 1 1 1] beats any other split of 3,1,1,1 over two devices
    assert partition_chain([3, 1, 1, 1], 2).bounds == (0, 1, 4)
    # a device twice as fast takes twice the work
    plan = partition_chain([1] * 9, 2, speeds=[2, 1])
    assert plan.bounds == (0, 6, 9) and plan.bottleneck_s == pytest.approx(3.0)
    # a huge activation after node 0 moves the cut one node later
    plan = partition_chain([1, 1, 1, 1], 2, cut_bytes=[100, 0, 0, 0], bandwidth=1.0)
    assert plan.bounds == (0, 2, 4) and plan.bottleneck_s == pytest.approx(2.0)
    assert partition_chain([5.0], 1).stages == [range(0, 1)]


def test_heterogeneous_speed_lowers_the_bottleneck():
    cost = np.random.default_rng(0).random(200)
    same = partition_chain(cost, 4).bottleneck_s
    faster = partition_chain(cost, 4, speeds=[1, 1, 1, 2]).bottleneck_s
    assert faster < same and same >= cost.sum() / 4


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(cost=[], k=1), "cost must be a non-empty"),
    (dict(cost=[1, 2], k=3), "k=3 devices for a chain of 2 nodes"),
    (dict(cost=[1, 2], k=0), "k must be an int >= 1"),
    (dict(cost=[1, -2], k=1), "cost must be finite and >= 0"),
    (dict(cost=[1, float("nan")], k=1), "cost must be finite"),
    (dict(cost=[1, 2], k=2, speeds=[1, 0]), "speeds must be finite and > 0"),
    (dict(cost=[1, 2], k=2, speeds=[1]), "speeds must have one entry per device"),
    (dict(cost=[1, 2], k=2, cut_bytes=[1]), "cut_bytes must have one entry per node"),
    (dict(cost=[1, 2], k=2, bandwidth=0), "bandwidth must be > 0"),
])
def test_bad_input_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        partition_chain(**kwargs)
