"""Bundled and generated data sets: shapes, ranges, determinism, validation."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from adaptive_kit.datasets import (
    STATSMODELS_SETS,
    Split,
    digits,
    gaussian_mixture,
    markov_tokens,
    statsmodels_frame,
    train_test_split,
)


@pytest.fixture(scope="module")
def digits_split() -> Split:
    return digits()


def rows(t: torch.Tensor) -> set[tuple]:
    return {tuple(r) for r in t.tolist()}


# --- digits ----------------------------------------------------------------------------------

def test_digits_shapes_and_ranges(digits_split):
    s = digits_split
    assert len(s.x_train) + len(s.x_test) == 1797
    assert len(s.x_test) == round(1797 * 0.25) == 449
    assert s.x_train.shape == (1348, 64) and s.x_test.shape == (449, 64)
    assert s.y_train.shape == (1348,) and s.y_test.shape == (449,)
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert s.n_features == 64 and s.n_classes == 10
    x = torch.cat([s.x_train, s.x_test])
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    y = torch.cat([s.y_train, s.y_test])
    counts = torch.bincount(y, minlength=10)
    assert counts.sum() == 1797 and counts.min() >= 170  # about 180 of each digit
    # pixel values are the bundled 0..16 intensities divided by 16
    assert torch.equal(x * 16, (x * 16).round())


def test_digits_split_is_a_disjoint_partition(digits_split):
    s = digits_split
    from sklearn.datasets import load_digits

    bunch = load_digits()
    full = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    # every test row is one of the data set's rows, with its own label
    labelled = {tuple(r) + (int(t),) for r, t in zip(full.tolist(), bunch.target)}
    for x, y in ((s.x_train, s.y_train), (s.x_test, s.y_test)):
        assert {tuple(r) + (int(t),) for r, t in zip(x.tolist(), y.tolist())} <= labelled
    # the digits set holds one duplicated image pair at most; train and test share no example
    assert len(rows(s.x_train) & rows(s.x_test)) <= 1
    assert sorted(torch.cat([s.y_train, s.y_test]).tolist()) == sorted(bunch.target.tolist())


def test_digits_split_sizes_and_seed(digits_split):
    again = digits(seed=0)
    assert torch.equal(again.x_train, digits_split.x_train)
    assert torch.equal(again.y_test, digits_split.y_test)
    other = digits(seed=1)
    assert not torch.equal(other.y_test, digits_split.y_test)
    small = digits(test_fraction=0.1, seed=3)
    assert (len(small.x_train), len(small.x_test)) == (1797 - 180, 180)


def test_split_to_device_keeps_values(digits_split):
    moved = digits_split.to("cpu")
    assert isinstance(moved, Split)
    assert torch.equal(moved.x_test, digits_split.x_test)


# --- train_test_split ------------------------------------------------------------------------

def test_train_test_split_partitions_indices():
    x = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    y = torch.arange(20)
    s = train_test_split(x, y, test_fraction=0.3, seed=5)
    assert (len(s.x_train), len(s.x_test)) == (14, 6)
    ids = torch.cat([s.y_train, s.y_test])
    assert sorted(ids.tolist()) == list(range(20))
    assert torch.equal(s.x_train[:, 0], s.y_train.float() * 2)  # rows stay with their labels
    s2 = train_test_split(x, y, test_fraction=0.3, seed=5)
    assert torch.equal(s2.y_test, s.y_test)
    assert train_test_split(x, y, test_fraction=0.01).x_test.shape == (1, 2)  # never empty


def test_train_test_split_rejects_bad_input():
    x, y = torch.zeros(10, 3), torch.zeros(9)
    with pytest.raises(ValueError, match=r"train_test_split: len\(x\)=10 != len\(y\)=9"):
        train_test_split(x, y)
    for bad in (0.0, 1.0, -0.2, 1.5, math.nan):
        with pytest.raises(ValueError, match=rf"test_fraction must be a finite number in \(0, 1\), got {bad!r}"):
            train_test_split(torch.zeros(10, 3), torch.zeros(10), test_fraction=bad)
    with pytest.raises(ValueError, match=r"test_fraction must be a finite number in \(0, 1\), got 2"):
        digits(test_fraction=2)


# --- statsmodels -----------------------------------------------------------------------------

def test_statsmodels_frames():
    fair = statsmodels_frame("fair")
    assert isinstance(fair, pd.DataFrame)
    assert fair.shape == (6366, 9)
    assert "affairs" in fair.columns and "rate_marriage" in fair.columns
    assert set(fair["rate_marriage"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    randhie = statsmodels_frame("randhie")
    assert randhie.shape == (20190, 10)
    assert "mdvis" in randhie.columns
    # a copy: changing it does not change the next load
    fair.iloc[0, 0] = -1
    assert statsmodels_frame("fair").iloc[0, 0] != -1


def test_statsmodels_unknown_name():
    assert "fair" in STATSMODELS_SETS
    with pytest.raises(ValueError, match=r"statsmodels_frame\(name='iris'\): expected one of"):
        statsmodels_frame("iris")


# --- gaussian_mixture ------------------------------------------------------------------------

def test_gaussian_mixture_shapes_and_determinism():
    x, y, r = gaussian_mixture(600, n_features=3, n_regimes=5, n_classes=4, seed=7)
    assert x.shape == (600, 3) and x.dtype == torch.float32
    assert y.shape == (600,) and y.dtype == torch.int64
    assert r.shape == (600,) and r.dtype == torch.int64
    x2, y2, r2 = gaussian_mixture(600, n_features=3, n_regimes=5, n_classes=4, seed=7)
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(r, r2)
    x3, _, _ = gaussian_mixture(600, n_features=3, n_regimes=5, n_classes=4, seed=8)
    assert not torch.equal(x, x3)


@pytest.mark.parametrize(("n", "n_classes"), [(1000, 2), (999, 3), (600, 4)])
def test_gaussian_mixture_classes_are_balanced(n, n_classes):
    _, y, _ = gaussian_mixture(n, n_classes=n_classes, seed=1)
    counts = torch.bincount(y, minlength=n_classes)
    assert len(counts) == n_classes
    assert int(counts.max() - counts.min()) <= 1
    assert int(counts.sum()) == n


def test_gaussian_mixture_regimes():
    n, k = 4000, 4
    x, y, r = gaussian_mixture(n, n_regimes=k, separation=10.0, seed=2)
    counts = torch.bincount(r, minlength=k)
    assert len(counts) == k and int(counts.sum()) == n
    assert int(counts.min()) > 0.8 * n / k and int(counts.max()) < 1.2 * n / k
    # well separated: each point lies nearest its own regime's centre
    xs, rs = x.numpy(), r.numpy()
    centres = np.stack([xs[rs == j].mean(0) for j in range(k)])
    nearest = np.argmin(((xs[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    assert (nearest == rs).mean() > 0.97
    # not separated: the regimes overlap
    x0, _, r0 = gaussian_mixture(n, n_regimes=k, separation=0.0, seed=2)
    c0 = np.stack([x0.numpy()[r0.numpy() == j].mean(0) for j in range(k)])
    assert np.abs(c0).max() < 0.2
    # within a regime the spread is unit (the separation is in those units)
    np.testing.assert_allclose(xs[rs == 0].std(0), 1.0, atol=0.1)


def test_gaussian_mixture_regimes_need_their_own_rules():
    x, y, r = (t.numpy() for t in gaussian_mixture(2000, n_regimes=4, separation=3.0, seed=0))
    global_acc = LogisticRegression().fit(x, y).score(x, y)
    local_acc = np.mean([LogisticRegression().fit(x[r == j], y[r == j]).score(x[r == j], y[r == j])
                         for j in range(4)])
    assert local_acc > global_acc + 0.15


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"n": 0}, "n=0"),
        ({"n": True}, "n=True"),
        ({"n": 10.0}, "n=10.0"),
        ({"n": 10, "n_classes": 1}, "n_classes=1"),
        ({"n": 10, "n_features": 0}, "n_features=0"),
        ({"n": 10, "n_regimes": -2}, "n_regimes=-2"),
        ({"n": 10, "separation": -1}, "separation=-1"),
        ({"n": 10, "separation": math.nan}, "separation=nan"),
    ],
)
def test_gaussian_mixture_rejects_bad_args(kwargs, shown):
    with pytest.raises(ValueError, match=rf"gaussian_mixture\({shown}\)"):
        gaussian_mixture(**kwargs)


def test_gaussian_mixture_accepts_numpy_ints():
    x, _, _ = gaussian_mixture(np.int64(5), n_features=np.int32(2))
    assert x.shape == (5, 2)


# --- markov_tokens ---------------------------------------------------------------------------

def test_markov_tokens_shape_range_determinism():
    t = markov_tokens(8, 30, vocab=16, seed=3)
    assert t.shape == (8, 30) and t.dtype == torch.int64
    assert int(t.min()) >= 0 and int(t.max()) < 16
    assert torch.equal(t, markov_tokens(8, 30, vocab=16, seed=3))
    assert not torch.equal(t, markov_tokens(8, 30, vocab=16, seed=4))
    assert markov_tokens(1, 1, vocab=2).shape == (1, 1)


def test_markov_tokens_are_learnable():
    vocab = 64
    t = markov_tokens(200, 60, vocab=vocab, seed=0)
    prev, nxt = t[:, :-1].reshape(-1), t[:, 1:].reshape(-1)
    counts = torch.zeros(vocab, vocab).index_put_((prev, nxt), torch.ones(len(prev)), accumulate=True)
    p = counts / counts.sum(1, keepdim=True).clamp(min=1)
    h_row = -(p * torch.log(p.clamp(min=1e-12))).sum(1)
    cond_entropy = float((counts.sum(1) / counts.sum() * h_row).sum())
    unigram = torch.bincount(nxt, minlength=vocab).float() / len(nxt)
    uni_entropy = float(-(unigram * torch.log(unigram.clamp(min=1e-12))).sum())
    assert cond_entropy < 0.6 * math.log(vocab)  # the previous token tells a lot about the next
    assert uni_entropy > 0.8 * math.log(vocab)  # while tokens on their own are spread out
    assert cond_entropy < uni_entropy - 1.0


@pytest.mark.parametrize(
    ("args", "shown"),
    [((0, 5), "n_sequences=0"), ((3, 0), "seq_len=0"), ((3, 5, 1), "vocab=1"),
     ((True, 5), "n_sequences=True"), ((3, 5.0), "seq_len=5.0")],
)
def test_markov_tokens_rejects_bad_args(args, shown):
    with pytest.raises(ValueError, match=rf"markov_tokens\({shown}\): expected an int >= "):
        markov_tokens(*args)
