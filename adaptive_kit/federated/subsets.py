"""The dynamic partitioning engine: recursive, density- and importance-driven splits of the data.

The granularity sets the number of parts P (1 at 0, the most ``min_size`` allows at 1). A node
that must hold t parts is cut in two along one of a few candidate directions — between 2-means
centres (three seeds), the two principal axes, the widest features — in features scaled by
importance, so important features drive the cuts. The cut is the one leaving the least share of
the variance along its direction within the two sides (1-d 2-means) among the cuts that give the two
sides whole numbers of parts, t_left + t_right = t, with no side above ``(1 + balance) x n / P``
rows per part nor below ``min_size``. So no part is larger than (1 + balance) times the mean
(kd-tree balance) while cuts fall in the gaps between clusters (k-means quality); with parts of
about equal counts, dense regions end up in more and smaller parts, i.e. are split more finely.
The tree of cuts routes new rows to their parts.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from .checks import check_features as _check_x
from .checks import check_labels
from .profile import DataProfile, kmeans, profile_data


@dataclass(frozen=True)
class DataPartition:
    labels: torch.Tensor  # (n,) part of each training row
    directions: torch.Tensor  # (internal nodes, d)
    thresholds: torch.Tensor  # (internal nodes,)
    children: list[tuple[int, int]]  # per internal node: (left, right); >= 0 internal, < 0 leaf -(part + 1)
    parts: int

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Route rows through the tree to their parts."""
        x = _check_x(x).float()
        node = torch.zeros(len(x), dtype=torch.long, device=x.device)
        out = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
        if not self.children:
            return torch.zeros(len(x), dtype=torch.long, device=x.device)
        left = torch.tensor([c[0] for c in self.children], device=x.device)
        right = torch.tensor([c[1] for c in self.children], device=x.device)
        active = torch.ones(len(x), dtype=torch.bool, device=x.device)
        while active.any():
            i = node[active]
            go_right = (x[active] * self.directions[i]).sum(1) > self.thresholds[i]
            nxt = torch.where(go_right, right[i], left[i])
            idx = active.nonzero()[:, 0]
            leaf = nxt < 0
            out[idx[leaf]] = -nxt[leaf] - 1
            node[idx[~leaf]] = nxt[~leaf]
            active[idx[leaf]] = False
        return out

    def sizes(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.parts)


