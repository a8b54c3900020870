"""The exact minimum-bottleneck contiguous partition of a chain over k devices in order.

Node i costs ``cost[i]`` seconds on a device of speed 1 (a device of speed s takes cost / s);
cutting after node i moves ``cut_bytes[i]`` bytes forward (activations) and as many back
(gradients) over a link of ``bandwidth`` bytes per second, charged to the sending stage. A stage's
time is its compute plus that communication; the pipeline's step is bounded by the slowest stage.
A bisection on the bottleneck with an O(k n) vectorised feasibility test (the largest allowed
start of each stage is the best one), exact to float precision for any speeds and cut sizes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChainPlan:
    """Stage j runs nodes ``bounds[j]:bounds[j+1]`` on device j."""

    bounds: tuple[int, ...]  # (k + 1,) 0 = bounds[0] < ... < bounds[k] = n
    stage_s: tuple[float, ...]  # (k,) compute + communication seconds of each stage
    bottleneck_s: float  # max(stage_s)

    @property
    def stages(self) -> list[range]:
        return [range(a, b) for a, b in zip(self.bounds[:-1], self.bounds[1:])]


def _validate(cost: np.ndarray, k: int, speeds: np.ndarray, cut_bytes: np.ndarray, bandwidth: float) -> None:
    if cost.ndim != 1 or len(cost) == 0:
        raise ValueError(f"cost must be a non-empty 1-d sequence, got shape {cost.shape}")
    if not np.all(np.isfinite(cost)) or (cost < 0).any():
        raise ValueError(f"cost must be finite and >= 0, got {cost[~(np.isfinite(cost) & (cost >= 0))][:3]}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if k > len(cost):
        raise ValueError(f"k={k} devices for a chain of {len(cost)} nodes: every stage needs a node")
    if speeds.shape != (k,):
        raise ValueError(f"speeds must have one entry per device (k={k}), got shape {speeds.shape}")
    if not np.all(np.isfinite(speeds)) or (speeds <= 0).any():
        raise ValueError(f"speeds must be finite and > 0, got {speeds.tolist()}")
    if cut_bytes.shape != cost.shape:
        raise ValueError(f"cut_bytes must have one entry per node ({len(cost)}), got shape {cut_bytes.shape}")
    if not np.all(np.isfinite(cut_bytes)) or (cut_bytes < 0).any():
        raise ValueError("cut_bytes must be finite and >= 0")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth!r}")


def stage_times(cost: Sequence[float], bounds: Sequence[int], speeds: Sequence[float] | None = None,
                cut_bytes: Sequence[float] | None = None, bandwidth: float = float("inf")) -> np.ndarray:
    """Seconds of each stage of the plan ``bounds`` (compute / speed + 2 x cut bytes / bandwidth)."""
    cost = np.asarray(cost, dtype=float)
    k = len(bounds) - 1
    speeds = np.ones(k) if speeds is None else np.asarray(speeds, dtype=float)
    cut = np.zeros(len(cost)) if cut_bytes is None else np.asarray(cut_bytes, dtype=float)
    out = np.empty(k)
    for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        send = 2 * cut[b - 1] / bandwidth if j < k - 1 else 0.0
        out[j] = cost[a:b].sum() / speeds[j] + send
    return out


def partition_chain(cost: Sequence[float], k: int, speeds: Sequence[float] | None = None,
                    cut_bytes: Sequence[float] | None = None,
                    bandwidth: float = float("inf")) -> ChainPlan:
    """The contiguous split of ``cost`` into ``k`` non-empty stages with the smallest bottleneck.

    Args:
        cost: (n,) seconds per node on a device of speed 1.
        k: devices, used in the given order (stage j on device j).
        speeds: (k,) relative speeds (default all 1): heterogeneous devices.
        cut_bytes: (n,) bytes crossing a cut after node i (the last entry is unused).
        bandwidth: link bytes per second (default: free communication).

    Raises:
        ValueError: a cost, speed or size is invalid, or ``k`` exceeds the number of nodes.
    """
    c = np.asarray(cost, dtype=float)
    s = np.ones(k if isinstance(k, (int, np.integer)) else 1) if speeds is None else np.asarray(speeds, dtype=float)
    cut = np.zeros(c.shape) if cut_bytes is None else np.asarray(cut_bytes, dtype=float)
    _validate(c, k, s, cut, bandwidth)
    n = len(c)
    prefix = np.concatenate([[0.0], np.cumsum(c)])
    send = 2 * cut / bandwidth if np.isfinite(bandwidth) else np.zeros(n)
    bounds = _search(prefix, s, send, k)
    times = stage_times(c, bounds, s, cut, bandwidth)
    return ChainPlan(bounds, tuple(float(t) for t in times), float(times.max()))


def _feasible(limit: float, prefix: np.ndarray, s: np.ndarray, send: np.ndarray, k: int):
    """Stage starts that keep every stage <= ``limit``, or None. O(k n), vectorised.

    A stage on device j may end at node e if some allowed start a <= e has
    (prefix[e+1] - prefix[a]) / s[j] + send[e] <= limit; prefix grows with a, so the largest
    allowed start is the best one, found for every e at once by a running maximum.
    """
    n = len(send)
    nodes = np.arange(n)
    can_start = np.zeros(n, dtype=bool)
    can_start[0] = True
    starts = []
    slack = 1e-12 * max(limit, 1e-300)
    for j in range(k):
        last = j == k - 1
        best_start = np.maximum.accumulate(np.where(can_start, nodes, -1))
        budget = s[j] * (limit + slack - (0.0 if last else send))
        ok = (best_start >= 0) & (prefix[1:] - prefix[np.maximum(best_start, 0)] <= budget)
        if not last:
            ok[n - (k - 1 - j):] = False  # the later stages need a node each
        starts.append(best_start)
        can_start = np.zeros(n, dtype=bool)
        can_start[1:] = ok[:-1]
    if not ok[n - 1]:
        return None
    bounds, e = [n], n - 1
    for j in range(k - 1, 0, -1):
        a = int(starts[j][e])
        bounds.append(a)
        e = a - 1
    return tuple(reversed([*bounds, 0]))


def _search(prefix: np.ndarray, s: np.ndarray, send: np.ndarray, k: int) -> tuple[int, ...]:
    """Bisect on the bottleneck until the feasible plan is optimal to float precision."""
    n = len(send)
    hi = float((prefix[-1] / s.min()) + send.max(initial=0.0))  # everything on the slowest device
    lo = 0.0
    plan = _feasible(hi, prefix, s, send, k)
    for _ in range(200):
        if hi - lo <= 1e-13 * hi:
            break
        mid = 0.5 * (lo + hi)
        found = _feasible(mid, prefix, s, send, k)
        if found is None:
            lo = mid
        else:
            hi, plan = mid, found
    assert plan is not None and len(plan) == k + 1 and plan[-1] == n
    return plan
