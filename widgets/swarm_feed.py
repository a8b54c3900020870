"""What arrived on a swarm's bus, kept as the live dashboard needs it: the batches not yet drawn,
each member's newest report, compute per member slot, and the range of every metric seen."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from adaptive_kit.swarm import Collector

from .swarm_plots import METRICS, TRAJECTORY_STATS


class SwarmFeed:
    """The dashboard's reading of a :class:`~adaptive_kit.swarm.Collector` for ``n`` members.

    Attributes:
        latest: member -> its newest report (a row of the ``swarm`` stream).
        compute: (n,) compute seconds per member slot over the run.
        ranges: per metric, (min, max) of the finite values seen.
    """

    STREAMS = ("swarm", "stats", "swarm_alarms")

    def __init__(self, collector: Collector, n: int) -> None:
        self.collector, self.n = collector, n
        self._consumed: dict[str, int] = dict.fromkeys(self.STREAMS, 0)
        self.latest: dict[int, dict[str, Any]] = {}
        self.compute = np.zeros(n)
        self.ranges: dict[str, tuple[float, float]] = {}
        self._stats_parts: list[pd.DataFrame] = []
        self._stats_cache: pd.DataFrame | None = None

    def take(self, stream: str) -> pd.DataFrame | None:
        """The batches of ``stream`` that arrived since the last call, as one frame (None if none)."""
        batches = self.collector.tables.get(stream, [])
        new = batches[self._consumed[stream]:]
        self._consumed[stream] = len(batches)
        new = [b for b in new if b.num_rows]
        if not new:
            return None
        return pa.Table.from_batches(new).to_pandas()

    def ingest(self, rows: pd.DataFrame) -> None:
        """Reports of the ``swarm`` stream: newest per member, compute, metric ranges."""
        for rec in rows.to_dict("records"):  # in arrival order: the newest report per member wins
            self.latest[int(rec["member"])] = rec
        np.add.at(self.compute, rows["member"].to_numpy(dtype=int), np.nan_to_num(rows["compute_s"].to_numpy(float)))
        for m in METRICS:
            v = pd.to_numeric(rows[m], errors="coerce").to_numpy(float)
            v = v[np.isfinite(v)]
            if v.size:
                lo, hi = self.ranges.get(m, (math.inf, -math.inf))
                self.ranges[m] = (min(lo, float(v.min())), max(hi, float(v.max())))

    def add_stats(self, stats: pd.DataFrame) -> None:
        self._stats_parts.append(stats)
        self._stats_cache = None

    def latest_values(self, metric: str) -> np.ndarray:
        """(n,) the newest reported value of ``metric`` per member; NaN before any."""
        out = np.full(self.n, math.nan)
        for m, rec in self.latest.items():
            v = rec.get(metric)
            out[m] = math.nan if v is None else float(v)
        return out

    def stats_frame(self) -> pd.DataFrame:
        """Every weight-statistics row received (the bus's ``stats`` stream; ``rank`` is the member)."""
        if self._stats_cache is None:
            self._stats_cache = (pd.concat(self._stats_parts, ignore_index=True) if self._stats_parts
                                 else pd.DataFrame(columns=["rank", "layer", "step", *TRAJECTORY_STATS]))
        return self._stats_cache
