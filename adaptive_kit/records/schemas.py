"""The kit's streams: Arrow schemas by name, batches checked against them, producer ids."""
from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import torch

from ..stats import STAT_NAMES


class RecordsError(ValueError):
    """A record, a file or a message that does not match what the kit expects."""


_STAT_TYPES = {"count": pa.int64(), "nonfinite": pa.int64()}
SCHEMAS: dict[str, pa.Schema] = {
    # per-layer statistics from adaptive_kit.stats, one row per (step, kind, layer)
    "stats": pa.schema(
        [("step", pa.int64()), ("time", pa.float64()), ("rank", pa.int32()),
         ("kind", pa.string()), ("layer", pa.string())]
        + [(n, _STAT_TYPES.get(n, pa.float64())) for n in STAT_NAMES]
    ),
    # named scalars: losses, metrics, learning rates
    "scalars": pa.schema(
        [("step", pa.int64()), ("time", pa.float64()), ("rank", pa.int32()),
         ("name", pa.string()), ("value", pa.float64())]
    ),
    # resource samples from adaptive_kit.resources, one row per device per sample
    "resources": pa.schema(
        [("time", pa.float64()), ("device", pa.string()), ("util_percent", pa.float64()),
         ("mem_used_bytes", pa.int64()), ("mem_total_bytes", pa.int64()),
         ("torch_allocated_bytes", pa.int64()), ("torch_reserved_bytes", pa.int64()),
         ("process_rss_bytes", pa.int64())]
    ),
}


def register_schema(name: str, schema: pa.Schema) -> None:
    """Add a capability's stream schema; re-registering the same schema is allowed.

    Raises:
        RecordsError: ``name`` is taken by a different schema.
    """
    if name in SCHEMAS and not SCHEMAS[name].equals(schema):
        raise RecordsError(f"register_schema(name={name!r}): a different schema has that name")
    SCHEMAS[name] = schema


def get_schema(stream: str) -> pa.Schema:
    """The schema registered for ``stream``.

    Raises:
        RecordsError: no such stream.
    """
    try:
        return SCHEMAS[stream]
    except KeyError:
        raise RecordsError(f"stream={stream!r}: unknown; known streams are {sorted(SCHEMAS)}") from None


def to_batch(stream: str, columns: Mapping[str, Any]) -> pa.RecordBatch:
    """Build a record batch of ``stream`` from columns (lists, arrays or scalars to broadcast).

    Raises:
        RecordsError: a column is missing, unknown, of the wrong length, or holds a value of
            the wrong type; the message names the field and the value.
    """
    schema = get_schema(stream)
    missing = [f.name for f in schema if f.name not in columns]
    extra = [k for k in columns if schema.get_field_index(k) < 0]
    if missing or extra:
        raise RecordsError(f"{stream}: missing fields {missing}, unknown fields {extra}")
    lengths = {k: len(v) for k, v in columns.items() if _is_column(v)}
    n = max(lengths.values(), default=1)
    bad = {k: m for k, m in lengths.items() if m != n}
    if bad:
        raise RecordsError(f"{stream}: columns of different lengths {lengths}")
    arrays = []
    for f in schema:
        v = columns[f.name]
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        if not _is_column(v):
            v = [v.item() if getattr(v, "ndim", None) == 0 else v] * n  # 0-d array: its value
        if pa.types.is_integer(f.type) and isinstance(v, (list, tuple)):
            # pyarrow truncates Python floats into integer fields without a word
            lossy = [x for x in v if isinstance(x, float) and not x.is_integer()]
            if lossy:
                raise RecordsError(f"{stream}.{f.name}={lossy[:3]!r}: not {f.type} (would truncate)")
        try:
            arrays.append(pa.array(v, type=f.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
            sample = list(v[:3]) if hasattr(v, "__getitem__") else v
            raise RecordsError(f"{stream}.{f.name}={sample!r}: not {f.type} ({e})") from None
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _is_column(v: Any) -> bool:
    if isinstance(v, (str, bytes)):
        return False
    if isinstance(v, torch.Tensor):
        return v.dim() > 0
    if getattr(v, "ndim", None) == 0:  # a 0-d numpy array is a scalar, not a column
        return False
    return hasattr(v, "__len__")


def stats_batch(
    values: torch.Tensor, layers: Sequence[str], *, step: int, kind: str, rank: int = 0,
    t: float | None = None,
) -> pa.RecordBatch:
    """A ``stats`` record batch from a host ``(L, 8)`` tensor of :func:`stats.batched_stats`.

    Raises:
        RecordsError: the shape does not match ``layers`` and :data:`STAT_NAMES`.
    """
    if values.dim() != 2 or values.shape != (len(layers), len(STAT_NAMES)):
        raise RecordsError(
            f"stats_batch(values.shape={tuple(values.shape)}): expected ({len(layers)}, {len(STAT_NAMES)})"
        )
    if values.device.type != "cpu":
        raise RecordsError(f"stats_batch(values.device={values.device}): pass a host tensor (HostCopy)")
    cols = values.numpy()
    data: dict[str, Any] = {"step": step, "time": time.time() if t is None else t, "rank": rank,
                            "kind": kind, "layer": list(layers)}
    for i, name in enumerate(STAT_NAMES):
        data[name] = cols[:, i].astype("int64") if name in _STAT_TYPES else cols[:, i]
    return to_batch("stats", data)


_counter = itertools.count()


def default_producer() -> str:
    """A producer id unique on this machine: host, process and a counter."""
    return f"{socket.gethostname()}-{os.getpid()}-{next(_counter)}"
