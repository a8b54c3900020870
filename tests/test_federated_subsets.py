"""The data profiler and the dynamic partitioning engine: oracles, bounds and nesting."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial import cKDTree

from adaptive_kit.federated import data, ordinal
from adaptive_kit.federated.profile import feature_importance, kmeans, knn_log_density, profile_data
from adaptive_kit.federated.subsets import (
    adaptive_partition,
    assign_resources,
    choose_granularity,
    n_parts,
)


def blobs(centres, per, scale=0.3, seed=0):
    """Gaussian blobs of ``per`` rows around each centre, and each row's blob."""
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(centres, dtype=torch.float32)
    which = torch.arange(len(c)).repeat_interleave(per)
    return c[which] + scale * torch.randn(len(which), c.shape[1], generator=g), which


# --- profile ---------------------------------------------------------------------------------

def test_knn_log_density_matches_a_kd_tree_and_ignores_the_chunk_size():
    x, _ = blobs([[0, 0, 0], [5, 5, 5]], 150, scale=1.0)
    k = 7
    r_k = cKDTree(x.numpy()).query(x.numpy(), k=k + 1)[0][:, -1]  # +1: the point itself
    ours = knn_log_density(x, k=k)
    np.testing.assert_allclose(ours.numpy(), -3 * np.log(r_k), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(knn_log_density(x, k=k, chunk=13), ours, atol=1e-4, rtol=1e-4)


def test_knn_log_density_is_higher_in_a_dense_blob_than_a_sparse_one():
    dense, _ = blobs([[0, 0]], 200, scale=0.1, seed=1)
    sparse, _ = blobs([[20, 20]], 200, scale=2.0, seed=2)
    dens = knn_log_density(torch.cat([dense, sparse]), k=10)
    # a 20x smaller scale in 2-d is 400x the density, log 400 ~ 6: the blobs do not overlap
    assert dens[:200].min() > dens[200:].max()
    assert float(dens[:200].mean() - dens[200:].mean()) == pytest.approx(2 * math.log(20), abs=1.0)


@pytest.mark.parametrize("k", [0, 5, -1])
def test_knn_log_density_rejects_k_outside_1_to_n_minus_1(k):
    with pytest.raises(ValueError, match=f"k must be in \\[1, 4\\] for 5 points, got {k}"):
        knn_log_density(torch.randn(5, 2), k=k)


def test_kmeans_recovers_well_separated_blobs():
    truth_centres = [[0, 0], [10, 0], [0, 10]]
    x, truth = blobs(truth_centres, 100)
    centres, labels = kmeans(x, 3, seed=0)
    # a bijection between clusters and blobs: each cluster holds exactly one blob
    table = torch.zeros(3, 3, dtype=torch.long)
    table.index_put_((labels, truth), torch.ones_like(labels), accumulate=True)
    assert sorted(table.max(dim=1).values.tolist()) == [100, 100, 100]
    assert (table > 0).sum().item() == 3
    for k in range(3):  # the centres are the blob means
        blob = int(table[k].argmax())
        torch.testing.assert_close(centres[k], x[truth == blob].mean(0), atol=1e-5, rtol=0)


def test_kmeans_is_seeded_and_deterministic():
    x, _ = blobs([[0, 0], [3, 0], [0, 3], [3, 3]], 40, scale=1.0)
    a, b = kmeans(x, 4, seed=3), kmeans(x, 4, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (4, 2) and a[1].shape == (160,)


@pytest.mark.parametrize("k", [0, 11, 2.0, True, -1])
def test_kmeans_rejects_bad_k(k):
    with pytest.raises(ValueError, match=f"k must be an int in \\[1, 10\\], got {k!r}"):
        kmeans(torch.randn(10, 2), k)


def test_kmeans_names_the_first_non_finite_value():
    x = torch.randn(6, 3)
    x[4, 2] = float("inf")
    with pytest.raises(ValueError, match="row 4, column 2"):
        kmeans(x, 2)


def test_feature_importance_sums_to_one_and_finds_the_informative_feature():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 4, generator=g)
    y = torch.bucketize(3 * x[:, 2] + 0.3 * torch.randn(600, generator=g), torch.tensor([-1.0, 1.0]))
    imp = feature_importance(x, y)
    assert imp.shape == (4,)
    assert float(imp.sum()) == pytest.approx(1.0, abs=1e-12)
    assert (imp >= 0).all()
    assert int(imp.argmax()) == 2 and imp[2] > 0.8


def test_feature_importance_is_scale_free():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 3, generator=g)
    y = (x[:, 0] - x[:, 1] > 0.2 * torch.randn(400, generator=g)).long()
    scaled = x * torch.tensor([100.0, 0.01, 1.0])  # |coef x std| does not see units
    torch.testing.assert_close(feature_importance(scaled, y), feature_importance(x, y), atol=1e-4, rtol=0)


