"""Data the kit ships or generates: bundled pip-package data sets and seeded synthetic ones.

Nothing here downloads: scikit-learn's digits and statsmodels' data sets come inside those
packages, and the generators are deterministic functions of their seed.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .checks import check_number

STATSMODELS_SETS = ("fair", "randhie", "anes96", "spector", "scotland", "stackloss", "longley")


@dataclass(frozen=True)
class Split:
    """Train and test tensors of one data set."""

    x_train: torch.Tensor  # (N_train, D) float32
    y_train: torch.Tensor  # (N_train,) int64 labels or float32 targets
    x_test: torch.Tensor  # (N_test, D)
    y_test: torch.Tensor  # (N_test,)

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_test]).max()) + 1

    def to(self, device: torch.device | str) -> Split:
        return Split(*(t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test)))


def _check_fraction(test_fraction: float) -> None:
    check_number("test_fraction", test_fraction, 0.0, 1.0, open_low=True, open_high=True)


def train_test_split(x: torch.Tensor, y: torch.Tensor, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """A seeded random split of ``x`` and ``y`` (same first dimension).

    Raises:
        ValueError: the lengths differ or ``test_fraction`` is outside (0, 1).
    """
    _check_fraction(test_fraction)
    if len(x) != len(y):
        raise ValueError(f"train_test_split: len(x)={len(x)} != len(y)={len(y)}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = max(1, round(len(x) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return Split(x[train], y[train], x[test], y[test])


def digits(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's bundled 8x8 handwritten digits: 1797 images, 64 features in [0, 1], 10 classes."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return train_test_split(x, y, test_fraction, seed)


def statsmodels_frame(name: str) -> pd.DataFrame:
    """One of statsmodels' bundled data sets as a DataFrame (``fair``, ``randhie``, ...).

    Raises:
        ValueError: ``name`` is not one of :data:`STATSMODELS_SETS`.
    """
    if name not in STATSMODELS_SETS:
        raise ValueError(f"statsmodels_frame(name={name!r}): expected one of {STATSMODELS_SETS}")
    import importlib

    module = importlib.import_module(f"statsmodels.datasets.{name}")
    return module.load_pandas().data.copy()


def gaussian_mixture(
    n: int, n_features: int = 2, n_regimes: int = 4, separation: float = 3.0,
    n_classes: int = 2, seed: int = 0, regime_weights: Sequence[float] | None = None,
    noise: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A mixture of Gaussian regimes, each with its own linear labelling rule.

    Heterogeneity is controlled by ``separation`` (distance between regime centres, in units
    of the within-regime standard deviation); each regime draws its own weight vector, so a
    single global linear model cannot fit all regimes. ``regime_weights`` (default equal) sets the
    regimes' shares, and ``noise`` the scale of the logistic label noise. The centres and rules
    depend on ``seed`` only, so two calls with the same seed and different ``regime_weights``
    draw the same regimes in other proportions (a covariate drift).

    Returns:
        ``x`` (n, n_features) float32, ``y`` (n,) int64 class in [0, n_classes), and
        ``regime`` (n,) int64 in [0, n_regimes).

    Raises:
        ValueError: a size is < 1 (or ``n_classes`` < 2), ``separation`` or ``noise`` is negative, or
            ``regime_weights`` is not ``n_regimes`` non-negative numbers with a positive sum.
    """
    for name, v, lo in (("n", n, 1), ("n_features", n_features, 1), ("n_regimes", n_regimes, 1),
                        ("n_classes", n_classes, 2)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"gaussian_mixture({name}={v!r}): expected an int >= {lo}")
    if not separation >= 0:
        raise ValueError(f"gaussian_mixture(separation={separation!r}): expected >= 0")
    if not noise >= 0:
        raise ValueError(f"gaussian_mixture(noise={noise!r}): expected >= 0")
    share = np.full(n_regimes, 1 / n_regimes) if regime_weights is None else np.asarray(regime_weights, float)
    if share.shape != (n_regimes,) or not np.all(share >= 0) or not share.sum() > 0:
        raise ValueError(f"gaussian_mixture(regime_weights={regime_weights!r}): expected {n_regimes} "
                         "non-negative numbers with a positive sum")
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_regimes, n_features)) * separation
    weights = rng.normal(size=(n_regimes, n_features))
    regime = rng.choice(n_regimes, size=n, p=share / share.sum())
    x = centres[regime] + rng.normal(size=(n, n_features))
    score = np.einsum("nd,nd->n", x - centres[regime], weights[regime]) + noise * rng.logistic(size=n)
    cuts = np.quantile(score, np.linspace(0, 1, n_classes + 1)[1:-1])  # balanced ordinal classes
    y = np.searchsorted(cuts, score)
    return (torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64),
            torch.tensor(regime, dtype=torch.int64))


