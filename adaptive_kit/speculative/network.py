"""A network model that prices a run's collectives on LAN, datacentre and WAN links.

Real gloo on a small machine is CPU-bound, so measured wall-clock says little about a cluster.
Each all-reduce is priced as a ring: ``2 (K-1)`` latency hops plus ``2 (K-1)/K`` of its bytes
through each link. A step costs ``max(compute, overlapped communication)`` plus blocking
communication plus the recompute of rolled-back work.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .comm import Collective


@dataclass(frozen=True)
class NetworkProfile:
    name: str
    latency_s: float  # one hop
    bandwidth_Bps: float  # bytes per second through one link

    def __post_init__(self) -> None:
        if not self.latency_s >= 0:
            raise ValueError(f"NetworkProfile.latency_s must be >= 0, got {self.latency_s!r}")
        if not self.bandwidth_Bps > 0:
            raise ValueError(f"NetworkProfile.bandwidth_Bps must be > 0, got {self.bandwidth_Bps!r}")


PROFILES = {
    "lan": NetworkProfile("lan", 50e-6, 10e9 / 8),
    "datacentre": NetworkProfile("datacentre", 10e-3, 1e9 / 8),
    "wan": NetworkProfile("wan", 50e-3, 100e6 / 8),
}


def profile(name: str | NetworkProfile) -> NetworkProfile:
    """A profile by name (``lan``, ``datacentre``, ``wan``) or the profile itself."""
    if isinstance(name, NetworkProfile):
        return name
    if name not in PROFILES:
        raise ValueError(f"network profile={name!r}: expected one of {sorted(PROFILES)}")
    return PROFILES[name]


def ring_allreduce_s(nbytes: np.ndarray | float, workers: int, net: NetworkProfile) -> np.ndarray:
    """Seconds for a ring all-reduce of ``nbytes`` per worker over ``workers`` workers."""
    if workers <= 1:
        return np.zeros_like(np.asarray(nbytes, dtype=float))
    hops = 2 * (workers - 1)
    return hops * net.latency_s + hops / workers * np.asarray(nbytes, dtype=float) / net.bandwidth_Bps


def simulated_time(log: Sequence[Collective], steps: int, workers: int, compute_s: float,
                   recomputes: np.ndarray | None, net: str | NetworkProfile) -> np.ndarray:
    """Cumulative simulated seconds after each of ``steps`` steps.

    Args:
        log: the run's collectives (``eval`` ones are ignored: evaluation is not training).
        compute_s: one worker's forward + backward time for one step.
        recomputes: (steps,) 1 where some worker recomputed the step after a rollback.
    """
    net = profile(net)
    over = np.zeros(steps)
    block = np.zeros(steps)
    for c in log:
        if c.kind == "eval" or not 0 <= c.step < steps:
            continue
        t = float(ring_allreduce_s(c.payload_bytes + c.control_bytes, workers, net))
        (over if c.overlapped else block)[c.step] += t
    redo = np.zeros(steps) if recomputes is None else np.minimum(np.asarray(recomputes, float), 1.0)
    return np.cumsum(np.maximum(compute_s, over) + block + redo * compute_s)


def traffic_frame(log: Sequence[Collective]) -> pd.DataFrame:
    """The collective log as a DataFrame: step, kind, payload_bytes, control_bytes, overlapped."""
    return pd.DataFrame([c.__dict__ for c in log],
                        columns=["step", "kind", "payload_bytes", "control_bytes", "overlapped"])