def test_feature_importance_is_uniform_for_a_single_class_subset():
    imp = feature_importance(torch.randn(30, 5), torch.full((30,), 2))
    torch.testing.assert_close(imp, torch.full((5,), 0.2, dtype=torch.float64))


def test_feature_importance_fits_a_subset_that_misses_classes():
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(2))
    y = torch.where(x[:, 1] > 0, 3, 0)  # classes 0 and 3 only: a part of a 4-class problem
    imp = feature_importance(x, y)
    assert float(imp.sum()) == pytest.approx(1.0) and imp[1] > 0.9


def test_profile_data_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="y has 9 rows, x has 10"):
        profile_data(torch.randn(10, 2), torch.zeros(9, dtype=torch.long))


# --- n_parts ---------------------------------------------------------------------------------

def test_n_parts_ends():
    assert n_parts(1000, 0.0, 100) == 1
    assert n_parts(1000, 1.0, 100) == 10  # the most that min_size allows
    assert n_parts(1000, 1.0, 1) == 64  # ... up to max_parts
    assert n_parts(1000, 1.0, 1, max_parts=5) == 5
    assert n_parts(1000, 0.5, 100) == 1 + round(0.5 * 9)
    assert n_parts(50, 1.0, 50) == 1


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), data_=st.data())
def test_n_parts_is_monotone_in_granularity_and_respects_min_size(n, data_):
    min_size = data_.draw(st.integers(1, n))
    g1, g2 = sorted(data_.draw(st.lists(st.floats(0, 1), min_size=2, max_size=2)))
    p1, p2 = n_parts(n, g1, min_size), n_parts(n, g2, min_size)
    assert 1 <= p1 <= p2 <= min(64, max(1, n // min_size))
    assert p2 * min_size <= n or p2 == 1


@pytest.mark.parametrize("granularity", [-0.1, 1.5, float("nan")])
def test_n_parts_rejects_granularity_outside_0_1_naming_it(granularity):
    with pytest.raises(ValueError, match=f"granularity must be in \\[0, 1\\].*got {granularity!r}"):
        n_parts(100, granularity, 10)


@pytest.mark.parametrize("min_size", [0, -3, 101, True, 2.5])
def test_n_parts_rejects_bad_min_size_naming_it(min_size):
    with pytest.raises(ValueError, match=f"min_size must be an int in \\[1, 100\\].*got {min_size!r}"):
        n_parts(100, 0.5, min_size)


# --- adaptive_partition ----------------------------------------------------------------------

def check_partition(part, n, granularity, min_size, balance, max_parts=64):
    sizes = part.sizes()
    assert part.labels.shape == (n,)
    assert part.parts == n_parts(n, granularity, min_size, max_parts)
    assert sorted(torch.unique(part.labels).tolist()) == list(range(part.parts))  # no empty part
    assert int(sizes.sum()) == n
    assert int(sizes.min()) >= min_size
    assert int(sizes.max()) <= (1 + balance) * n / part.parts + 1  # +1: a row on a tie
    assert len(part.children) == part.parts - 1  # a binary tree


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 240), d=st.integers(1, 4), granularity=st.floats(0, 1),
       data_=st.data(), seed=st.integers(0, 2**16))
