"""What a level sends: a step's tensors reduced to rows of statistics and values, and those rows
turned into one Arrow record batch per level on the host (see :mod:`.collector` for the rules)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from ..records import register_schema
from ..stats import (
    SMALL,
    STAT_NAMES,
    HostCopy,
    Partial,
    _strided,
    combine_stats,
    partial,
    rows_of,
    tensor_stats,
)

if TYPE_CHECKING:
    from .collector import TelemetryConfig

KINDS: tuple[str, ...] = ("grad", "weight", "act")
LEVELS: tuple[str, ...] = ("off", "macro", "meso", "micro", "raw")  # coarse to fine
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Hardswish,
)

EXTREMA = False  # CPU, tensors above stats.SMALL entries: exact min / max (two more passes) or sampled

RELU_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU)  # dead-unit candidates

TELEMETRY_SCHEMA = pa.schema(
    [("step", pa.int64()), ("time", pa.float64()), ("rank", pa.int32()), ("kind", pa.string()),
     ("layer", pa.string()), ("level", pa.string()), ("count", pa.int64())]
    + [(n, pa.int64() if n == "nonfinite" else pa.float64()) for n in STAT_NAMES[1:]]
    + [("values", pa.list_(pa.float32()))]
)
register_schema("telemetry", TELEMETRY_SCHEMA)


@dataclass
class _Pending:
    step: int
    time: float
    stats_items: list[tuple[str, str, str]]  # (kind, layer, level) per stats row
    macro_kinds: list[str]
    sample_items: list[tuple[str, str, str, int, int]]  # (kind, layer, level, true count, n values)
    f64: HostCopy | None  # stats rows, macro rows, loss
    f32: HostCopy | None  # raw and micro values
    has_loss: bool


@dataclass
class StepRecord:
    """What one collected step produced, on the host."""

    step: int
    batches: dict[str, pa.RecordBatch]  # level -> record batch
    bytes: dict[str, int]  # level -> Arrow IPC bytes
    loss: float | None
    alarms: list = field(default_factory=list)


@dataclass
class Summary:
    """What one (kind, layer) reduces to at its level, before the step's rows are built.

    On a CPU, ``rows`` holds a :func:`~adaptive_kit.stats.fast_stats` row per large tensor,
    computed at once; small tensors (and every tensor on other devices) wait in ``tensors``
    for one :func:`~adaptive_kit.stats.tensor_stats` call over the whole step.
    """

    level: str
    count: int  # entries in the tensors
    rows: list[Partial | list[float]]  # per tensor already reduced: its partial, or its exact row
    tensors: list[torch.Tensor]  # tensors still to reduce
    sample: torch.Tensor | None  # raw / micro: float32 values to send


def summarise(tensors: list[torch.Tensor], level: str, config: TelemetryConfig,
              copy: bool = False) -> Summary | None:
    """Reduce one (kind, layer)'s tensors to what ``level`` sends (None when there are none).

    Args:
        tensors: the layer's tensors (a module's weight and bias, its output).
        level: "macro", "meso", "micro" or "raw".
        config: window and cap of raw and micro.
        copy: copy what waits for the step's end (set in forward hooks: a later in-place op
            may rewrite the output).

    Every level keeps exact entry and non-finite counts, mean, std and norm. On a CPU a macro
    item's large tensors take their extremes from the strided sample (see
    :func:`~adaptive_kit.stats.fast_stats`). Raw and micro compute only the values they send:
    an evenly strided sample, or the means of the blocks of ``window`` entries that the cap
    keeps (the other blocks are never read for it).
    """
    ts = [t.detach() for t in tensors]
    if not ts:
        return None
    sample = None
    if level in ("raw", "micro"):
        flat = ts[0].reshape(-1) if len(ts) == 1 else torch.cat([t.reshape(-1) for t in ts])
        if level == "raw":
            sample = _strided(flat, config.raw_cap).to(torch.float32, copy=True)
        else:
            sample = _sampled_block_means(flat, config.window, config.raw_cap)
    rows, later = [], []
    for t in ts:
        if t.device.type == "cpu":  # small tensors are copied whole and reduced exactly
            rows.append(partial(t, moments=level != "macro", extrema=EXTREMA, whole=SMALL))
        else:
            later.append(t.clone() if copy else t)
    return Summary(level, sum(t.numel() for t in ts), rows, later, sample)


def aggregate(step: int, items: list[tuple[str, str, str, list[torch.Tensor] | Summary]],
              config: TelemetryConfig, loss: torch.Tensor | None = None) -> _Pending:
    """Aggregate (kind, layer, level, tensors or :class:`Summary`) items and start the host copies.

    Every item becomes one row of statistics (macro items one row per kind, pooled over their
    layers), pooled from one row per tensor by one :func:`combine_stats` call; raw and micro
    rows carry values too. At most two asynchronous copies leave the device.
    """
    summaries = []
    for kind, layer, level, ts in items:
        summ = ts if isinstance(ts, Summary) else summarise(ts, level, config)
        if summ is not None:
            summaries.append((kind, layer, summ))
    stats_items = [(k, n, sm.level) for k, n, sm in summaries if sm.level != "macro"]
    macro_kinds = sorted({k for k, _, sm in summaries if sm.level == "macro"}, key=KINDS.index)
    out = {key: i for i, key in enumerate(stats_items)}
    n_rows = len(stats_items) + len(macro_kinds)
    host_rows, host_group, partials, partial_group, sample_items, samples = [], [], [], [], [], []
    later: dict[str, tuple[list[torch.Tensor], list[int]]] = {}  # device type -> tensors, groups
    for kind, layer, sm in summaries:
        g = (len(stats_items) + macro_kinds.index(kind)) if sm.level == "macro" else out[(kind, layer, sm.level)]
        for r in sm.rows:
            (host_rows if isinstance(r, list) else partials).append(r)
            (host_group if isinstance(r, list) else partial_group).append(g)
        for t in sm.tensors:
            ts, gs = later.setdefault(t.device.type, ([], []))
            ts.append(t)
            gs.append(g)
        if sm.sample is not None:
            sample_items.append((kind, layer, sm.level, sm.count, sm.sample.numel()))
            samples.append(sm.sample)
    f64_parts: list[torch.Tensor] = []
    if n_rows:
        parts = [(tensor_stats(ts), gs) for ts, gs in later.values()]
        if partials:
            host_rows = [*host_rows, *rows_of(partials)]
            host_group += partial_group
        if host_rows:
            parts.append((torch.from_numpy(np.array(host_rows, dtype=np.float64)), host_group))
        dev = parts[0][0].device
        rows = torch.cat([r.to(dev) for r, _ in parts]) if len(parts) > 1 else parts[0][0]
        group = _index(tuple(g for _, gs in parts for g in gs), dev)
        f64_parts.append(combine_stats(rows, group, n_rows).reshape(-1))
    if loss is not None:
        f64_parts.append(loss.detach().to(torch.float64).reshape(1))
    devices = {t.device for t in f64_parts + samples}
    if len(devices) > 1:  # e.g. the loss on another device than the model: meet on one
        dev = next(iter(devices))
        f64_parts = [t.to(dev) for t in f64_parts]
        samples = [t.to(dev) for t in samples]
    return _Pending(
        step, time.time(), stats_items, macro_kinds, sample_items,
        HostCopy(torch.cat(f64_parts)) if f64_parts else None,
        HostCopy(torch.cat(samples)) if samples else None,
        loss is not None,
    )


@lru_cache(maxsize=256)
def _index(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An int64 index tensor on the device, made once per layout (no copy per step)."""
    return torch.tensor(values, dtype=torch.int64, device=device)


