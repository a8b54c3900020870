"""Per-layer statistics of many tensors at once, on their device, plus EMA and window helpers.

Everything here stays on the device of its inputs: no ``.item()``, no ``.cpu()``. A step's
statistics for all layers come back as one ``(L, 8)`` tensor, moved to the host with one
asynchronous copy (:class:`HostCopy`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
import torch
from torch import nn

STAT_NAMES: tuple[str, ...] = (
    "count",  # number of entries (finite or not)
    "mean",  # mean of the finite entries
    "std",  # population standard deviation (ddof=0) of the finite entries
    "min",  # smallest finite entry
    "max",  # largest finite entry
    "norm",  # L2 norm of the finite entries
    "nonfinite",  # entries that are NaN or +-Inf
    "zero_frac",  # fraction of entries exactly equal to zero
)
STAT_INDEX: dict[str, int] = {name: i for i, name in enumerate(STAT_NAMES)}

TensorGroup = torch.Tensor | Sequence[torch.Tensor]


def _as_groups(tensors: Sequence[TensorGroup] | Mapping[str, TensorGroup]) -> list[list[torch.Tensor]]:
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(enumerate(tensors))
    groups: list[list[torch.Tensor]] = []
    for key, item in items:
        try:
            group = [item] if isinstance(item, torch.Tensor) else list(item)
        except TypeError:  # not iterable (None, a number): name the key, as below
            raise TypeError(
                f"tensors[{key!r}]: expected a torch.Tensor or a list of them, got {type(item).__name__}"
            ) from None
        for t in group:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"tensors[{key!r}]: expected a torch.Tensor, got {type(t).__name__}")
            if t.is_complex():
                raise TypeError(f"tensors[{key!r}]: complex dtype {t.dtype} is not supported")
        groups.append(group)
    return groups


CHUNK = 256  # entries per row of the padded layout; rows never straddle two layers
CPU_BLOCK_ROWS = 256  # rows per block on CPU (64K entries: fits in cache)


@lru_cache(maxsize=64)
def _layout(lengths: tuple[int, ...], device: torch.device) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Padding per layer, layer id per row and entry count per layer, cached per layout."""
    rows = [-(-n // CHUNK) for n in lengths]
    pads = [r * CHUNK - n for r, n in zip(rows, lengths)]
    row_layer = torch.repeat_interleave(
        torch.arange(len(lengths), device=device),
        torch.tensor(rows, dtype=torch.int64, device=device),
        output_size=sum(rows),
    )
    counts = torch.tensor(lengths, dtype=torch.int64, device=device)
    return pads, row_layer, counts


def _row_partials(x: torch.Tensor) -> torch.Tensor:
    """Per row of ``x`` (R, C): finite count, mean, squared deviations, squares, zeros, min, max."""
    inf = float("inf")
    x0 = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    finite = (x0 == x).to(x.dtype)  # 1.0 where x is finite: NaN and +-Inf became 0
    n = finite.sum(1)  # exact: a row holds at most CHUNK entries
    mean = x0.sum(1) / n.clamp(min=1)
    dev = (x0 - mean[:, None]) * finite  # two passes: stable for large offsets
    zeros = (x == 0).sum(1, dtype=x.dtype)  # NaN padding is not zero
    lo = torch.nan_to_num(x, nan=inf, neginf=inf).amin(1)
    hi = torch.nan_to_num(x, nan=-inf, posinf=-inf).amax(1)
    return torch.stack([n, mean, (dev * dev).sum(1), (x0 * x0).sum(1), zeros, lo, hi])  # (7, R)


def _row_partials_cpu(x: torch.Tensor) -> torch.Tensor:
    """:func:`_row_partials` with a fast path for all-finite rows (most of them).

    Finite rows need no masking: plain row reductions (the ones CPU kernels vectorise) give
    every partial. Rows whose sums come out non-finite (NaN padding, real NaN/Inf) go through
    the masked path. Choosing them reads a result on the host, which costs nothing on a CPU,
    so this path is for CPUs only.
    """
    if x.shape[0] == 0:
        return _row_partials(x)
    c = x.shape[1]
    total = x.sum(1)
    mean = total / c
    dev = x - mean[:, None]
    n = torch.full_like(mean, c)
    zeros = c - torch.sign(x).abs().sum(1)  # sign is 0 only at 0
    out = torch.stack([n, mean, dev.square().sum(1), x.square().sum(1), zeros, x.amin(1), x.amax(1)])
    bad = torch.nonzero(~torch.isfinite(out[3] + total)).squeeze(1)
    if bad.numel():
        out[:, bad] = _row_partials(x[bad])
    return out


def batched_stats(tensors: Sequence[TensorGroup] | Mapping[str, TensorGroup]) -> torch.Tensor:
    """Statistics of every layer in one pass, on the layers' device.

    All layers are laid back to back in one buffer of rows of :data:`CHUNK` entries, each
    layer padded with NaN to whole rows; dense row reductions then a tiny per-layer
    combination (Chan et al.'s pairwise variance update) give every statistic with a fixed
    number of kernels, whatever the number of layers.

    Args:
        tensors: one entry per layer; an entry is a tensor or a list of tensors (say a
            module's weight and bias) that are summarised together. A mapping's keys are
            used only in error messages.

    Returns:
        A float64 tensor of shape ``(L, len(STAT_NAMES))`` on the inputs' device, columns in
        :data:`STAT_NAMES` order. Moments, min, max and norm cover the finite entries only;
        ``nonfinite`` counts the rest. With no finite entry, mean/std/min/max are NaN and
        norm is 0; an empty layer also has NaN ``zero_frac``. Counts are exact.

    Raises:
        TypeError: an entry is not a tensor, or is complex.
        ValueError: no layers were given, or the tensors live on different devices.
    """
    groups = _as_groups(tensors)
    if not groups:
        raise ValueError("batched_stats(tensors=[]): need at least one layer")
    devices = {t.device for g in groups for t in g}
    if len(devices) > 1:
        raise ValueError(f"batched_stats: tensors live on several devices {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    acc = torch.float64 if any(t.dtype == torch.float64 for g in groups for t in g) else torch.float32
    lengths = tuple(sum(t.numel() for t in g) for g in groups)
    pads, row_layer, counts = _layout(lengths, device)
    n_layers = len(groups)

    nan_pad = torch.full((CHUNK,), float("nan"), dtype=acc, device=device)
    parts: list[torch.Tensor] = []
    for group, pad in zip(groups, pads):
        parts.extend(t.detach().reshape(-1).to(acc) for t in group)
        if pad:
            parts.append(nan_pad[:pad])
    x = torch.cat(parts).view(-1, CHUNK) if parts else nan_pad[:0].view(0, CHUNK)  # (R, C)

    # On a GPU one pass over all rows costs a fixed number of kernel launches. On a CPU a launch
    # is free but memory traffic is not: blocks of rows keep the ~15 passes in cache.
    cpu = device.type == "cpu"
    step = CPU_BLOCK_ROWS if cpu else max(x.shape[0], 1)
    rows = _row_partials_cpu if cpu else _row_partials
    partials = torch.cat([rows(x[i:i + step]) for i in range(0, max(x.shape[0], 1), step)], dim=1)
    n_row, mean_row, m2_row, sq_row, zero_row, lo_row, hi_row = partials
    n_row = n_row.to(torch.int64)  # exact: at most CHUNK per row

    def per_layer(v: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_layers, dtype=v.dtype, device=device).index_add_(0, row_layer, v)

    n_fin = per_layer(n_row)  # (L,) int64
    nf = n_fin.to(acc)
    mean = per_layer(mean_row * n_row) / nf  # NaN where a layer has no finite entry
    shift = mean_row - mean[row_layer]
    m2 = per_layer(m2_row + n_row * shift * shift)
    zero_row = zero_row.to(torch.int64)
    lo = torch.full((n_layers,), float("inf"), dtype=acc, device=device)
    hi = torch.full((n_layers,), float("-inf"), dtype=acc, device=device)
    lo = lo.scatter_reduce(0, row_layer, lo_row, "amin")
    hi = hi.scatter_reduce(0, row_layer, hi_row, "amax")
    none = n_fin == 0

    f64 = torch.float64  # one dtype for one transfer; exact integer counts up to 2**53
    c64 = counts.to(f64)
    return torch.stack(
        [
            c64,
            mean.to(f64),
            torch.sqrt(m2 / nf).to(f64),
            lo.masked_fill(none, float("nan")).to(f64),
            hi.masked_fill(none, float("nan")).to(f64),
            torch.sqrt(per_layer(sq_row)).to(f64),
            (counts - n_fin).to(f64),
            per_layer(zero_row).to(f64) / c64,
        ],
        dim=1,
    )


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
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise ValueError(f"fast_stats(sample={sample!r}): must be an int >= 1")
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


class HostCopy:
    """A device tensor on its way to host memory: started at once, waited for only on demand.

    On CUDA the copy goes into pinned memory with ``non_blocking=True`` and an event marks its
    end, so creating a ``HostCopy`` never stalls the step; on CPU it is a plain snapshot.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self._event = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(tensor.device))
        else:
            self._host = tensor.clone()

    def ready(self) -> bool:
        """True when the copy has landed and :meth:`wait` will not block."""
        return self._event is None or self._event.query()

    def wait(self) -> torch.Tensor:
        """Block until the copy has landed; return the host tensor."""
        if self._event is not None:
            self._event.synchronize()
        return self._host


def module_tensors(
    model: nn.Module, kind: str = "grad", by: str = "module"
) -> dict[str, list[torch.Tensor]]:
    """The gradients or weights of a model, grouped per module (default) or per parameter.

    Parameters without a gradient are skipped for ``kind="grad"``.

    Raises:
        ValueError: ``kind`` is not "grad" or "weight", or ``by`` not "module" or "parameter".
    """
    if kind not in ("grad", "weight"):
        raise ValueError(f"module_tensors(kind={kind!r}): expected 'grad' or 'weight'")
    if by not in ("module", "parameter"):
        raise ValueError(f"module_tensors(by={by!r}): expected 'module' or 'parameter'")
    out: dict[str, list[torch.Tensor]] = {}
    for pname, p in model.named_parameters():
        t = p.grad if kind == "grad" else p
        if t is None:
            continue
        key = pname if by == "parameter" else (pname.rpartition(".")[0] or pname)
        out.setdefault(key, []).append(t)
    return out


def layer_stats(tensors: Mapping[str, TensorGroup]) -> pd.DataFrame:
    """:func:`batched_stats` as a pandas DataFrame indexed by layer name (waits for the host copy).

    Meant for notebooks and analysis; training loops keep :func:`batched_stats` on device.
    """
    values = HostCopy(batched_stats(tensors)).wait()
    frame = pd.DataFrame(values.numpy(), index=list(tensors.keys()), columns=list(STAT_NAMES))
    for col in ("count", "nonfinite"):
        frame[col] = frame[col].astype("int64")
    frame.index.name = "layer"
    return frame


class EMA:
    """Exponential moving average of a tensor, kept on its device, bias-corrected per entry.

    Non-finite entries of an update are skipped (the average and its weight keep their old
    value there), so one NaN does not poison the average; :attr:`skipped` counts them on device.
    """

    def __init__(self, beta: float) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMA.beta must be in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self._num: torch.Tensor | None = None
        self._den: torch.Tensor | None = None
        self.skipped: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Fold ``x`` into the average and return the corrected average."""
        x = x.detach()
        if not x.is_floating_point():
            x = x.to(torch.float32)
        if self._num is None:
            self._num = torch.zeros_like(x)
            self._den = torch.zeros_like(x)
            self.skipped = torch.zeros((), dtype=torch.int64, device=x.device)
        elif x.shape != self._num.shape:
            raise ValueError(f"EMA.update: x.shape={tuple(x.shape)} != {tuple(self._num.shape)}")
        ok = torch.isfinite(x)
        b = self.beta
        self._num = torch.where(ok, self._num * b + (1 - b) * torch.where(ok, x, 0.0), self._num)
        self._den = torch.where(ok, self._den * b + (1 - b), self._den)
        self.skipped += (~ok).sum()
        return self.value

    @property
    def value(self) -> torch.Tensor:
        """The bias-corrected average; NaN where no finite value has arrived yet."""
        if self._num is None:
            raise RuntimeError("EMA.value: no update yet")
        return self._num / self._den


class MovingWindow:
    """The last ``size`` values of a tensor in a ring buffer on its device.

    Non-finite values are stored as NaN and left out of :meth:`mean` and :meth:`std`.
    """

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"MovingWindow.size must be an int >= 1, got {size!r}")
        self.size = size
        self.pushed = 0  # host counter: how many values went in
        self._buf: torch.Tensor | None = None

    def push(self, x: torch.Tensor) -> None:
        """Append ``x``, evicting the oldest value once the window is full."""
        x = x.detach()
        if self._buf is None:
            dtype = x.dtype if x.is_floating_point() else torch.float32
            self._buf = torch.full((self.size, *x.shape), float("nan"), dtype=dtype, device=x.device)
        elif x.shape != self._buf.shape[1:]:
            raise ValueError(
                f"MovingWindow.push: x.shape={tuple(x.shape)} != {tuple(self._buf.shape[1:])}"
            )
        self._buf[self.pushed % self.size] = torch.where(torch.isfinite(x), x, float("nan"))
        self.pushed += 1

    def values(self) -> torch.Tensor:
        """The stored values, oldest first: shape ``(min(pushed, size), *x.shape)``."""
        if self._buf is None:
            raise RuntimeError("MovingWindow: nothing pushed yet")
        n = min(self.pushed, self.size)
        start = self.pushed % self.size if self.pushed > self.size else 0
        return torch.roll(self._buf, -start, dims=0)[:n]

    def mean(self) -> torch.Tensor:
        """Mean over the window of the finite values, per entry."""
        return torch.nanmean(self.values(), dim=0)

    def std(self) -> torch.Tensor:
        """Population standard deviation over the window of the finite values, per entry."""
        v = self.values()
        return torch.sqrt(torch.nanmean((v - torch.nanmean(v, dim=0)) ** 2, dim=0))


def combine_stats(values: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Pool rows of :func:`batched_stats` into ``n_groups`` rows, exactly, on their device.

    Args:
        values: ``(N, 8)`` statistics, as from :func:`batched_stats`.
        group: ``(N,)`` int64 group index of every row, in ``[0, n_groups)``.
        n_groups: number of output rows.

    Returns:
        ``(n_groups, 8)`` float64: the statistics of the union of each group's entries, as if
        :func:`batched_stats` had seen them as one layer (Chan et al.'s pooled variance).
    """
    if values.dim() != 2 or values.shape[1] != len(STAT_NAMES):
        raise ValueError(f"combine_stats(values.shape={tuple(values.shape)}): expected (N, {len(STAT_NAMES)})")
    if group.shape != values.shape[:1]:
        raise ValueError(f"combine_stats(group.shape={tuple(group.shape)}): expected ({values.shape[0]},)")
    if values.device.type == "cpu":  # numpy: ~1 us per call on these tiny arrays, torch ~3 us
        return torch.from_numpy(_combine_np(values.detach().to(torch.float64).numpy(),
                                            group.numpy(), n_groups))
    v = values.to(torch.float64)
    count, mean, std, lo, hi, norm, nonfinite, zero_frac = v.unbind(1)
    n = count - nonfinite  # finite entries per row

    def gsum(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, group, x)

    has = n > 0
    n_g = gsum(n)
    mean_g = gsum(torch.where(has, n * mean, 0.0)) / n_g
    m2 = torch.where(has, n * (std * std + (mean - mean_g[group]) ** 2), 0.0)
    inf = torch.full((n_groups,), float("inf"), dtype=v.dtype, device=v.device)
    lo_g = inf.scatter_reduce(0, group, torch.where(has, lo, float("inf")), "amin")
    hi_g = (-inf).scatter_reduce(0, group, torch.where(has, hi, float("-inf")), "amax")
    none = n_g == 0
    count_g = gsum(count)
    return torch.stack([
        count_g, mean_g, torch.sqrt(gsum(m2) / n_g),
        lo_g.masked_fill(none, float("nan")), hi_g.masked_fill(none, float("nan")),
        torch.sqrt(gsum(norm * norm)), gsum(nonfinite),
        gsum(torch.nan_to_num(zero_frac) * count) / count_g,
    ], dim=1)


def _combine_np(v: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """:func:`combine_stats` in numpy (host rows)."""
    count, mean, std, lo, hi, norm, nonfinite, zero_frac = v.T
    n = count - nonfinite
    has = n > 0

    def gsum(x: np.ndarray) -> np.ndarray:
        return np.bincount(group, weights=x, minlength=n_groups)

    n_g = gsum(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_g = gsum(np.where(has, n * mean, 0.0)) / n_g
        m2 = np.where(has, n * (std * std + (mean - mean_g[group]) ** 2), 0.0)
        lo_g = np.full(n_groups, np.inf)
        hi_g = np.full(n_groups, -np.inf)
        np.minimum.at(lo_g, group, np.where(has, lo, np.inf))
        np.maximum.at(hi_g, group, np.where(has, hi, -np.inf))
        none = n_g == 0
        count_g = gsum(count)
        return np.stack([
            count_g, mean_g, np.sqrt(gsum(m2) / n_g), np.where(none, np.nan, lo_g),
            np.where(none, np.nan, hi_g), np.sqrt(gsum(norm * norm)), gsum(nonfinite),
            gsum(np.nan_to_num(zero_frac) * count) / count_g,
        ], axis=1)
