"""CPU statistics in one pass: exact counts, moments and norms; extremes from a strided sample."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..checks import check_int
from .batched import STAT_INDEX, STAT_NAMES, batched_stats

SAMPLE = 4096  # entries of the evenly strided sample behind sampled statistics (see fast_stats)
LARGE = 1 << 16  # entries above which torch.sum beats numpy's sum
WELL_CONDITIONED = 1 / 16  # one-pass variance is kept while var >= this x mean square (see fast_stats)


def _strided(flat: torch.Tensor, cap: int) -> torch.Tensor:
    """Every ``ceil(n / cap)``-th entry of a 1-D tensor (a view; all of it when n <= cap)."""
    n = flat.numel()
    return flat[:: -(-n // cap)] if n > cap else flat


@dataclass
class Partial:
    """One large CPU tensor's single-pass reductions and its sample; :func:`rows_of` makes rows."""

    n: int  # entries
    sq: float | None  # exact sum of squares (None: the sample is the whole tensor; from it)
    total: float | None  # exact sum (None: estimated from the sample)
    var: float | None  # variance recomputed around the mean where the one-pass formula cancels
    lo: float | None  # exact extremes (None: the sample's)
    hi: float | None
    sample: np.ndarray  # the evenly strided sample (its own copy)


def partial(x: torch.Tensor, moments: bool = True, extrema: bool = False,
            sample: int = SAMPLE, whole: int = 0) -> Partial | list[float]:
    """The reductions :func:`fast_stats` needs from a CPU tensor, or its exact row when it holds a
    NaN / Inf (or is empty). The sample is copied: the tensor may change afterwards. A tensor of
    at most ``whole`` entries is copied whole and reduced exactly by :func:`rows_of`."""
    n = x.numel()
    if n == 0:
        return [0.0, math.nan, math.nan, math.nan, math.nan, 0.0, 0.0, math.nan]
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)  # half, bfloat16, integers, bool: as batched_stats accumulates them
    # numpy, not torch: a numpy reduction costs ~1 us to call, a torch op ~3 us; torch's sum is
    # the faster one on large float32 tensors
    flat = x.numpy().reshape(-1)  # a view when contiguous
    if n <= whole:  # small: reduced exactly with the other samples by rows_of
        return Partial(n, None, None, None, None, None, flat.copy())
    with np.errstate(invalid="ignore", over="ignore"):  # NaN / Inf: counted exactly below
        sq = float(np.dot(flat, flat))  # one pass: exact norm, and a NaN / Inf anywhere propagates
        total = (float(x.sum()) if n > LARGE else float(flat.sum())) if moments else None
    lo = hi = var = None
    if extrema:
        lo, hi = float(flat.min()), float(flat.max())
    if not math.isfinite(sq + (total or 0.0) + (lo or 0.0) + (hi or 0.0)):
        return batched_stats([x])[0].tolist()  # NaN / Inf inside, or an overflow: count exactly
    if total is not None and sq / n - (total / n) ** 2 < WELL_CONDITIONED * (sq / n):
        d = flat - flat.dtype.type(total / n)  # |mean| >> std: E[x^2] - E[x]^2 cancels
        var = max(float(np.dot(d, d)) / n - (float(d.sum()) / n) ** 2, 0.0)
    smp = np.array(flat[:: -(-n // sample)] if n > sample else flat)
    return Partial(n, sq, total, var, lo, hi, smp)


def rows_of(partials: Sequence[Partial]) -> np.ndarray:
    """:data:`STAT_NAMES` rows ``(N, 8)`` of :func:`partial` results, the samples reduced together
    (a fixed number of numpy calls for all of them)."""
    if not partials:
        return np.empty((0, len(STAT_NAMES)))
    k = np.array([p.sample.size for p in partials])
    starts = np.concatenate([[0], np.cumsum(k)[:-1]])
    with np.errstate(invalid="ignore", over="ignore"):  # NaN / Inf of small tensors: handled below
        return _rows_of(partials, k, starts)


def _rows_of(partials: Sequence[Partial], k: np.ndarray, starts: np.ndarray) -> np.ndarray:
    buf = np.concatenate([p.sample for p in partials])
    b64 = buf.astype(np.float64)
    s_sum = np.add.reduceat(b64, starts)
    s_lo, s_hi = np.minimum.reduceat(buf, starts), np.maximum.reduceat(buf, starts)
    zeros = k - np.add.reduceat(buf != 0, starts)
    whole = np.array([p.sq is None for p in partials])
    n = np.array([p.n for p in partials], dtype=np.float64)
    sq = np.array([math.nan if p.sq is None else p.sq for p in partials])
    total = np.array([math.nan if p.total is None else p.total for p in partials])
    if whole.any():
        s_sq = np.add.reduceat(b64 * b64, starts)
        sq = np.where(whole, s_sq, sq)
        total = np.where(whole, s_sum, total)
    total = np.where(np.isnan(total), s_sum * n / k, total)  # no exact sum: the sample's mean
    mean = total / n
    var = sq / n - mean * mean
    out = np.stack([n, mean, var, s_lo, s_hi, np.sqrt(sq), np.zeros_like(n), zeros / k], axis=1)
    for i, p in enumerate(partials):
        if p.lo is not None:
            out[i, 3], out[i, 4] = p.lo, p.hi
        if p.var is not None:
            out[i, 2] = p.var
        elif not (math.isfinite(s_sum[i]) and math.isfinite(sq[i])):  # a NaN / Inf in a whole (small) tensor
            out[i] = small_stats([torch.from_numpy(p.sample)])[0]
            out[i, 2] = out[i, 2] ** 2
        elif out[i, 2] < (1e-8 if whole[i] else WELL_CONDITIONED) * sq[i] / n[i]:
            out[i, 2] = float(p.sample.astype(np.float64).var())  # two passes over the sample
    out[:, 2] = np.sqrt(np.maximum(out[:, 2], 0.0))
    return out


def fast_stats(x: torch.Tensor, extrema: bool = True, sample: int = SAMPLE, moments: bool = True) -> list[float]:
    """The :data:`STAT_NAMES` row of one CPU tensor from a few single-pass reductions.

    On a CPU, reductions that write nothing (``sum``, ``dot``, ``min``, ``max``) run near memory
    speed, while every element-wise temporary (masks, ``nan_to_num``, comparisons) costs a full
    write and is several times dearer. So the row comes from ``dot(x, x)``, (``moments``) ``sum``
    and (``extrema``) ``min`` and ``max`` over the whole tensor, plus an evenly strided sample of
    at most ``sample`` entries:

    - exact: ``count``, ``norm`` and ``nonfinite`` (a NaN or Inf anywhere makes the sum of
      squares non-finite, and such a tensor is recomputed by :func:`batched_stats`, which
      counts them); with ``moments`` also ``mean`` and ``std`` (from the sum and the sum of
      squares while the variance is at least :data:`WELL_CONDITIONED` x the mean square; below
      that, where the one-pass formula cancels, recomputed around the mean); with ``extrema``
      also ``min`` and ``max``;
    - from the sample (all exact when ``x.numel() <= sample``): ``zero_frac`` always; ``min``
      and ``max`` without ``extrema`` (the sample's extremes: never beyond the true ones);
      without ``moments`` the mean (the sample's), and the std from the exact sum of squares
      around that mean (the sample's std where that cancels).

    Exact values equal :func:`batched_stats` up to float rounding of the accumulation dtype
    (float64 for float64 input, else float32). Reading the result on the host is free on a CPU
    (nothing to wait for); on other devices use :func:`batched_stats`, which never leaves it.
    Many tensors: :func:`partial` each, then one :func:`rows_of`.

    Raises:
        ValueError: ``x`` is not on the CPU, or ``sample < 1``.
    """
    if x.device.type != "cpu":
        raise ValueError(f"fast_stats(x.device={x.device}): CPU tensors only; use batched_stats")
    check_int("fast_stats(sample)", sample, 1)
    p = partial(x, moments, extrema, sample)
    return p if isinstance(p, list) else rows_of([p])[0].tolist()


SMALL = 1 << 11  # entries up to which tensor_stats batches tensors into one exact numpy pass


def small_stats(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """Exact :data:`STAT_NAMES` rows of many small CPU tensors in one float64 numpy pass.

    The tensors are laid back to back in one float64 buffer and reduced per segment
    (``ufunc.reduceat``), with NaN / Inf masked out of the moments and counted: a fixed number
    of numpy calls whatever the number of tensors (which per-tensor calls would pay for each).
    Meant for tensors of up to :data:`SMALL` entries (the buffer is a copy).

    Returns:
        A float64 array ``(N, 8)``; empty tensors get the row :func:`batched_stats` gives them.
    """
    out = np.full((len(tensors), len(STAT_NAMES)), np.nan)
    out[:, STAT_INDEX["count"]] = out[:, STAT_INDEX["norm"]] = out[:, STAT_INDEX["nonfinite"]] = 0.0
    arrays = []
    for t in tensors:
        t = t.detach()
        if t.dtype not in (torch.float32, torch.float64):
            t = t.to(torch.float64)
        arrays.append(t.numpy().reshape(-1))
    keep = [i for i, a in enumerate(arrays) if a.size]
    if not keep:
        return out
    lengths = np.array([arrays[i].size for i in keep])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    x = np.concatenate([arrays[i] for i in keep], dtype=np.float64)
    n = lengths.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        total = np.add.reduceat(x, starts)
        sq = np.add.reduceat(x * x, starts)
        mean = total / n
        var = sq / n - mean * mean  # float64 moments of float32 (or float64) entries
        # NaN / Inf anywhere, or a variance the one-pass formula cannot resolve: mask and two passes
        if not (np.isfinite(total + sq).all() and (var >= 1e-8 * (sq / n)).all()):
            return _small_stats_masked(x, starts, lengths, keep, out)
    out[keep] = np.stack([
        n, mean, np.sqrt(var), np.minimum.reduceat(x, starts), np.maximum.reduceat(x, starts),
        np.sqrt(sq), np.zeros_like(n), np.add.reduceat(x == 0, starts) / n,
    ], axis=1)
    return out


def _small_stats_masked(x: np.ndarray, starts: np.ndarray, lengths: np.ndarray, keep: list[int],
                        out: np.ndarray) -> np.ndarray:
    """:func:`small_stats` for buffers with NaN / Inf or near-constant segments: masked, two passes."""
    fin = np.isfinite(x)
    x0 = np.where(fin, x, 0.0)
    n_fin = np.add.reduceat(fin, starts).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.add.reduceat(x0, starts) / n_fin  # NaN where no entry is finite
        d = np.where(fin, x - np.repeat(mean, lengths), 0.0)
        std = np.sqrt(np.add.reduceat(d * d, starts) / n_fin)
    lo = np.minimum.reduceat(np.where(fin, x, np.inf), starts)
    hi = np.maximum.reduceat(np.where(fin, x, -np.inf), starts)
    none = n_fin == 0
    out[keep] = np.stack([
        lengths.astype(np.float64), mean, std, np.where(none, np.nan, lo), np.where(none, np.nan, hi),
        np.sqrt(np.add.reduceat(x0 * x0, starts)), lengths - n_fin,
        np.add.reduceat(x == 0, starts) / lengths,
    ], axis=1)
    return out


def tensor_stats(tensors: Sequence[torch.Tensor], extrema: bool = True, sample: int = SAMPLE) -> torch.Tensor:
    """One :data:`STAT_NAMES` row per tensor, float64 ``(N, 8)`` on the tensors' device.

    On a CPU, tensors of up to :data:`SMALL` entries are reduced exactly (in float64) and larger
    ones as by :func:`fast_stats` (sampled ``zero_frac``, and sampled extremes unless
    ``extrema``), all samples in one :func:`rows_of` pass; elsewhere one :func:`batched_stats` call (exact, no host
    synchronisation).

    Raises:
        ValueError: no tensors were given.
    """
    ts = list(tensors)
    if not ts:
        raise ValueError("tensor_stats(tensors=[]): need at least one tensor")
    if ts[0].device.type != "cpu":
        return batched_stats([[t] for t in ts])
    out = np.empty((len(ts), len(STAT_NAMES)))
    parts = [partial(t, True, extrema, sample, whole=SMALL) for t in ts]
    done = [i for i, p in enumerate(parts) if isinstance(p, list)]
    if done:
        out[done] = np.array([parts[i] for i in done])
    rest = [i for i, p in enumerate(parts) if not isinstance(p, list)]
    if rest:
        out[rest] = rows_of([parts[i] for i in rest])
    return torch.from_numpy(out)