def materialise(p: _Pending, rank: int = 0) -> StepRecord:
    """Wait for a step's copies and turn them into one record batch per level.

    A logged loss travels as one more row (``kind="loss"``, ``layer="*"``, its statistics as
    of a one-entry tensor, no values) in the step's macro batch, else in its meso batch, else
    alone in a macro batch: always among rows of statistics, never among rows of values.
    """
    f64 = p.f64.wait().numpy() if p.f64 is not None else np.empty(0)
    f32 = p.f32.wait().numpy() if p.f32 is not None else None
    width = len(STAT_NAMES)
    keys = p.stats_items + [(k, "*", "macro") for k in p.macro_kinds]
    stats = f64[:len(keys) * width].reshape(len(keys), width)
    loss = float(f64[len(keys) * width]) if p.has_loss else None
    spans: dict[tuple[str, str, str], tuple[int, int]] = {}
    start = 0
    for kind, layer, level, _count, n in p.sample_items:
        spans[(kind, layer, level)] = (start, n)
        start += n
    by_level: dict[str, list[int]] = {}
    for i, (_, _, level) in enumerate(keys):
        by_level.setdefault(level, []).append(i)
    loss_level = None
    if loss is not None:
        loss_level = "meso" if "meso" in by_level and "macro" not in by_level else "macro"
        by_level.setdefault(loss_level, [])
    batches, sizes = {}, {}
    for level in LEVELS[1:]:
        if level not in by_level:
            continue
        idx = by_level[level]
        rows_keys = [keys[i] for i in idx]
        block = stats[idx]
        values = ([f32[a:a + n] for a, n in (spans[k] for k in rows_keys)]
                  if level in ("raw", "micro") else [None] * len(idx))
        if level == loss_level:
            rows_keys.append(("loss", "*", level))
            block = np.vstack([block, _loss_row(loss)])
            values.append(None)
        batches[level] = _to_batch(rows_keys, block, values, p.step, p.time, rank)
        sizes[level] = pa.ipc.get_record_batch_size(batches[level])
    return StepRecord(p.step, batches, sizes, loss)


