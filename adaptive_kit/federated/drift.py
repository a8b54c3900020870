"""Drift detection on a stream, and a stream loop that re-profiles and re-partitions on drift.

Detectors take a batch at a time (vectorised over the batch) and say whether it drifted:

- :class:`PageHinkley`: cumulative deviations of a signal (the model's per-row loss) from its
  running mean, two-sided: fires on an increase or a decrease of the mean;
- :class:`ADWIN`: the adaptive window of Bifet & Gavaldà (2007), cuts spaced like ADWIN2's
  exponential histogram and tested at once with its variance-aware (Bernstein) bound — river's
  sensitivity, on batches; on drift the values before the change are dropped;
- :class:`KSDrift`: a two-sample Kolmogorov-Smirnov test per feature between a reference
  window and the latest batch, Bonferroni-corrected — covariate drift, before labels arrive; the
  reference moves to the new distribution after an alarm.

:func:`follow_stream` runs the kit's loop: profile and partition a first window, fit an ordinal
model per part, score each batch, feed the detectors, and on an alarm re-profile and
re-partition the recent rows. :func:`score_alarms` turns alarms into delay and false alarms.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy import stats

from . import ordinal
from .checks import _tensor, check_features, check_labels
from .partition import DataPartition, adaptive_partition, choose_granularity


def _check_batch(v: torch.Tensor | np.ndarray | Sequence[float], name: str = "batch") -> torch.Tensor:
    v = _tensor(v, name).double().reshape(-1)
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} has non-finite values (first at position {int((~torch.isfinite(v)).nonzero()[0])})")
    return v


class PageHinkley:
    """Page-Hinkley test for a change in the mean of a stream: an increase (``mode="up"``), a
    decrease (``"down"``) or either (``"both"``, the default).

    Two cumulative sums of deviations from the running mean are kept, one biased down by
    ``delta`` (it climbs on an increase) and one biased up (it falls on a decrease); an alarm
    is raised when the first rises ``threshold`` above its lowest value or the second falls
    ``threshold`` below its highest, after ``min_samples`` values. On an alarm the state restarts
    from the value after the one that fired, so a batch gives what the values one by one give;
    ``fired_at`` is the position in the batch of the (first) value that fired.
    """

    MODES = ("up", "down", "both")

    def __init__(self, delta: float = 0.005, threshold: float = 50.0, min_samples: int = 30, mode: str = "both"):
        if not delta >= 0 or not threshold > 0 or min_samples < 1:
            raise ValueError(f"need delta >= 0, threshold > 0, min_samples >= 1; got {delta!r}, {threshold!r}, {min_samples!r}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.delta, self.threshold, self.min_samples, self.mode = delta, threshold, min_samples, mode
        self.reset()

    def reset(self) -> None:
        self.fired_at: int | None = None  # position in the last batch of the value that fired
        self.n, self.total = 0, 0.0
        self.cum, self.low = 0.0, 0.0  # sum of (value - mean - delta) and its minimum
        self.cum_down, self.high = 0.0, 0.0  # sum of (value - mean + delta) and its maximum

    def update(self, batch) -> bool:
        v = _check_batch(batch)
        if len(v) == 0:
            return False
        n = self.n + torch.arange(1, len(v) + 1, dtype=torch.float64)
        dev = v - (self.total + torch.cumsum(v, 0)) / n
        cum = self.cum + torch.cumsum(dev - self.delta, 0)
        low = torch.minimum(torch.cummin(cum, 0).values, torch.tensor(self.low, dtype=torch.float64))
        cum_down = self.cum_down + torch.cumsum(dev + self.delta, 0)
        high = torch.maximum(torch.cummax(cum_down, 0).values, torch.tensor(self.high, dtype=torch.float64))
        up, down = (cum - low) > self.threshold, (high - cum_down) > self.threshold
        fired = {"up": up, "down": down, "both": up | down}[self.mode] & (n >= self.min_samples)
        if fired.any():
            at = int(fired.nonzero()[0, 0])
            self.reset()
            self.update(v[at + 1:])  # the test restarts after the value that fired, as row by row
            self.fired_at = at
            return True
        self.n, self.total = int(n[-1]), float(self.total + v.sum())
        self.cum, self.low = float(cum[-1]), float(low[-1])
        self.cum_down, self.high = float(cum_down[-1]), float(high[-1])
        return False


class ADWIN:
    """Adaptive windowing (Bifet & Gavaldà 2007) over the last ``max_window`` values.

    Every ``clock`` values the window is split at cuts spaced like ADWIN2's exponential histogram
    (``buckets`` cuts per doubling of the distance from the newest value: dense near the end,
    where a change shows first, sparse in the past), and a cut whose two sides' means differ by
    more than the variance-aware (Bernstein) bound with confidence ``delta / ln n`` signals a
    change. On a change the oldest values are dropped up to the first such cut and the test is
    repeated, until no cut is significant: the window keeps the longest recent stretch with
    one mean. All cuts are tested at once, vectorised over the window.
    """

    def __init__(self, delta: float = 0.002, max_window: int = 8192, min_side: int = 5, clock: int = 16,
                 buckets: int = 5):
        if not 0 < delta < 1 or max_window < 2 * min_side or min_side < 1 or clock < 1 or buckets < 1:
            raise ValueError(f"need 0 < delta < 1, min_side >= 1, max_window >= 2 min_side, clock >= 1, buckets >= 1; got "
                             f"{delta!r}, {max_window!r}, {min_side!r}, {clock!r}, {buckets!r}")
        self.delta, self.max_window, self.min_side, self.clock, self.buckets = delta, max_window, min_side, clock, buckets
        self.reset()

    def reset(self) -> None:
        self.window = torch.zeros(0, dtype=torch.float64)
        self.since = 0  # values since the last test

    @property
    def mean(self) -> float:
        return float(self.window.mean()) if len(self.window) else float("nan")

    def _offsets(self, n: int) -> torch.Tensor:
        """Distances from the newest value of the cuts: ``buckets`` of 1, then of 2, 4, ..."""
        out, d, size = [], 0, 1
        while d < n:
            for _ in range(self.buckets):
                d += size
                out.append(d)
            size *= 2
        return torch.tensor(out)

    def _first_cut(self, w: torch.Tensor) -> int | None:
        n = len(w)
        if n < 2 * self.min_side:
            return None
        cuts = n - self._offsets(n)
        cuts = cuts[(cuts >= self.min_side) & (n - cuts >= self.min_side)]
        if len(cuts) == 0:
            return None
        csum = torch.cumsum(w, 0)
        n0, n1 = cuts.double(), (n - cuts).double()
        mu0 = csum[cuts - 1] / n0
        mu1 = (csum[-1] - csum[cuts - 1]) / n1
        inv_m = 1 / (n0 - self.min_side + 1) + 1 / (n1 - self.min_side + 1)
        log_term = math.log(2 * math.log(n) / self.delta)
        var = float(w.var(correction=0))
        eps = torch.sqrt(2 * var * log_term * inv_m) + 2 / 3 * log_term * inv_m
        hit = (mu0 - mu1).abs() > eps
        return int(cuts[hit].max()) if hit.any() else None

    def update(self, batch) -> bool:
        v = _check_batch(batch)
        self.window = torch.cat([self.window, v])[-self.max_window:]
        self.since += len(v)
        if self.since < self.clock:
            return False
        self.since = 0
        drifted = False
        while (cut := self._first_cut(self.window)) is not None:
            self.window, drifted = self.window[cut:], True
        return drifted


class KSDrift:
    """Per-feature two-sample KS test of each batch against a reference window (Bonferroni).

    Without a reference the first batch starts one. After an alarm the reference restarts with
    the batch that fired, so later batches are compared with the new distribution rather than
    the old one (no storm of alarms after one change); a reference under ``reference_rows``
    rows grows with every batch that does not fire.
    """

    def __init__(self, alpha: float = 1e-3, reference: torch.Tensor | None = None, reference_rows: int = 500):
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if isinstance(reference_rows, bool) or not isinstance(reference_rows, int) or reference_rows < 1:
            raise ValueError(f"reference_rows must be an int >= 1, got {reference_rows!r}")
        self.alpha, self.reference_rows = alpha, reference_rows
        self.reference = None if reference is None else np.asarray(reference, dtype=float)
        self.last_p = float("nan")

    def reset(self, reference: torch.Tensor | None = None) -> None:
        self.reference = None if reference is None else np.asarray(reference, dtype=float)

    def update(self, batch) -> bool:
        x = check_features(np.asarray(batch, dtype=float), "batch").numpy() if np.asarray(batch).ndim == 2 else None
        if x is None:
            raise ValueError(f"KSDrift needs a (rows, features) batch, got shape {np.asarray(batch).shape}")
        if self.reference is None:
            self.reference = x
            return False
        p = stats.ks_2samp(self.reference, x, axis=0).pvalue
        self.last_p = float(min(1.0, np.min(p) * x.shape[1]))
        if self.last_p < self.alpha:
            self.reference = x  # the new distribution is the reference from now on
            return True
        if len(self.reference) < self.reference_rows:
            self.reference = np.concatenate([self.reference, x])
        return False


def score_alarms(alarms: Sequence[int], changes: Sequence[int], horizon: int) -> dict:
    """Delay of the first alarm in [change, change + horizon) per change (None: missed); every
    other alarm is false."""
    alarms, delays, used = sorted(alarms), [], set()
    for c in changes:
        hit = next((a for a in alarms if c <= a < c + horizon), None)
        delays.append(None if hit is None else hit - c)
        if hit is not None:
            used.add(hit)
    found = [d for d in delays if d is not None]
    return {"delays": delays, "mean_delay": float(np.mean(found)) if found else float("nan"),
            "missed": sum(d is None for d in delays), "false_alarms": sum(a not in used for a in alarms)}


@dataclass
class StreamRun:
    """What :func:`follow_stream` saw: one row per batch, and the partitions it made."""

    log: pd.DataFrame  # batch, loss, error, alarm (detector names), repartitioned, parts, largest_share
    partitions: list[tuple[int, DataPartition]] = field(default_factory=list)  # (batch, partition)
    alarms: dict[str, list[int]] = field(default_factory=dict)  # detector -> batches it fired on


def _fit_parts(x: torch.Tensor, y: torch.Tensor, part: DataPartition, classes: int) -> list[torch.Tensor]:
    out = []
    for k in range(part.parts):
        rows = part.labels == k
        levels = torch.unique(y[rows])
        if len(levels) < 2:  # a part with one class: a global fit stands in
            out.append(ordinal.fit(x, y, classes, l2=1e-3, max_iter=100).params)
            continue
        out.append(ordinal.fit(x[rows], y[rows], classes, l2=1e-3, max_iter=100).params)
    return out


def follow_stream(x: torch.Tensor, y: torch.Tensor, *, warmup: int = 5, refit_batches: int = 5,
                  granularity: float | str = 0.5, min_size: int = 50, detectors: dict | None = None,
                  trigger: Sequence[str] | None = None, seed: int = 0, progress: bool = False) -> StreamRun:
    """Run the partition-and-fit loop over batches ``x`` (B, b, d), ``y`` (B, b).

    The first ``warmup`` batches are profiled, partitioned and fitted. Each later batch is scored
    (per-row loss of its part's model) and fed to ``detectors`` (default: Page-Hinkley and ADWIN on
    the loss, KS on the features). When one in ``trigger`` (default all) fires, the last
    ``refit_batches`` batches are re-profiled and re-partitioned, models refitted, detectors reset;
    ``refit_batches`` later the partition is rebuilt once more, on rows all after the alarm.
    ``granularity="auto"`` picks it at every rebuild by :func:`~.partition.choose_granularity`.
    """
    if x.dim() != 3 or y.shape != x.shape[:2]:
        raise ValueError(f"x must be (batches, batch, d) and y (batches, batch); got {tuple(x.shape)}, {tuple(y.shape)}")
    if not 1 <= warmup < len(x) or refit_batches < 1:
        raise ValueError(f"warmup must be in [1, {len(x) - 1}] and refit_batches >= 1, got {warmup!r}, {refit_batches!r}")
    check_features(x.reshape(-1, x.shape[-1]))
    classes = check_labels(y.reshape(-1))[1]
    detectors = detectors if detectors is not None else {"page_hinkley": PageHinkley(), "adwin": ADWIN(), "ks": KSDrift()}
    trigger = list(trigger) if trigger is not None else list(detectors)

    def rebuild(upto: int, first: int, reference: torch.Tensor) -> tuple[DataPartition, list[torch.Tensor]]:
        """Partition and fit batches [first, upto); KS compares later batches with ``reference``."""
        xs, ys = x[first:upto].reshape(-1, x.shape[-1]), y[first:upto].reshape(-1)
        size = min(min_size, len(xs))
        gran = choose_granularity(xs, ys, size, seed=seed)[0] if granularity == "auto" else granularity
        part = adaptive_partition(xs, ys, gran, size, seed=seed)
        for det in detectors.values():
            det.reset(reference.reshape(-1, x.shape[-1]).numpy()) if isinstance(det, KSDrift) else det.reset()
        return part, _fit_parts(xs.double(), ys, part, classes)

    part, models = rebuild(warmup, 0, x[:warmup])
    run = StreamRun(pd.DataFrame(), [(warmup, part)], {k: [] for k in detectors})
    rows, pending = [], None
    batches = range(warmup, len(x))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="stream", leave=False)
    for b in batches:
        xb, yb = x[b].double(), y[b]
        where = part.assign(x[b])
        loss = torch.empty(len(yb), dtype=torch.float64)
        err = torch.empty(len(yb), dtype=torch.float64)
        for k in torch.unique(where).tolist():
            m = where == k
            p = models[k]
            pr = ordinal.class_probs(p, xb[m], classes).clamp(min=1e-12)
            loss[m] = -torch.log(pr.gather(1, yb[m, None].long()))[:, 0]
            err[m] = (ordinal.predict(p, xb[m], classes, "median") != yb[m]).double()
        fired = [name for name, det in detectors.items()
                 if det.update(x[b].numpy() if isinstance(det, KSDrift) else loss)]
        for name in fired:
            run.alarms[name].append(b)
        redo = any(f in trigger for f in fired) or b == pending
        if redo:
            first = max(0, b + 1 - refit_batches)  # after an alarm, only its batch is surely new
            part, models = rebuild(b + 1, first, x[first:b + 1] if b == pending else x[b])
            run.partitions.append((b, part))
            pending = b + refit_batches if b != pending else None
        sizes = part.sizes().double()
        rows.append({"batch": b, "loss": float(loss.mean()), "error": float(err.mean()), "alarm": ",".join(fired),
                     "repartitioned": redo, "parts": part.parts, "largest_share": float(sizes.max() / sizes.sum())})
    run.log = pd.DataFrame(rows)
    return run
