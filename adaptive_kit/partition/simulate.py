"""A pipeline schedule simulator: GPipe and 1F1B over k stages, micro-batches, links.

Each stage runs its operations (F = forward, B = backward of one micro-batch) in the schedule's
order, one at a time; F(j, m) waits for F(j - 1, m) and the link to carry its activations,
B(j, m) for B(j + 1, m) and the link to carry the gradient back (the last stage's B follows its
own F). The result is the step's makespan and every operation's start and end: a Gantt chart.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

SCHEDULES = ("gpipe", "1f1b")


def stage_order(schedule: str, stage: int, k: int, micro: int) -> list[tuple[str, int]]:
    """The (kind, micro-batch) operations stage ``stage`` runs, in order."""
    if schedule == "gpipe":
        return [("F", m) for m in range(micro)] + [("B", m) for m in range(micro)]
    if schedule == "1f1b":
        warm = min(k - stage - 1, micro)
        ops = [("F", m) for m in range(warm)]
        for m in range(micro - warm):
            ops += [("F", warm + m), ("B", m)]
        return ops + [("B", m) for m in range(micro - warm, micro)]
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


@dataclass(frozen=True)
class Simulation:
    makespan_s: float  # one optimisation step: every micro-batch forward and backward
    events: pd.DataFrame  # stage, micro, kind, start_s, end_s
    bubble: float  # share of stage-time idle within the makespan

    def throughput(self, samples: int) -> float:
        """Samples per second when a step processes ``samples``."""
        return samples / self.makespan_s


def _vector(name: str, value: float | Sequence[float], n: int) -> np.ndarray:
    v = np.broadcast_to(np.asarray(value, dtype=float), (n,)).copy() if np.ndim(value) == 0 else np.asarray(value, dtype=float)
    if v.shape != (n,):
        raise ValueError(f"{name} must have {n} entries, got shape {v.shape}")
    if not np.all(np.isfinite(v)) or (v < 0).any():
        raise ValueError(f"{name} must be finite and >= 0, got {v.tolist()}")
    return v


def simulate(forward_s: Sequence[float], backward_s: Sequence[float] | None = None, micro: int = 4,
             schedule: str = "1f1b", link_s: float | Sequence[float] = 0.0,
             update_s: float | Sequence[float] = 0.0) -> Simulation:
    """Simulate one training step of a k-stage pipeline.

    Args:
        forward_s: (k,) seconds of one micro-batch's forward on each stage.
        backward_s: (k,) backward seconds (default: twice the forward).
        micro: micro-batches per step.
        schedule: "gpipe" (all forwards, then all backwards) or "1f1b".
        link_s: seconds to move one micro-batch's activations (or gradients) across each of the
            k - 1 boundaries; a scalar applies to all.
        update_s: optimiser step seconds per stage after its last backward.
    """
    f = np.asarray(forward_s, dtype=float)
    k = len(f)
    if k == 0:
        raise ValueError("forward_s must have one entry per stage, got none")
    f = _vector("forward_s", f, k)
    b = 2 * f if backward_s is None else _vector("backward_s", backward_s, k)
    link = _vector("link_s", link_s, k - 1) if k > 1 else np.zeros(0)
    upd = _vector("update_s", update_s, k)
    if isinstance(micro, bool) or not isinstance(micro, (int, np.integer)) or micro < 1:
        raise ValueError(f"micro must be an int >= 1, got {micro!r}")
    orders = [stage_order(schedule, j, k, micro) for j in range(k)]
    done: dict[tuple[str, int, int], float] = {}
    free = np.zeros(k)
    nxt = [0] * k
    rows = []
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for j in range(k):
            while nxt[j] < len(orders[j]):
                kind, m = orders[j][nxt[j]]
                if kind == "F":
                    dep = 0.0 if j == 0 else done.get(("F", j - 1, m))
                    dep = dep if j == 0 or dep is None else dep + link[j - 1]
                else:
                    dep = done.get(("F", j, m)) if j == k - 1 else done.get(("B", j + 1, m))
                    dep = dep if j == k - 1 or dep is None else dep + link[j]
                if dep is None:
                    break
                start = max(free[j], dep)
                end = start + (f[j] if kind == "F" else b[j])
                done[(kind, j, m)] = end
                free[j] = end
                rows.append((j, m, kind, start, end))
                nxt[j] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # cannot happen for the schedules above
            raise RuntimeError(f"schedule {schedule!r} deadlocked")
    for j in range(k):
        if upd[j] > 0:
            rows.append((j, -1, "U", free[j], free[j] + upd[j]))
            free[j] += upd[j]
    events = pd.DataFrame(rows, columns=["stage", "micro", "kind", "start_s", "end_s"])
    makespan = float(free.max())
    busy = float((events.end_s - events.start_s).sum())
    return Simulation(makespan, events, 1 - busy / (k * makespan) if makespan > 0 else 0.0)
