"""Drift detection on a stream, and a stream loop that re-profiles and re-partitions on drift.

Detectors take a batch at a time and say whether it drifted. river is the engine for the
streams of one signal (the model's per-row loss): its detectors get each value of a batch in
order, so a batch gives exactly river's alarms, row for row:

- :class:`PageHinkley`: river's Page-Hinkley, two-sided by default (an increase or a decrease of
  the mean);
- :class:`ADWIN`: river's adaptive window (Bifet & Gavaldà 2007);
- :class:`KSDrift`: a two-sample Kolmogorov-Smirnov test per feature between a reference
  window and the latest batch, Bonferroni-corrected — covariate drift, before labels arrive; the
  reference moves to the new distribution after an alarm.

:func:`follow_stream` runs the kit's loop: profile and partition a first window, fit an ordinal
model per part, score each batch, feed the detectors, and on an alarm re-profile and
re-partition the recent rows. :func:`score_alarms` turns alarms into delay and false alarms.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from river import drift as river_drift
from scipy import stats

from ..checks import check_int, check_number
from . import ordinal
from .checks import _tensor, check_features, check_labels
from .subsets import DataPartition, adaptive_partition, choose_granularity


def _check_batch(v: torch.Tensor | np.ndarray | Sequence[float], name: str = "batch") -> torch.Tensor:
    v = _tensor(v, name).double().reshape(-1)
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} has non-finite values (first at position {int((~torch.isfinite(v)).nonzero()[0])})")
    return v


class _RiverDetector:
    """A river drift detector fed a batch at a time: each value goes to river's ``update`` in
    order, so alarms are river's own, row for row, whatever the batch size. ``fired_at`` is the
    position in the last batch of the first value on which river fired (None: it did not)."""

    def __init__(self, engine, **params):
        self.engine, self.params = engine, params
        self.reset()

    def reset(self) -> None:
        self.detector = self.engine(**self.params)
        self.fired_at: int | None = None

    def update(self, batch) -> bool:
        self.fired_at = None
        values = _check_batch(batch).tolist()
        for i, value in enumerate(values):
            self.detector.update(value)
            if self.detector.drift_detected and self.fired_at is None:
                self.fired_at = i
        return self.fired_at is not None


class PageHinkley(_RiverDetector):
    """river's Page-Hinkley test for a change in the mean of a stream: an increase
    (``mode="up"``), a decrease (``"down"``) or either (``"both"``, the default). ``alpha`` is
    river's forgetting factor of the running mean (1: no forgetting)."""

    MODES = ("up", "down", "both")

    def __init__(self, delta: float = 0.005, threshold: float = 50.0, min_samples: int = 30, mode: str = "both",
                 alpha: float = 0.9999):
        check_number("delta", delta, 0)
        check_number("threshold", threshold, 0, open_low=True)
        check_int("min_samples", min_samples, 1)
        check_number("alpha", alpha, 0, 1, open_low=True)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        super().__init__(river_drift.PageHinkley, delta=delta, threshold=threshold, min_instances=min_samples,
                         mode=mode, alpha=alpha)


class ADWIN(_RiverDetector):
    """river's ADWIN (Bifet & Gavaldà 2007): a window that drops its oldest values whenever two
    sub-windows' means differ by more than a variance-aware bound with confidence ``delta``,
    tested every ``clock`` values. ``mean`` is the mean of the current window."""

    def __init__(self, delta: float = 0.002, clock: int = 32, min_side: int = 5, grace_period: int = 10):
        check_number("delta", delta, 0, 1, open_low=True, open_high=True)
        for name, v in (("clock", clock), ("min_side", min_side), ("grace_period", grace_period)):
            check_int(name, v, 1)
        super().__init__(river_drift.ADWIN, delta=delta, clock=clock, min_window_length=min_side,
                         grace_period=grace_period)

    @property
    def mean(self) -> float:
        return float(self.detector.estimation) if self.detector.width else float("nan")

    @property
    def width(self) -> int:
        return int(self.detector.width)


class KSDrift:
    """Per-feature two-sample KS test of each batch against a reference window (Bonferroni).

    Without a reference the first batch starts one. After an alarm the reference restarts with
    the batch that fired, so later batches are compared with the new distribution rather than
    the old one (no storm of alarms after one change); a reference under ``reference_rows``
    rows grows with every batch that does not fire.
    """

    def __init__(self, alpha: float = 1e-3, reference: torch.Tensor | None = None, reference_rows: int = 500):
        check_number("alpha", alpha, 0, 1, open_low=True, open_high=True)
        check_int("reference_rows", reference_rows, 1)
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


def fit_parts(x: torch.Tensor, y: torch.Tensor, part: DataPartition, classes: int) -> list[torch.Tensor]:
    """One ordinal fit (l2 1e-3) per part of ``part`` on its rows of ``x``, ``y``; a part with a
    single class gets the fit on all rows."""
    out = []
    for k in range(part.parts):
        rows = part.labels == k
        levels = torch.unique(y[rows])
        if len(levels) < 2:  # a part with one class: a global fit stands in
            out.append(ordinal.fit(x, y, classes, l2=1e-3, max_iter=100).params)
            continue
        out.append(ordinal.fit(x[rows], y[rows], classes, l2=1e-3, max_iter=100).params)
    return out


def score_rows(models: Sequence[torch.Tensor], part: DataPartition, x: torch.Tensor, y: torch.Tensor,
               classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row log loss, per-row error of the median class) of each row of ``x``, ``y`` under the
    model of the part :meth:`DataPartition.assign` routes it to."""
    x64 = x.double()
    where = part.assign(x)
    loss = torch.empty(len(y), dtype=torch.float64)
    err = torch.empty(len(y), dtype=torch.float64)
    for k in torch.unique(where).tolist():
        m = where == k
        pr = ordinal.class_probs(models[k], x64[m], classes).clamp(min=1e-12)
        loss[m] = -torch.log(pr.gather(1, y[m, None].long()))[:, 0]
        err[m] = (ordinal.predict(models[k], x64[m], classes, "median") != y[m]).double()
    return loss, err


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
        return part, fit_parts(xs.double(), ys, part, classes)

    part, models = rebuild(warmup, 0, x[:warmup])
    run = StreamRun(pd.DataFrame(), [(warmup, part)], {k: [] for k in detectors})
    rows, pending = [], None
    batches = range(warmup, len(x))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="stream", leave=False)
    for b in batches:
        loss, err = score_rows(models, part, x[b], y[b], classes)
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
