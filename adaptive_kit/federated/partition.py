"""The dynamic partitioning engine: recursive, density- and importance-driven splits of the data.

The leaf with the highest priority — size x relative density x importance-weighted spread, so
dense, heterogeneous regions split first — is split in two until the granularity's number of
parts is reached or no leaf has 2 x ``min_size`` rows. A split runs 2-means on the
importance-scaled features, projects the rows on the line between the two centres and cuts
at the 1-d 2-means threshold, clipped to the quantiles 0.5 +- ``balance``: the cluster's
direction (k-means quality) at near-median balance (kd-tree balance). The tree routes new rows.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from .profile import DataProfile, _check_x, kmeans, profile_data


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
    if not 0 <= granularity <= 1:
        raise ValueError(f"granularity must be in [0, 1] (0 coarsest, 1 finest), got {granularity!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or not 1 <= min_size <= n:
        raise ValueError(f"min_size must be an int in [1, {n}] (the number of rows), got {min_size!r}")
    most = max(1, min(max_parts, n // min_size))
    return 1 + round(granularity * (most - 1))


def _split(z: torch.Tensor, balance: float, seed: int) -> tuple[torch.Tensor, float]:
    centres, _ = kmeans(z, 2, iters=20, seed=seed)
    direction = centres[1] - centres[0]
    if direction.norm() == 0:
        direction = torch.zeros_like(direction)
        direction[0] = 1.0
    direction = direction / direction.norm()
    proj, _ = torch.sort(z @ direction)
    n = len(proj)
    lo, hi = max(1, int((0.5 - balance) * n)), min(n - 1, int(round((0.5 + balance) * n)))
    cut = lo
    if hi > lo:  # 1-d 2-means: the cut minimising the within sum of squares
        csum, csq = torch.cumsum(proj, 0), torch.cumsum(proj ** 2, 0)
        m = torch.arange(lo, hi + 1, device=z.device)
        left = csq[m - 1] - csum[m - 1] ** 2 / m
        right = (csq[-1] - csq[m - 1]) - (csum[-1] - csum[m - 1]) ** 2 / (n - m)
        cut = int(m[torch.argmin(left + right)])
    return direction, float(0.5 * (proj[cut - 1] + proj[cut]))


def adaptive_partition(x: torch.Tensor, y: torch.Tensor, granularity: float, min_size: int, *,
                       max_parts: int = 64, balance: float = 0.02, profile: DataProfile | None = None,
                       seed: int = 0) -> DataPartition:
    """Split ``x`` recursively into the granularity's number of parts (see the module docstring).

    Raises:
        ValueError: granularity outside [0, 1], min_size < 1 or larger than the data, NaN features,
            balance outside [0, 0.5].
    """
    x = _check_x(x).float()
    n, d = x.shape
    target = n_parts(n, granularity, min_size, max_parts)
    if not 0 <= balance <= 0.5:
        raise ValueError(f"balance must be in [0, 0.5], got {balance!r}")
    prof = profile or profile_data(x, y, clusters=min(4, n), k=min(10, n - 1) if n > 1 else 1, seed=seed)
    scale = torch.sqrt(prof.importance.float().to(x.device) * d)
    z = (x - x.mean(0)) / x.std(0).clamp(min=1e-12) * scale if n > 1 else x
    rel_density = torch.exp(prof.log_density - prof.log_density.max()) if n > 1 else torch.ones(n)

    def priority(idx: torch.Tensor) -> float:
        spread = float(z[idx].var(dim=0).sum()) if len(idx) > 1 else 0.0
        return len(idx) * (1 + float(rel_density[idx].mean())) * (1 + spread)

    leaves: dict[int, torch.Tensor] = {0: torch.arange(n, device=x.device)}  # node id -> rows
    heap = [(-priority(leaves[0]), 0)]
    directions, thresholds, children = [], [], []
    parent: dict[int, tuple[int, int]] = {}  # node id -> (internal index, side)
    next_id = 1
    while len(leaves) < target and heap:
        _, node = heapq.heappop(heap)
        rows = leaves[node]
        if len(rows) < 2 * min_size:
            continue
        direction, threshold = _split(z[rows], balance, seed + node)
        right = (z[rows] @ direction) > threshold
        if right.all() or (~right).all():
            continue
        internal = len(children)
        directions.append(direction)
        thresholds.append(threshold)
        children.append((-1, -1))
        if node in parent:
            p, side = parent[node]
            c = list(children[p])
            c[side] = internal
            children[p] = (c[0], c[1])
        del leaves[node]
        for side, part_rows in enumerate((rows[~right], rows[right])):
            leaves[next_id] = part_rows
            parent[next_id] = (internal, side)
            heapq.heappush(heap, (-priority(part_rows), next_id))
            next_id += 1
    labels = torch.zeros(n, dtype=torch.long, device=x.device)
    for part, (node, rows) in enumerate(sorted(leaves.items())):
        labels[rows] = part
        if node in parent:
            p, side = parent[node]
            c = list(children[p])
            c[side] = -(part + 1)
            children[p] = (c[0], c[1])
    # routing works in z-space: fold the standardisation into directions and thresholds
    mean, std = (x.mean(0), x.std(0).clamp(min=1e-12)) if n > 1 else (torch.zeros(d), torch.ones(d))
    dirs = torch.stack(directions) if directions else torch.zeros(0, d)
    w = dirs * scale / std
    t = torch.tensor(thresholds, dtype=torch.float32) + (w * mean).sum(1) if directions else torch.zeros(0)
    return DataPartition(labels, w, t, children, len(leaves))


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
