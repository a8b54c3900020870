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

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..checks import check_int
from ..records import MemorySink, Sink
from .reduce import (
    ACTIVATION_TYPES,
    EXTREMA,
    KINDS,
    LEVELS,
    RELU_TYPES,
    TELEMETRY_SCHEMA,
    StepRecord,
    Summary,
    _Pending,
    _ready,
    aggregate,
    materialise,
    summarise,
)

__all__ = ["ACTIVATION_TYPES", "EXTREMA", "KINDS", "LEVELS", "RELU_TYPES", "TELEMETRY_SCHEMA", "StepRecord",
           "Summary", "Telemetry", "TelemetryConfig", "aggregate", "materialise", "summarise"]


@dataclass(frozen=True)
class TelemetryConfig:
    window: int = 16  # micro: entries per moving average (stride = window)
    raw_cap: int = 4096  # raw and micro: most values sent per (kind, layer) and step
    every: int = 1  # collect on steps where step % every == 0

    def __post_init__(self) -> None:
        for name in ("window", "raw_cap", "every"):
            check_int(f"TelemetryConfig.{name}", getattr(self, name), 1)


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
        on_step: called with each :class:`StepRecord` once its data is on the host
            (detectors and policies hook in here); what it returns is the step's alarms.
        keep_records: how many recent :class:`StepRecord` s to keep in :attr:`records`
            (0: none). The sink keeps everything it is given: for long runs pass a file sink.

    Raises:
        ValueError: the model has no parameters, or a level / kind / layer name is unknown.
    """

    def __init__(self, model: nn.Module, levels: str | Mapping = "meso", *,
                 config: TelemetryConfig = TelemetryConfig(), sink: Sink | None = None,
                 rank: int = 0, act_layers: Iterable[str] | None = None,
                 on_step=None, keep_records: int = 1000) -> None:
        self.model = model
        self.config = config
        self.sink = sink if sink is not None else MemorySink()
        self.rank = rank
        self.on_step = on_step
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
        if self.on_step is not None:
            record.alarms = list(self.on_step(record) or [])
        if self.keep_records:
            self.records.append(record)
            if len(self.records) > self.keep_records:
                del self.records[0]

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

