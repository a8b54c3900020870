"""The data profiler: density, feature importance and clusters, computed on the data's device.

- density: k-nearest-neighbour log-density, ``-d * log(r_k)`` up to a constant (r_k the distance
  to the k-th neighbour), in chunks so memory stays O(chunk x n);
- feature importance: |standardised coefficient| of an ordinal (or binary) logistic fit, summing
  to 1 — per subset when given subsets;
- clusters: k-means (k-means++ seeding, Lloyd iterations), seeded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ordinal
from .checks import check_features as _check_x
from .checks import check_labels


def knn_log_density(x: torch.Tensor, k: int = 10, chunk: int = 2048) -> torch.Tensor:
    """(n,) log-density estimate from the distance to the k-th nearest neighbour."""
    x = _check_x(x).float()
    n, d = x.shape
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} points, got {k!r}")
    out = torch.empty(n, device=x.device)
    for a in range(0, n, chunk):
        dist = torch.cdist(x[a:a + chunk], x)
        rk = dist.topk(k + 1, dim=1, largest=False).values[:, -1]  # +1: the point itself
        out[a:a + chunk] = -d * torch.log(rk.clamp(min=1e-12))
    return out


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres (k, d), labels (n,)) by k-means++ seeding and Lloyd iterations."""
    x = _check_x(x).float()
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}], got {k!r}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    centres = x[torch.randint(n, (1,), generator=g)].clone()
    for _ in range(1, k):
        d2 = torch.cdist(x, centres).min(dim=1).values ** 2
        probs = (d2 / d2.sum()).cpu() if d2.sum() > 0 else torch.full((n,), 1 / n)
        centres = torch.cat([centres, x[torch.multinomial(probs, 1, generator=g)]])
    labels = torch.zeros(n, dtype=torch.long, device=x.device)
    for _ in range(iters):
        labels = torch.cdist(x, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).clamp(min=1).unsqueeze(1)
        new = torch.where(torch.bincount(labels, minlength=k).unsqueeze(1) > 0, sums / counts, centres)
        if torch.allclose(new, centres):
            break
        centres = new
    return centres, labels


def feature_importance(x: torch.Tensor, y: torch.Tensor, max_iter: int = 50, l2: float = 1e-3) -> torch.Tensor:
    """(d,) |coefficient x feature std| of an ordinal logistic fit, normalised to sum 1 (uniform
    when the subset has a single class)."""
    x = _check_x(x).double()
    levels = torch.unique(y)
    d = x.shape[1]
    if len(levels) < 2:
        return torch.full((d,), 1 / d, dtype=torch.float64, device=x.device)
    remap = torch.searchsorted(levels, y)  # a subset may miss some classes: fit on the ones it has
    std = x.std(dim=0).clamp(min=1e-12) if len(x) > 1 else torch.ones(d, dtype=torch.float64)
    fit = ordinal.fit((x - x.mean(0)) / std, remap, len(levels), l2=l2, max_iter=max_iter)
    imp = fit.coef.abs()
    return imp / imp.sum() if imp.sum() > 0 else torch.full((d,), 1 / d, dtype=torch.float64)


@dataclass(frozen=True)
class DataProfile:
    log_density: torch.Tensor  # (n,)
    importance: torch.Tensor  # (d,) for the whole data
    centres: torch.Tensor  # (clusters, d)
    clusters: torch.Tensor  # (n,)


def profile_data(x: torch.Tensor, y: torch.Tensor, clusters: int = 4, k: int = 10, seed: int = 0) -> DataProfile:
    """Density, importance and clusters of a data set (recompute as it changes).

    Raises:
        ValueError: bad features or labels (:mod:`~adaptive_kit.federated.checks`).
    """
    x = _check_x(x)
    y = check_labels(y, rows=len(x))[0].to(x.device)
    centres, labels = kmeans(x, clusters, seed=seed)
    density = knn_log_density(x, min(k, len(x) - 1)) if len(x) > 1 else torch.zeros(1, device=x.device)
    return DataProfile(density, feature_importance(x, y), centres, labels)
