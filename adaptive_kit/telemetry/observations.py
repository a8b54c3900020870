"""Observations: one (kind, layer)'s statistics at one step, read from whatever level arrived.

Raw and micro records are summarised on the host into the same statistics as meso ones, as
estimates: a raw sample scales counts by its true size, and micro block means understate the
spread, the norm and the zero fraction (a block mean is zero only when the whole block is).
Macro records have ``layer = "*"``: what reads only macro data can say *that* something is
wrong, never *where*.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np

from .reduce import StepRecord


@dataclass(frozen=True)
class Observation:
    """Statistics of one (kind, layer) at one step, exact (meso, macro) or estimated (raw, micro)."""

    kind: str
    layer: str
    level: str
    count: int
    mean: float
    std: float
    min: float
    max: float
    norm: float
    nonfinite: float
    zero_frac: float

    @property
    def rms(self) -> float:
        """Root mean square of the finite entries."""
        n = self.count - self.nonfinite
        return self.norm / math.sqrt(n) if n > 0 else math.nan


def observations(record: StepRecord) -> list[Observation]:
    """One :class:`Observation` per (kind, layer) row of every level's record batch of ``record``.

    Rows that carry statistics (meso, macro, and raw and micro from the collector, which send
    the layer's statistics beside the values) give them as they are; rows of values alone are
    summarised on the host (:func:`_from_sample`). The loss row (``kind="loss"``) is left to
    the loss detectors, which read ``record.loss``.
    """
    out: list[Observation] = []
    for level, batch in record.batches.items():
        cols = batch.to_pydict()
        for i in range(batch.num_rows):
            kind, layer, count = cols["kind"][i], cols["layer"][i], cols["count"][i]
            if kind == "loss":
                continue
            if cols["mean"][i] is not None or level in ("meso", "macro"):
                out.append(Observation(kind, layer, level, count, cols["mean"][i], cols["std"][i],
                                       cols["min"][i], cols["max"][i], cols["norm"][i],
                                       cols["nonfinite"][i], cols["zero_frac"][i]))
            else:
                out.append(_from_sample(kind, layer, level, count, np.asarray(cols["values"][i], dtype=np.float64)))
    return out


def _from_sample(kind: str, layer: str, level: str, count: int, v: np.ndarray) -> Observation:
    n = v.size
    if n == 0:
        return Observation(kind, layer, level, count, *([math.nan] * 4), 0.0, 0.0, math.nan)
    scale = count / n  # each value stands for this many entries
    fin = np.isfinite(v)
    f = v[fin]
    nonfinite = float((~fin).sum() * scale)
    zero_frac = float((v == 0).mean())
    if f.size == 0:
        return Observation(kind, layer, level, count, *([math.nan] * 4), 0.0, nonfinite, zero_frac)
    return Observation(kind, layer, level, count, float(f.mean()), float(f.std()), float(f.min()),
                       float(f.max()), float(math.sqrt((f * f).sum() * scale)), nonfinite, zero_frac)


def pool_rows(rows: np.ndarray) -> np.ndarray:
    """Statistics of the union of layers from their rows of :data:`~adaptive_kit.stats.STAT_NAMES`
    (count, mean, std, min, max, norm, nonfinite, zero_frac): what a macro row sends.

    ``rows`` is ``(..., layers, 8)``; the result is ``(..., 8)``. Moments pool with Chan et al.'s
    update over the finite entries; a union with no finite entry has NaN moments."""
    rows = np.asarray(rows, dtype=np.float64)
    count, mean, std, lo, hi, norm, nonfinite, zero = np.moveaxis(rows, -1, 0)
    n = count - nonfinite
    fin = n > 0
    nt = n.sum(-1)
    ct = count.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.where(fin, mean * n, 0.0).sum(-1) / nt
        m2 = np.where(fin, n * (std ** 2 + (mean - m[..., None]) ** 2), 0.0).sum(-1)
        out = np.stack([
            ct, m, np.sqrt(m2 / nt),
            np.where(fin, lo, np.inf).min(-1), np.where(fin, hi, -np.inf).max(-1),
            np.sqrt((norm * norm).sum(-1)), nonfinite.sum(-1),
            np.where(count > 0, zero * count, 0.0).sum(-1) / ct,  # an empty layer has NaN zero_frac
        ], axis=-1)
    none = nt <= 0
    out[..., 1:5] = np.where(none[..., None], np.nan, out[..., 1:5])
    return out


def _row(o: Observation) -> list[float]:
    return [o.count, o.mean, o.std, o.min, o.max, o.norm, o.nonfinite, o.zero_frac]


def complete_macro(obs: list[Observation], layers: dict[str, Iterable[str]]) -> list[Observation]:
    """Give every kind one whole-network (``layer="*"``) observation whenever the step covers
    all its layers at meso or macro: a policy that looks at some layers more closely moves them
    out of the collector's macro row, and the pooled series would jump with the plan. The meso
    rows and the partial macro row pool exactly into the whole. A kind that is only partly
    covered (a layer at raw, micro or off) keeps its partial row, as level ``macro-partial``,
    so that it never enters the whole-network history."""
    out = [o for o in obs if o.level != "macro" or o.kind not in layers]
    for kind, names in layers.items():
        names = set(names)
        macro = [o for o in obs if o.kind == kind and o.level == "macro"]
        meso = [o for o in obs if o.kind == kind and o.level == "meso"]
        others = {o.layer for o in obs if o.kind == kind and o.level in ("raw", "micro")}
        covered = names - others
        if macro and not meso and not others:  # the collector's row is already the whole
            out.extend(macro)
            continue
        if not macro and len(meso) < len(names):
            continue
        if others or (not macro and {o.layer for o in meso} != names) or not covered:
            out.extend(replace(o, level="macro-partial") for o in macro)
            continue
        whole = pool_rows([_row(o) for o in macro + meso])
        out.append(Observation(kind, "*", "macro", int(whole[0]), *(float(v) for v in whole[1:])))
    return out