def test_adaptive_partition_invariants_on_random_data(n, d, granularity, data_, seed):
    min_size = data_.draw(st.integers(1, max(1, n // 3)), label="min_size")
    balance = data_.draw(st.sampled_from([0.0, 0.1, 0.5]), label="balance")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.rand(d, generator=g) * 3
    y = torch.arange(n) % 3 if n >= 3 else torch.tensor([0, 1])
    part = adaptive_partition(x, y, granularity, min_size, balance=balance, seed=seed)
    check_partition(part, n, granularity, min_size, balance)
    assert torch.equal(part.assign(x), part.labels)  # the tree routes training rows home


def test_adaptive_partition_is_one_part_at_granularity_0():
    x, _ = blobs([[0, 0], [9, 9]], 50)
    part = adaptive_partition(x, torch.arange(100) % 2, 0.0, 10)
    assert part.parts == 1 and torch.equal(part.labels, torch.zeros(100, dtype=torch.long))
    assert torch.equal(part.assign(torch.randn(7, 2)), torch.zeros(7, dtype=torch.long))


def test_adaptive_partition_of_two_rows_at_min_size_1():
    # n_parts accepts min_size = 1; the profiler must not ask for more neighbours than there are
    part = adaptive_partition(torch.tensor([[0.0, 0.0], [5.0, 5.0]]), torch.tensor([0, 1]), 1.0, 1)
    assert part.parts == 2 and sorted(part.labels.tolist()) == [0, 1]


@pytest.fixture(scope="module")
def regimes():
    d, regime = data.mixture(n=2000, regimes=4, separation=8.0, seed=0)
    return d, regime


@pytest.mark.parametrize("balance", [0.1, 0.5])
def test_parts_nest_inside_regimes_of_a_well_separated_mixture(regimes, balance):
    d, regime = regimes
    part = adaptive_partition(d.x, d.y, 1.0, 100, max_parts=16, balance=balance)
    check_partition(part, len(d.y), 1.0, 100, balance, max_parts=16)
    assert part.parts == 16
    table = torch.zeros(part.parts, 4, dtype=torch.long)
    table.index_put_((part.labels, regime), torch.ones_like(regime), accumulate=True)
    purity = table.max(dim=1).values / table.sum(dim=1)
    assert purity.min() >= 0.95, purity
    # every regime is covered, the big one by more parts: parts follow the data's mass
    owner = table.argmax(dim=1)
    counts = torch.bincount(owner, minlength=4)
    assert (counts >= 1).all() and int(counts.argmax()) == int(torch.bincount(regime).argmax())
    assert torch.equal(part.assign(d.x), part.labels)


def test_assign_routes_new_rows_like_their_regime(regimes):
    d, regime = regimes
    part = adaptive_partition(d.x, d.y, 1.0, 100, max_parts=16)
    # the same seed draws the same regimes: a new row goes to a part its regime owns
    new, new_regime = data.mixture(n=3000, regimes=4, separation=8.0, seed=0)
    owner = torch.zeros(part.parts, 4, dtype=torch.long).index_put_(
        (part.labels, regime), torch.ones_like(regime), accumulate=True).argmax(dim=1)
    routed = part.assign(new.x)
    assert (owner[routed] == new_regime).double().mean() >= 0.95


def test_adaptive_partition_names_nan_features():
    x = torch.randn(20, 3)
    x[7, 1] = float("nan")
    with pytest.raises(ValueError, match="row 7, column 1"):
        adaptive_partition(x, torch.arange(20) % 2, 0.5, 2)


@pytest.mark.parametrize("balance", [-0.01, 0.6, float("nan")])
def test_adaptive_partition_rejects_balance_outside_0_to_half(balance):
    with pytest.raises(ValueError, match=f"balance must be in \\[0, 0.5\\], got {balance!r}"):
        adaptive_partition(torch.randn(20, 2), torch.arange(20) % 2, 0.5, 2, balance=balance)


@pytest.mark.parametrize("kwargs, message", [
    ({"granularity": 2.0, "min_size": 2}, "granularity must be in"),
    ({"granularity": 0.5, "min_size": 0}, "min_size must be an int in \\[1, 20\\]"),
    ({"granularity": 0.5, "min_size": 21}, "min_size must be an int in \\[1, 20\\]"),
])
def test_adaptive_partition_rejects_bad_granularity_and_min_size(kwargs, message):
    with pytest.raises(ValueError, match=message):
        adaptive_partition(torch.randn(20, 2), torch.arange(20) % 2, **kwargs)


# --- choose_granularity ----------------------------------------------------------------------

def test_choose_granularity_splits_regimes_with_their_own_rules():
    d, _ = data.mixture(n=400, regimes=4, classes=2, separation=4.0, seed=0)
    best, scores = choose_granularity(d.x, d.y, 60, grid=(0.0, 0.5, 1.0), max_parts=4)
    assert list(scores) == [0.0, 0.5, 1.0] and all(0 <= v <= 1 for v in scores.values())
    assert best > 0 and scores[best] == max(scores.values()) and scores[best] > scores[0.0] + 0.1
    # granularity 0 is one model fitted on the train rows, scored on the held-out quarter
    order = torch.randperm(400, generator=torch.Generator().manual_seed(0))
    test, train = order[:100], order[100:]
    fit = ordinal.fit(d.x[train].double(), d.y[train], 2, l2=1e-3, max_iter=100)
    right = (ordinal.predict(fit.params, d.x[test].double(), 2) == d.y[test]).double().mean()
    assert scores[0.0] == pytest.approx(float(right))


def test_choose_granularity_keeps_one_model_for_one_rule():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=g)
    y = (x[:, 0] + 0.3 * torch.randn(400, generator=g) > 0).long()
    best, scores = choose_granularity(x, y, 60, grid=(1.0, 0.0), max_parts=4)
    assert best == 0.0 and scores[0.0] >= scores[1.0]  # ties go to the coarser granularity


@pytest.mark.parametrize("kwargs, message", [
    ({"holdout": 0.0}, "holdout must be in \\(0, 1\\), got 0.0"),
    ({"holdout": 1.0}, "holdout must be in \\(0, 1\\), got 1.0"),
    ({"min_size": 50}, "60 rows leave too few for a 0.25 holdout with min_size 50"),
    ({"grid": (0.0, 1.5)}, "granularity must be in \\[0, 1\\]"),
])
def test_choose_granularity_rejects_bad_arguments(kwargs, message):
    args = {"min_size": 10} | kwargs
    with pytest.raises(ValueError, match=message):
        choose_granularity(torch.randn(60, 2), torch.arange(60) % 2, **args)


# --- assign_resources ------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 1000), min_size=0, max_size=30), resources=st.integers(1, 8))
def test_assign_resources_balances_within_the_lpt_bound(sizes, resources):
    out = assign_resources(sizes, resources)
    assert len(out) == resources
    assert sorted(p for r in out for p in r) == list(range(len(sizes)))  # every part exactly once
    loads = [sum(sizes[p] for p in r) for r in out]
    if sizes:
        # greedy list scheduling: the last part placed on the fullest resource found it least loaded
        assert max(loads) <= sum(sizes) / resources + max(sizes)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=7), resources=st.integers(2, 3))
