"""The telemetry collector: hooks on any nn.Module, four granularity levels, Arrow output.

    tel = Telemetry(model, levels="meso")
    for i, (x, y) in enumerate(batches):
        with tel.step(i):
            loss = loss_fn(model(x), y)
            tel.log_loss(loss)
            loss.backward()
        opt.step(); opt.zero_grad()
    tel.close()

At the end of each ``step`` block the collector reads, for every (kind, layer) whose level is
not ``off``, the layer's gradients (``grad``), parameters (``weight``) or forward output
(``act``) and aggregates them at that level, on their device, for all layers at once:

- ``raw``: the values themselves; above ``raw_cap`` values, an evenly strided sample of
  ``raw_cap`` of them (every ``ceil(n / raw_cap)``-th entry), with the true count.
- ``micro``: moving averages of the values over ``window`` consecutive entries (stride =
  window, so n / window averages), capped like ``raw``.
- ``meso``: the layer's statistics of :data:`adaptive_kit.stats.STAT_NAMES`.
- ``macro``: the same statistics pooled over every layer of the kind at ``macro`` level
  (``layer = "*"``): it cannot say which layer a problem is in.

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

import pyarrow as pa
import torch
from torch import nn

from ..records import MemorySink, Sink, register_schema
from ..stats import STAT_NAMES, HostCopy, batched_stats, combine_stats

KINDS: tuple[str, ...] = ("grad", "weight", "act")
LEVELS: tuple[str, ...] = ("off", "macro", "meso", "micro", "raw")  # coarse to fine
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Hardswish,
)

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
        def hook(_module: nn.Module, _inputs, output) -> None:
            if self._capture and self.plan[("act", name)] != "off" and isinstance(output, torch.Tensor):
                # a copy: a later in-place op (nn.ReLU(inplace=True)) would rewrite the output
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

    def _tensors(self, kind: str, layer: str) -> list[torch.Tensor]:
        if kind == "act":
            t = self._acts.get(layer)
            return [] if t is None else [t]
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


def aggregate(step: int, items: list[tuple[str, str, str, list[torch.Tensor]]],
              config: TelemetryConfig, loss: torch.Tensor | None = None) -> _Pending:
    """Aggregate (kind, layer, level, tensors) items on their device and start the host copies.

    Meso and macro items share one :func:`batched_stats` call; raw and micro items become one
    buffer of (sampled) values. At most two asynchronous copies leave the device.
    """
    stats_items, stats_tensors, sample_items, samples = [], [], [], []
    cap, window = config.raw_cap, config.window
    for kind, layer, level, ts in items:
        if not ts:
            continue
        if level in ("meso", "macro"):
            stats_items.append((kind, layer, level))
            stats_tensors.append(ts)
            continue
        flat = torch.cat([t.detach().reshape(-1).float() for t in ts])
        if level == "micro":
            flat = _block_means(flat, window)
        n = flat.numel()
        sample = flat[:: math.ceil(n / cap)] if n > cap else flat
        sample_items.append((kind, layer, level, sum(t.numel() for t in ts), sample.numel()))
        samples.append(sample)
    f64_parts: list[torch.Tensor] = []
    macro_kinds: list[str] = []
    if stats_tensors:
        values = batched_stats(stats_tensors)  # (N, 8): all kinds and layers at once
        f64_parts.append(values.reshape(-1))
        macro_kinds = sorted({k for k, _, lv in stats_items if lv == "macro"}, key=KINDS.index)
        if macro_kinds:
            rows = [i for i, (_, _, lv) in enumerate(stats_items) if lv == "macro"]
            key = tuple(macro_kinds.index(stats_items[i][0]) for i in rows)
            rows_t, group = _macro_index(tuple(rows), key, values.device)
            f64_parts.append(combine_stats(values[rows_t], group, len(macro_kinds)).reshape(-1))
    if loss is not None:
        f64_parts.append(loss.detach().to(torch.float64).reshape(1))
    devices = {t.device for t in f64_parts + samples}
    if len(devices) > 1:  # e.g. the loss on another device than the model: meet on one
        dev = next(iter(devices))
        f64_parts = [t.to(dev) for t in f64_parts]
        samples = [t.to(dev) for t in samples]
    return _Pending(
        step, time.time(), stats_items, macro_kinds, sample_items,
        HostCopy(torch.cat([t.to(torch.float64) for t in f64_parts])) if f64_parts else None,
        HostCopy(torch.cat(samples)) if samples else None,
        loss is not None,
    )


@lru_cache(maxsize=64)
def _macro_index(rows: tuple[int, ...], group: tuple[int, ...], device: torch.device):
    """Row and group index tensors on the device, made once per layout (no copy per step)."""
    return (torch.tensor(rows, dtype=torch.int64, device=device),
            torch.tensor(group, dtype=torch.int64, device=device))


def materialise(p: _Pending, rank: int = 0) -> StepRecord:
    """Wait for a step's copies and turn them into one record batch per level."""
    f64 = p.f64.wait().numpy() if p.f64 is not None else None
    f32 = p.f32.wait().numpy() if p.f32 is not None else None
    width = len(STAT_NAMES)
    rows: dict[str, list[dict]] = {}
    for i, (kind, layer, level) in enumerate(p.stats_items):
        if level == "meso":
            rows.setdefault("meso", []).append(_stats_row(kind, layer, "meso", f64[i * width:(i + 1) * width]))
    off = len(p.stats_items) * width
    for j, kind in enumerate(p.macro_kinds):
        rows.setdefault("macro", []).append(
            _stats_row(kind, "*", "macro", f64[off + j * width:off + (j + 1) * width]))
    off += len(p.macro_kinds) * width
    loss = float(f64[off]) if p.has_loss else None
    start = 0
    for kind, layer, level, count, n in p.sample_items:
        rows.setdefault(level, []).append({"kind": kind, "layer": layer, "level": level,
                                           "count": count, "values": f32[start:start + n]})
        start += n
    batches, sizes = {}, {}
    for level in LEVELS[1:]:
        if level in rows:
            batches[level] = _to_batch(rows[level], p.step, p.time, rank)
            sizes[level] = pa.ipc.get_record_batch_size(batches[level])
    return StepRecord(p.step, batches, sizes, loss)