def markov_tokens(n_sequences: int, seq_len: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    """Token sequences from a seeded sparse Markov chain: learnable, language-model-like data.

    Returns:
        (n_sequences, seq_len) int64 tokens in [0, vocab).

    Raises:
        ValueError: a size is < 1 (``vocab`` < 2).
    """
    for name, v, lo in (("n_sequences", n_sequences, 1), ("seq_len", seq_len, 1), ("vocab", vocab, 2)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"markov_tokens({name}={v!r}): expected an int >= {lo}")
    g = torch.Generator().manual_seed(seed)
    # each token has a few likely successors: a sparse, peaked transition matrix
    logits = torch.randn(vocab, vocab, generator=g) * 3.0
    probs = torch.softmax(logits, dim=1)
    out = torch.empty(n_sequences, seq_len, dtype=torch.int64)
    out[:, 0] = torch.randint(0, vocab, (n_sequences,), generator=g)
    for t in range(1, seq_len):
        out[:, t] = torch.multinomial(probs[out[:, t - 1]], 1, generator=g).squeeze(1)
    return out


def dirichlet_split(labels: torch.Tensor, n_parts: int, alpha: float, seed: int = 0,
                    min_size: int = 1) -> list[torch.Tensor]:
    """Non-IID shards: each class is spread over ``n_parts`` by proportions drawn from Dir(alpha).

    Small ``alpha`` (0.1) gives each part a few dominant classes; large ``alpha`` (100) is close to
    an IID split. Draws are repeated (seeded) until every part has ``min_size`` examples.

    Returns:
        ``n_parts`` int64 index tensors into ``labels``, disjoint and covering every example.

    Raises:
        ValueError: ``n_parts`` < 1, ``alpha`` <= 0, ``min_size`` < 0, or no draw in 1000 gives every
            part ``min_size`` examples (the message says how many examples there are).
    """
    if isinstance(n_parts, bool) or not isinstance(n_parts, (int, np.integer)) or n_parts < 1:
        raise ValueError(f"dirichlet_split(n_parts={n_parts!r}): expected an int >= 1")
    if not alpha > 0:
        raise ValueError(f"dirichlet_split(alpha={alpha!r}): expected > 0")
    if min_size < 0 or min_size * n_parts > len(labels):
        raise ValueError(f"dirichlet_split(min_size={min_size!r}): expected 0 <= min_size <= "
                         f"{len(labels) // n_parts} for {len(labels)} examples in {n_parts} parts")
    y = np.asarray(labels.cpu())
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
        for idx in by_class:
            cuts = (np.cumsum(rng.dirichlet(np.full(n_parts, alpha)))[:-1] * len(idx)).astype(int)
            for p, chunk in enumerate(np.split(idx, cuts)):
                parts[p].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return [torch.as_tensor(p, dtype=torch.int64) for p in out]
    raise ValueError(f"dirichlet_split: no draw gave all {n_parts} parts >= {min_size} of "
                     f"{len(y)} examples at alpha={alpha}; raise alpha or lower min_size")