def _loss_row(loss: float) -> np.ndarray:
    """The STAT_NAMES row of a one-entry tensor holding ``loss``."""
    if math.isfinite(loss):
        return np.array([1.0, loss, 0.0, loss, loss, abs(loss), 0.0, float(loss == 0)])
    return np.array([1.0, math.nan, math.nan, math.nan, math.nan, 0.0, 1.0, 0.0])


def _ready(p: _Pending) -> bool:
    return all(c is None or c.ready() for c in (p.f64, p.f32))


def _sampled_block_means(flat: torch.Tensor, window: int, cap: int) -> torch.Tensor:
    """``means[::ceil(m / cap)]`` of the ``m`` means of consecutive blocks of ``window`` entries
    (the last block may be shorter), computed from the kept blocks only; float32."""
    n = flat.numel()
    m = -(-n // window)
    stride = -(-m // cap) if m > cap else 1
    full = n // window
    blocks = flat[:full * window].view(full, window)[::stride]
    means = blocks.to(torch.float32).mean(1) if blocks.numel() else flat.new_empty(0, dtype=torch.float32)
    if full < m and (m - 1) % stride == 0:  # the short last block is one of the kept ones
        means = torch.cat([means, flat[full * window:].to(torch.float32).mean().reshape(1)])
    return means


def _to_batch(keys: list[tuple[str, str, str]], stats: np.ndarray, values: list, step: int,
              t: float, rank: int) -> pa.RecordBatch:
    """One record batch from (kind, layer, level) keys, their (n, 8) statistics and values."""
    n = len(keys)
    cols = np.ascontiguousarray(stats.T)  # one contiguous array per statistic
    arrays = [pa.array(np.full(n, step, dtype=np.int64)), pa.array(np.full(n, t)),
              pa.array(np.full(n, rank, dtype=np.int32)), *_key_arrays(tuple(keys))]
    for j, name in enumerate(STAT_NAMES):
        arrays.append(pa.array(cols[j].astype(np.int64) if name in ("count", "nonfinite") else cols[j]))
    if any(v is not None for v in values):
        arrays.append(pa.array(values, type=pa.list_(pa.float32())))
    else:
        arrays.append(pa.nulls(n, type=pa.list_(pa.float32())))
    return pa.RecordBatch.from_arrays(arrays, schema=TELEMETRY_SCHEMA)


@lru_cache(maxsize=256)
def _key_arrays(keys: tuple[tuple[str, str, str], ...]) -> tuple[pa.Array, pa.Array, pa.Array]:
    """The kind, layer and level columns of a plan (the same every step it lasts)."""
    kinds, layers, levels = (list(c) for c in zip(*keys)) if keys else ([], [], [])
    return (pa.array(kinds, type=pa.string()), pa.array(layers, type=pa.string()),
            pa.array(levels, type=pa.string()))
