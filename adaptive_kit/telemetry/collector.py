"""The telemetry collector: hooks on any nn.Module, four granularity levels, Arrow output.

    tel = Telemetry(model, levels="meso")
    for i, (x, y) in enumerate(batches):
        with tel.step(i):
            loss = loss_fn(model(x), y)
            tel.log_loss(loss)
            loss.backward()
        opt.step(); opt.zero_grad()
    tel.close()

For every (kind, layer) whose level is not ``off`` the collector reduces the layer's gradients
(``grad``), parameters (``weight``) or forward output (``act``) to what that level sends; a
forward output on a CPU in its hook (no copy of it is kept), everything else at the end of the
``step`` block, for all layers at once:

- ``raw``: the values themselves; above ``raw_cap`` values, an evenly strided sample of
  ``raw_cap`` of them (every ``ceil(n / raw_cap)``-th entry), with the true count, plus the
  layer's meso statistics.
- ``micro``: moving averages of the values over ``window`` consecutive entries (stride =
  window, so n / window averages), capped like ``raw`` (only the kept blocks are read for
  them), plus the layer's meso statistics.
- ``meso``: the layer's statistics of :data:`adaptive_kit.stats.STAT_NAMES`.
- ``macro``: the same statistics pooled over every layer of the kind at ``macro`` level
  (``layer = "*"``): it cannot say which layer a problem is in.

Every level counts entries and NaN / Inf exactly and sends the exact norm. On a CPU, tensors of
more than :data:`adaptive_kit.stats.SMALL` entries cost one pass (macro: ``dot``) or two
(meso and finer: ``dot`` and ``sum``, so mean and std are exact too); their min, max,
zero fraction (and macro's mean) come from an evenly strided sample of
:data:`adaptive_kit.stats.SAMPLE` entries (see :func:`adaptive_kit.stats.fast_stats`); smaller
tensors are exact. On other devices every statistic is exact (:func:`~adaptive_kit.stats.batched_stats`).
A logged loss is one more row (``kind="loss"``) of the step's statistics batch.

Results move to the host with at most two asynchronous copies per step and are turned into
Arrow record batches (one per level, so bytes per level are exact) a step later, when the
copies have long landed: nothing in the step waits for the device.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from ..records import MemorySink, Sink, register_schema
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


@dataclass(frozen=True)
class TelemetryConfig:
    window: int = 16  # micro: entries per moving average (stride = window)
    raw_cap: int = 4096  # raw and micro: most values sent per (kind, layer) and step
    every: int = 1  # collect on steps where step % every == 0

    def __post_init__(self) -> None:
        for name in ("window", "raw_cap", "every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TelemetryConfig.{name} must be an int >= 1, got {v!r}")


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


class Telemetry:
    """Collects gradients, weights and activations of ``model`` at a level per (kind, layer).

    Args:
        model: any ``nn.Module`` with parameters.
        levels: one level for everything, a mapping kind -> level, or (kind, layer) -> level.
        config: window, raw cap and collection schedule.
        sink: where record batches go (default: a :class:`~adaptive_kit.records.MemorySink`).
        rank: written into every record (the process's rank under torch.distributed).
        act_layers: modules whose outputs count as activations (default: every module with
            parameters of its own, and every activation module such as ``nn.ReLU``).
        on_record: called with each :class:`StepRecord` once its data is on the host
            (detectors and policies hook in here).
        keep_records: how many recent :class:`StepRecord` s to keep in :attr:`records`
            (0: none). The sink keeps everything it is given: for long runs pass a file sink.

    Raises:
        ValueError: the model has no parameters, or a level / kind / layer name is unknown.
    """

    def __init__(self, model: nn.Module, levels: str | Mapping = "meso", *,
                 config: TelemetryConfig = TelemetryConfig(), sink: Sink | None = None,
                 rank: int = 0, act_layers: Iterable[str] | None = None,
                 on_record=None, keep_records: int = 1000) -> None:
        self.model = model
        self.config = config
        self.sink = sink if sink is not None else MemorySink()
        self.rank = rank
        self.on_record = on_record
        modules = dict(model.named_modules())
        self.param_layers = [n or "<root>" for n, m in modules.items()
                             if any(True for _ in m.parameters(recurse=False))]
        if not self.param_layers:
            raise ValueError(f"Telemetry(model={type(model).__name__}): the model has no parameters")
        self._modules = {(n or "<root>"): m for n, m in modules.items()}
        if act_layers is None:
            act_layers = [n for n in self._modules if n in self.param_layers
                          or isinstance(self._modules[n], ACTIVATION_TYPES)]
        act_layers = list(act_layers)
        unknown = [n for n in act_layers if n not in self._modules]
        if unknown:
            raise ValueError(f"Telemetry(act_layers={unknown!r}): no such modules in the model")
        self.layers: dict[str, list[str]] = {"grad": self.param_layers, "weight": self.param_layers,
                                             "act": act_layers}
        self.relu_layers = [n for n in act_layers if isinstance(self._modules[n], RELU_TYPES)]
        self.plan: dict[tuple[str, str], str] = {(k, n): "off" for k in KINDS for n in self.layers[k]}
        self.set_levels(levels)
        self._acts: dict[str, torch.Tensor] = {}
        self._capture = False
        self._handles = [self._modules[n].register_forward_hook(self._make_hook(n)) for n in act_layers]
        self._pending: list[_Pending] = []
        self._loss: torch.Tensor | None = None
        self.bytes: dict[str, int] = {lv: 0 for lv in LEVELS[1:]}
        self.records: list[StepRecord] = []
        self.keep_records = keep_records  # most recent StepRecords kept in .records
        self.steps_collected = 0

    # ---------------------------------------------------------------------------- levels
    def set_levels(self, levels: str | Mapping, kind: str | None = None,
                   layers: Iterable[str] | None = None) -> None:
        """Change levels between steps (hooks stay as they are).

        ``set_levels("raw")`` sets everything; ``set_levels("meso", kind="grad")`` one kind;
        ``set_levels("raw", kind="act", layers=["1"])`` some layers; a mapping sets many
        ((kind -> level) or ((kind, layer) -> level)).
        """
        if isinstance(levels, Mapping):
            for key, level in levels.items():
                if isinstance(key, tuple):
                    self.set_levels(level, kind=key[0], layers=[key[1]])
                else:
                    self.set_levels(level, kind=key)
            return
        if levels not in LEVELS:
            raise ValueError(f"level={levels!r}: expected one of {LEVELS}")
        kinds = KINDS if kind is None else [kind]
        for k in kinds:
            if k not in KINDS:
                raise ValueError(f"kind={k!r}: expected one of {KINDS}")
            names = self.layers[k] if layers is None else list(layers)
            unknown = [n for n in names if (k, n) not in self.plan]
            if unknown:
                raise ValueError(f"layers={unknown!r}: not {k} layers of this model; "
                                 f"known: {self.layers[k]}")
            for n in names:
                self.plan[(k, n)] = levels

    def level(self, kind: str, layer: str) -> str:
        return self.plan[(kind, layer)]

    # ---------------------------------------------------------------------------- hooks
    def _make_hook(self, name: str):
        key = ("act", name)

        def hook(_module: nn.Module, _inputs, output) -> None:
            if not self._capture or not isinstance(output, torch.Tensor):
                return
            level = self.plan[key]
            if level == "off":
                return
            if output.device.type == "cpu":
                # reduce now, while the output is in cache and before a later in-place op
                # (nn.ReLU(inplace=True)) rewrites it: nothing is copied but what is sent
                self._acts[name] = summarise([output], level, self.config, copy=True)
            else:  # one batched pass over every tensor at the step's end costs fewer launches
                self._acts[name] = output.detach().clone()
        return hook

    def close(self) -> None:
        """Turn the last steps into records and remove every hook."""
        self.flush()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ---------------------------------------------------------------------------- steps
    def log_loss(self, loss: torch.Tensor) -> None:
        """Record this step's loss (kept on its device; moved with the step's other data)."""
        self._loss = loss.detach().reshape(())

    @contextmanager
    def step(self, step: int) -> Iterator[Telemetry]:
        """Wrap one training step: forward and backward inside, the optimiser step after."""
        collect = step % self.config.every == 0
        self._acts.clear()
        self._loss = None
        self._capture = collect
        try:
            yield self
        finally:
            self._capture = False
        if collect:
            self._collect(step)
        self._acts.clear()

    def _tensors(self, kind: str, layer: str) -> list[torch.Tensor] | Summary:
        if kind == "act":
            t = self._acts.get(layer)
            return [] if t is None else t if isinstance(t, Summary) else [t]
        params = self._modules[layer].parameters(recurse=False)
        if kind == "weight":
            return [p.detach() for p in params]
        return [p.grad for p in params if p.grad is not None]

    def _collect(self, step: int) -> None:
        items = [(kind, layer, level, self._tensors(kind, layer))
                 for (kind, layer), level in self.plan.items() if level != "off"]
        self._pending.append(aggregate(step, items, self.config, self._loss))
        self.steps_collected += 1
        # materialise what has landed; never wait for the step just queued
        while len(self._pending) > 1 or (self._pending and _ready(self._pending[0])):
            self._emit(self._pending.pop(0))

    def flush(self) -> None:
        """Turn every queued step into records now (waits for the copies)."""
        while self._pending:
            self._emit(self._pending.pop(0))

    def _emit(self, p: _Pending) -> None:
        record = materialise(p, self.rank)
        for level, batch in record.batches.items():
            self.sink.write(batch, stream="telemetry")
            self.bytes[level] += record.bytes[level]
        if self.on_record is not None:
            record.alarms = list(self.on_record(record) or [])
        if self.keep_records:
            self.records.append(record)
            if len(self.records) > self.keep_records:
                del self.records[0]

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
