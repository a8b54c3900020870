"""Drift detection on a stream, and a stream loop that re-profiles and re-partitions on drift.

Detectors take a batch at a time (vectorised over the batch) and say whether it drifted:

- :class:`PageHinkley`: cumulative deviation of a signal (the model's per-row loss) above its
  running mean; fires when it rises ``threshold`` above its minimum (an increase in the mean);
- :class:`ADWIN`: the adaptive window of Bifet & Gavaldà (2007) over a bounded window, every
  ``stride``-th cut tested at once with the variance-aware (Bernstein) bound of ADWIN2, its
  confidence split over the cuts (a union bound); on drift the part before the cut is dropped;
- :class:`KSDrift`: a two-sample Kolmogorov-Smirnov test per feature between a reference
  window and the latest batch, Bonferroni-corrected — covariate drift, before labels arrive.

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
    """Page-Hinkley test for an increase in the mean of a stream."""

    def __init__(self, delta: float = 0.005, threshold: float = 50.0, min_samples: int = 30):
        if not delta >= 0 or not threshold > 0 or min_samples < 1:
            raise ValueError(f"need delta >= 0, threshold > 0, min_samples >= 1; got {delta!r}, {threshold!r}, {min_samples!r}")
        self.delta, self.threshold, self.min_samples = delta, threshold, min_samples
        self.reset()

    def reset(self) -> None:
        self.n, self.total, self.cum, self.low = 0, 0.0, 0.0, 0.0

    def update(self, batch) -> bool:
        v = _check_batch(batch)
        if len(v) == 0:
            return False
        n = self.n + torch.arange(1, len(v) + 1, dtype=torch.float64)
        mean = (self.total + torch.cumsum(v, 0)) / n
        cum = self.cum + torch.cumsum(v - mean - self.delta, 0)
        low = torch.minimum(torch.cummin(cum, 0).values, torch.tensor(self.low, dtype=torch.float64))
        fired = ((cum - low) > self.threshold) & (n >= self.min_samples)
        if fired.any():
            self.reset()
            return True
        self.n, self.total = int(n[-1]), float(self.total + v.sum())
        self.cum, self.low = float(cum[-1]), float(low[-1])
        return False


class ADWIN:
    """Adaptive windowing over the last ``max_window`` values; cuts every ``stride`` values."""

    def __init__(self, delta: float = 0.002, max_window: int = 4096, min_side: int = 16, stride: int = 8):
        if not 0 < delta < 1 or max_window < 2 * min_side or min_side < 1 or stride < 1:
            raise ValueError(f"need 0 < delta < 1, min_side >= 1, max_window >= 2 min_side, stride >= 1; got "
                             f"{delta!r}, {max_window!r}, {min_side!r}, {stride!r}")
        self.delta, self.max_window, self.min_side, self.stride = delta, max_window, min_side, stride
        self.reset()

    def reset(self) -> None:
        self.window = torch.zeros(0, dtype=torch.float64)

    @property
    def mean(self) -> float:
        return float(self.window.mean()) if len(self.window) else float("nan")

    def update(self, batch) -> bool:
        self.window = torch.cat([self.window, _check_batch(batch)])[-self.max_window:]
        w = self.window
        n = len(w)
        if n < 2 * self.min_side:
            return False
        cuts = torch.arange(self.min_side, n - self.min_side + 1, self.stride)
        csum = torch.cumsum(w, 0)
        n0, n1 = cuts.double(), (n - cuts).double()
        mu0 = csum[cuts - 1] / n0
        mu1 = (csum[-1] - csum[cuts - 1]) / n1
        m = 1 / (1 / n0 + 1 / n1)
        log_term = math.log(2 * math.log(n) * len(cuts) / self.delta)  # a union bound over the cuts tested
        var = float(w.var()) if n > 1 else 0.0
        eps = torch.sqrt(2 * var * log_term / m) + 2 * log_term / (3 * m)
        hit = (mu0 - mu1).abs() > eps
        if not hit.any():
            return False
        self.window = w[int(cuts[hit.nonzero()[-1, 0]]):]  # keep what follows the latest cut that drifted
        return True


class KSDrift:
    """Per-feature two-sample KS test of each batch against a reference window (Bonferroni)."""

    def __init__(self, alpha: float = 1e-3, reference: torch.Tensor | None = None):
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        self.alpha = alpha
        self.reference = None if reference is None else np.asarray(reference, dtype=float)
        self.last_p = float("nan")

    def reset(self, reference: torch.Tensor | None = None) -> None:
        self.reference = None if reference is None else np.asarray(reference, dtype=float)

    def update(self, batch) -> bool:
        x = np.asarray(batch, dtype=float)
        if x.ndim != 2:
            raise ValueError(f"KSDrift needs a (rows, features) batch, got shape {x.shape}")
        if not np.isfinite(x).all():
            r, c = np.argwhere(~np.isfinite(x))[0]
            raise ValueError(f"batch has non-finite values (first at row {r}, column {c})")
        if self.reference is None:
            self.reference = x
            return False
        p = stats.ks_2samp(self.reference, x, axis=0).pvalue
        self.last_p = float(min(1.0, np.min(p) * x.shape[1]))
        return self.last_p < self.alpha


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