def _ready(p: _Pending) -> bool:
    return all(c is None or c.ready() for c in (p.f64, p.f32))


def _block_means(flat: torch.Tensor, window: int) -> torch.Tensor:
    """Means of consecutive blocks of ``window`` entries (the last block may be shorter)."""
    n = flat.numel()
    full = n // window * window
    means = flat[:full].view(-1, window).mean(1)
    if full < n:
        means = torch.cat([means, flat[full:].mean().reshape(1)])
    return means


def _stats_row(kind: str, layer: str, level: str, v) -> dict:
    row = {"kind": kind, "layer": layer, "level": level, "count": int(v[0]), "values": None}
    for i, name in enumerate(STAT_NAMES[1:], start=1):
        row[name] = int(v[i]) if name == "nonfinite" else float(v[i])
    return row


def _to_batch(rows: list[dict], step: int, t: float, rank: int) -> pa.RecordBatch:
    n = len(rows)
    cols = {"step": [step] * n, "time": [t] * n, "rank": [rank] * n}
    for f in TELEMETRY_SCHEMA:
        if f.name in cols:
            continue
        if f.name == "values":
            cols[f.name] = [None if r.get("values") is None else r["values"] for r in rows]
        else:
            cols[f.name] = [r.get(f.name) for r in rows]
    arrays = [pa.array(cols[f.name], type=f.type) for f in TELEMETRY_SCHEMA]
    return pa.RecordBatch.from_arrays(arrays, schema=TELEMETRY_SCHEMA)