def test_assign_resources_is_within_grahams_lpt_factor_of_the_best(sizes, resources):
    out = assign_resources(sizes, resources)
    makespan = max(sum(sizes[p] for p in r) for r in out)
    # exhaustive optimum over every assignment of parts to resources
    every = np.array(np.meshgrid(*[range(resources)] * len(sizes), indexing="ij")).reshape(len(sizes), -1).T
    loads = np.stack([((every == r) * np.asarray(sizes)).sum(1) for r in range(resources)], axis=1)
    best = loads.max(1).min()
    assert best <= makespan <= (4 / 3 - 1 / (3 * resources)) * best + 1e-9


def test_assign_resources_on_a_known_case():
    # largest first to the least loaded: 7 -> r0, 5 -> r1, 4 -> r1, 3 -> r0, 1 -> r1
    out = assign_resources([3, 7, 1, 5, 4], 2)
    assert out == [[1, 0], [3, 4, 2]]
    assert assign_resources(torch.tensor([2, 2]), 3) == [[0], [1], []]


@pytest.mark.parametrize("resources", [0, -1, 1.5, True, "2"])
def test_assign_resources_rejects_bad_resources(resources):
    with pytest.raises(ValueError, match=f"resources must be an int >= 1, got {resources!r}"):
        assign_resources([1, 2, 3], resources)