def n_parts(n: int, granularity: float, min_size: int, max_parts: int = 64) -> int:
    """Parts for a granularity: 1 at 0, the most that ``min_size`` allows (up to ``max_parts``) at 1."""
    if isinstance(granularity, bool) or not isinstance(granularity, int | float) or not 0 <= granularity <= 1:
        raise ValueError(f"granularity must be in [0, 1] (0 coarsest, 1 finest), got {granularity!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or not 1 <= min_size <= n:
        raise ValueError(f"min_size must be an int in [1, {n}] (the number of rows), got {min_size!r}")
    most = max(1, min(max_parts, n // min_size))
    return 1 + round(granularity * (most - 1))


def _directions(z: torch.Tensor, seed: int, restarts: int = 3, axes: int = 8) -> torch.Tensor:
    """(k, d) unit candidate directions: 2-means centre to centre (``restarts`` seeds), the two
    principal axes and the ``axes`` features of widest spread."""
    out = []
    for r in range(restarts):
        centres, _ = kmeans(z, 2, iters=20, seed=seed + 7919 * r)
        out.append(centres[1] - centres[0])
    zc = z - z.mean(0)
    if len(z) > 1:
        out.extend(torch.linalg.svd(zc, full_matrices=False).Vh[:2])
    eye = torch.eye(z.shape[1], device=z.device)
    out.extend(eye[torch.argsort(zc.var(0) if len(z) > 1 else torch.zeros(z.shape[1]), descending=True)[:axes]])
    d = torch.stack(out)
    norm = d.norm(dim=1, keepdim=True)
    return d[norm[:, 0] > 0] / norm[norm[:, 0] > 0]


def _cut(z: torch.Tensor, t: int, cap: float, min_size: int, seed: int) -> tuple[torch.Tensor, float, int]:
    """(direction, threshold, parts on the left) for a node of ``t`` parts (module docstring);
    ``cap`` is the most rows a part may hold. Every candidate direction is scored by the share
    of its variance left within the two sides at its best feasible cut; the least wins."""
    dirs = _directions(z, seed)
    proj, _ = torch.sort(z @ dirs.T, dim=0)  # (n, k)
    n = len(proj)
    csum, csq = torch.cumsum(proj.double(), 0), torch.cumsum(proj.double() ** 2, 0)
    total = (csq[-1] - csum[-1] ** 2 / n).clamp(min=1e-12)
    best = (float("inf"), t // 2, round(n * (t // 2) / t), 0)  # equal counts if no cut is feasible
    for t_left in range(1, t):
        t_right = t - t_left
        lo = max(math.ceil(n - t_right * cap), t_left * min_size, 1)
        hi = min(math.floor(t_left * cap), n - t_right * min_size, n - 1)
        if hi < lo:
            continue
        m = torch.arange(lo, hi + 1, device=z.device)[:, None]
        within = (csq[m[:, 0] - 1] - csum[m[:, 0] - 1] ** 2 / m) + \
            ((csq[-1] - csq[m[:, 0] - 1]) - (csum[-1] - csum[m[:, 0] - 1]) ** 2 / (n - m))
        share = within / total  # (cuts, k)
        i = int(torch.argmin(share))
        if float(share.flatten()[i]) < best[0]:
            best = (float(share.flatten()[i]), t_left, int(m[i // share.shape[1], 0]), i % share.shape[1])
    _, t_left, cut, k = best
    return dirs[k], float(0.5 * (proj[cut - 1, k] + proj[cut, k])), t_left


def adaptive_partition(x: torch.Tensor, y: torch.Tensor, granularity: float, min_size: int, *,
                       max_parts: int = 64, balance: float = 0.1, profile: DataProfile | None = None,
                       seed: int = 0) -> DataPartition:
    """Split ``x`` recursively into the granularity's number of parts (see the module docstring).

    ``balance`` bounds the largest part at (1 + balance) x the mean part (ties in the projection
    aside); 0 gives equal counts.

    Raises:
        ValueError: granularity outside [0, 1], min_size < 1 or larger than the data, NaN features,
            labels that are not 0..J-1 with J >= 2 (strings, fractions, negatives, gaps, one class),
            balance outside [0, 0.5].
    """
    x = _check_x(x).float()
    n, d = x.shape
    y = check_labels(y, rows=n)[0]
    target = n_parts(n, granularity, min_size, max_parts)
    if not 0 <= balance <= 0.5:
        raise ValueError(f"balance must be in [0, 0.5], got {balance!r}")
    prof = profile or profile_data(x, y, clusters=min(4, n), k=min(10, n - 1) if n > 1 else 1, seed=seed)
    scale = torch.sqrt(prof.importance.float().to(x.device) * d)
    mean, std = (x.mean(0), x.std(0).clamp(min=1e-12)) if n > 1 else (torch.zeros(d), torch.ones(d))
    z = (x - mean) / std * scale
    cap = max(math.ceil(n / target), math.floor((1 + balance) * n / target))  # whole rows per part
    directions, thresholds, children = [], [], []
    labels = torch.zeros(n, dtype=torch.long, device=x.device)
    parts = 0

    def build(rows: torch.Tensor, t: int) -> int:
        """Child code of a node: >= 0 an internal node's index, < 0 a leaf -(part + 1)."""
        nonlocal parts
        if t == 1 or len(rows) < 2:
            labels[rows] = parts
            parts += 1
            return -parts
        direction, threshold, t_left = _cut(z[rows], t, cap, min_size, seed + len(children))
        right = (z[rows] @ direction) > threshold
        if right.all() or (~right).all():  # ties: the data cannot be cut here
            return build(rows, 1)
        internal = len(children)
        directions.append(direction)
        thresholds.append(threshold)
        children.append((0, 0))
        children[internal] = (build(rows[~right], t_left), build(rows[right], t - t_left))
        return internal

    build(torch.arange(n, device=x.device), target)
    # routing works in z-space: fold the standardisation into directions and thresholds
    dirs = torch.stack(directions) if directions else torch.zeros(0, d)
    w = dirs * scale / std
    t = torch.tensor(thresholds, dtype=torch.float32) + (w * mean).sum(1) if directions else torch.zeros(0)
    return DataPartition(labels, w, t, children, parts)


def largest_over_mean(labels: torch.Tensor, parts: int) -> float:
    """Rows in the largest part over the mean rows per part (1 = perfectly balanced)."""
    sizes = torch.bincount(labels, minlength=parts).double()
    return float(sizes.max() / sizes.mean())


def assign_resources(sizes: torch.Tensor | list[int], resources: int) -> list[list[int]]:
    """Parts per resource, balancing rows: largest part first to the least loaded resource."""
    sizes = [int(s) for s in sizes]
    if isinstance(resources, bool) or not isinstance(resources, int) or resources < 1:
        raise ValueError(f"resources must be an int >= 1, got {resources!r}")
    heap = [(0, r) for r in range(resources)]
    out: list[list[int]] = [[] for _ in range(resources)]
    for part in sorted(range(len(sizes)), key=lambda p: -sizes[p]):
        load, r = heapq.heappop(heap)
        out[r].append(part)
        heapq.heappush(heap, (load + sizes[part], r))
    return out


def choose_granularity(x: torch.Tensor, y: torch.Tensor, min_size: int, grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
                       *, max_parts: int = 64, holdout: float = 0.25, l2: float = 1e-3, seed: int = 0) -> tuple[float, dict[float, float]]:
    """The granularity whose partition's local ordinal models score best on held-out rows (the
    seed's "adjust the granularity on observed performance"); returns it and every score.

    Raises:
        ValueError: a grid value outside [0, 1], ``holdout`` outside (0, 1), or too few rows.
    """
    from . import ordinal

    x = _check_x(x).float()
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be in (0, 1), got {holdout!r}")
    classes = ordinal.check_ordinal(y)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    cut = int(len(x) * holdout)
    test, train = order[:cut], order[cut:]
    if cut < 1 or len(train) < min_size:
        raise ValueError(f"{len(x)} rows leave too few for a {holdout!r} holdout with min_size {min_size}")
    scores = {}
    for gran in grid:
        part = adaptive_partition(x[train], y[train], gran, min_size, max_parts=max_parts, seed=seed)
        scores[gran] = local_accuracy(x[train], y[train], part.labels, x[test], y[test], part.assign(x[test]), classes, l2)
    return max(scores, key=lambda k: (scores[k], -k)), scores


def local_accuracy(x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                   where: torch.Tensor, classes: int | None = None, l2: float = 1e-3) -> float:
    """Held-out accuracy of one ordinal model per part: fitted on the rows of ``x`` with that
    ``labels`` value, scored on the rows of ``x_test`` routed (``where``) to the part. A part with
    one class predicts it; a part without training rows uses one model of all rows."""
    from . import ordinal

    labels, where = torch.as_tensor(labels), torch.as_tensor(where)
    classes = classes or ordinal.check_ordinal(y)
    pred = torch.empty(len(y_test), dtype=torch.long)
    pooled = None
    for k in torch.unique(where).tolist():
        rows, held = labels == k, where == k
        levels = torch.unique(y[rows])
        if len(levels) == 1:
            pred[held] = levels[0]
            continue
        if not rows.any():
            pooled = pooled if pooled is not None else ordinal.fit(x.double(), y, classes, l2=l2, max_iter=100).params
            params = pooled
        else:
            params = ordinal.fit(x[rows].double(), y[rows], classes, l2=l2, max_iter=100).params
        pred[held] = ordinal.predict(params, x_test[held].double(), classes)
    return float((pred == y_test).double().mean())
