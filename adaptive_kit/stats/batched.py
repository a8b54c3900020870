"""Per-layer statistics of many tensors at once, on their device: one ``(L, 8)`` tensor per call."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

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
