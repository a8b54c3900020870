"""Arrow schemas for the kit's streams, and sinks that write them to memory, files or ZeroMQ.

Every sink stamps each record batch with its producer id and a sequence number, and counts
the batches, rows and bytes it sent, so that a receiver can report what went missing.
"""
from __future__ import annotations

import itertools
import json
import os
import socket
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import torch
import zmq

from .stats import STAT_NAMES

EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # Arrow IPC end-of-stream marker


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


class Sink:
    """Base of all sinks: stamps producer and sequence number, counts what it sent."""

    def __init__(self, producer: str | None = None) -> None:
        self.producer = producer or default_producer()
        self.seq = 0  # sequence number of the next batch
        self.rows = 0
        self.bytes = 0
        self.dropped = 0  # batches that could not be delivered (counted, never silent)
        self.closed = False

    def write(self, batch: pa.RecordBatch, stream: str | None = None) -> None:
        """Send one record batch; ``stream`` names its schema (for receivers that mix streams)."""
        if self.closed:
            raise RecordsError(f"{type(self).__name__}(producer={self.producer!r}) is closed")
        if not isinstance(batch, pa.RecordBatch):
            raise RecordsError(f"write(batch={type(batch).__name__}): expected a pyarrow.RecordBatch")
        meta = {"producer": self.producer, "seq": str(self.seq), "stream": stream or ""}
        self.bytes += self._send(batch, meta)
        self.seq += 1
        self.rows += batch.num_rows

    def _send(self, batch: pa.RecordBatch, meta: dict[str, str]) -> int:
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemorySink(Sink):
    """Keeps batches in memory; ``bytes`` counts their Arrow IPC size (what a wire would carry)."""

    def __init__(self, producer: str | None = None) -> None:
        super().__init__(producer)
        self.batches: list[pa.RecordBatch] = []

    def _send(self, batch: pa.RecordBatch, meta: dict[str, str]) -> int:
        self.batches.append(batch)
        return pa.ipc.get_record_batch_size(batch)

    def table(self) -> pa.Table:
        """All batches as one table (they must share a schema)."""
        if not self.batches:
            raise RecordsError(f"MemorySink(producer={self.producer!r}) holds no batches")
        return pa.Table.from_batches(self.batches)

    def to_pandas(self) -> pd.DataFrame:
        return self.table().to_pandas()


class IPCFileSink(Sink):
    """Appends batches to an Arrow IPC stream file; ``bytes`` counts the bytes written.

    The schema is fixed by the first batch. The file ends with the end-of-stream marker only
    after :meth:`close`, so :func:`read_ipc` can tell a finished file from a cut-off one.
    """

    def __init__(self, path: str | os.PathLike, producer: str | None = None) -> None:
        super().__init__(producer)
        self.path = Path(path)
        self._file = pa.OSFile(str(self.path), "wb")
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._schema: pa.Schema | None = None

    def _send(self, batch: pa.RecordBatch, meta: dict[str, str]) -> int:
        before = self._file.tell()
        if self._writer is None:
            self._schema = batch.schema
            self._writer = pa.ipc.new_stream(self._file, batch.schema)
        elif not batch.schema.equals(self._schema):
            raise RecordsError(f"{self.path}: batch schema {batch.schema.names} differs from "
                               f"the file's {self._schema.names}")
        self._writer.write_batch(batch, custom_metadata=meta)
        self._file.flush()
        return self._file.tell() - before

    def close(self) -> None:
        if self.closed:
            return
        before = self._file.tell()
        if self._writer is not None:
            self._writer.close()
        self.bytes += self._file.tell() - before
        self._file.close()
        super().close()


def read_ipc(path: str | os.PathLike, allow_partial: bool = False) -> pa.Table:
    """Read an Arrow IPC stream file written by :class:`IPCFileSink`.

    Args:
        path: the file.
        allow_partial: return the complete batches of a cut-off or damaged file (with a
            warning) instead of raising.

    Raises:
        RecordsError: the file is missing, empty, not Arrow IPC, damaged or cut off; the
            message names the path and how many batches were readable.
    """
    path = Path(path)
    if not path.is_file():
        raise RecordsError(f"read_ipc(path={str(path)!r}): no such file")
    data = path.read_bytes()
    if not data:
        raise RecordsError(f"read_ipc(path={str(path)!r}): the file is empty")
    batches: list[pa.RecordBatch] = []
    problem = None
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        _ = reader.schema.names  # a damaged name is not UTF-8 and would fail at first use
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise RecordsError(f"read_ipc(path={str(path)!r}): not an Arrow IPC stream ({e})") from None
    try:
        for batch in reader:
            batch.validate(full=True)  # damaged offsets or counts would crash later readers
            batches.append(batch)
    except (pa.ArrowException, OSError) as e:
        problem = f"damaged after {len(batches)} complete batches ({e})"
    if problem is None and not data.endswith(EOS):
        problem = f"cut off after {len(batches)} complete batches (no end-of-stream marker)"
    if problem is not None:
        if not allow_partial:
            raise RecordsError(f"read_ipc(path={str(path)!r}): {problem}; allow_partial=True reads them")
        warnings.warn(f"read_ipc({str(path)!r}): {problem}", stacklevel=2)
    return pa.Table.from_batches(batches, schema=reader.schema)


def _batch_bytes(batch: pa.RecordBatch) -> bytes:
    out = pa.BufferOutputStream()
    with pa.ipc.new_stream(out, batch.schema) as w:
        w.write_batch(batch)
    return out.getvalue().to_pybytes()


class ZmqPushSink(Sink):
    """Sends batches to a :class:`ZmqPullSource` over ZeroMQ PUSH (which blocks, never drops).

    Each message is two frames: a JSON header (producer, stream, seq) and a self-contained
    Arrow IPC stream of one batch; ``bytes`` counts both. A send that cannot be delivered
    within ``send_timeout_ms`` is counted in ``dropped`` with a warning, never lost silently;
    :meth:`close` sends a final message with the number of batches sent, so the receiver
    reports any loss.
    """

    def __init__(self, address: str, producer: str | None = None, send_timeout_ms: int = 10_000,
                 context: zmq.Context | None = None) -> None:
        super().__init__(producer)
        if not isinstance(address, str) or "://" not in address:
            raise RecordsError(f"ZmqPushSink(address={address!r}): expected e.g. 'tcp://127.0.0.1:5555'")
        self.address = address
        self._sock = (context or zmq.Context.instance()).socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
        self._sock.setsockopt(zmq.LINGER, send_timeout_ms)
        try:
            self._sock.connect(address)
        except zmq.ZMQError as e:
            self._sock.close()
            raise RecordsError(f"ZmqPushSink(address={address!r}): cannot connect ({e})") from None

    def _frames(self, header: dict[str, Any], payload: bytes = b"") -> int:
        frames = [json.dumps(header).encode(), payload]
        try:
            self._sock.send_multipart(frames)
        except zmq.Again:
            self.dropped += 1
            warnings.warn(f"ZmqPushSink({self.address}): message {header.get('seq')} not delivered "
                          f"within the send timeout; {self.dropped} dropped so far", stacklevel=3)
        return sum(len(f) for f in frames)

    def _send(self, batch: pa.RecordBatch, meta: dict[str, str]) -> int:
        header = {"type": "batch", "producer": meta["producer"], "stream": meta["stream"],
                  "seq": int(meta["seq"]), "time": time.time()}
        return self._frames(header, _batch_bytes(batch))

    def close(self) -> None:
        if self.closed:
            return
        self.bytes += self._frames({"type": "end", "producer": self.producer, "sent": self.seq,
                                    "dropped": self.dropped, "time": time.time()})
        self._sock.close()
        super().close()


@dataclass
class Received:
    """One batch as it arrived: who sent it, its stream, its sequence number."""

    producer: str
    stream: str
    seq: int
    batch: pa.RecordBatch
    sent_time: float


@dataclass
class _Tally:
    received: int = 0
    bytes: int = 0
    next_seq: int = 0
    gaps: int = 0  # batches skipped in the sequence: lost on the way
    out_of_order: int = 0
    sent: int | None = None  # from the producer's end message
    ended: bool = False


class ZmqPullSource:
    """Receives from any number of :class:`ZmqPushSink` s; counts gaps and loss per producer.

    Binds ``tcp://127.0.0.1`` on a free port by default; :attr:`address` is what sinks connect to.
    Messages that do not decode are counted in :attr:`corrupt`, never raised into the loop.
    """

    def __init__(self, address: str = "tcp://127.0.0.1:*", context: zmq.Context | None = None) -> None:
        self._sock = (context or zmq.Context.instance()).socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.bind(address)
        except zmq.ZMQError as e:
            self._sock.close()
            raise RecordsError(f"ZmqPullSource(address={address!r}): cannot bind ({e})") from None
        self.address = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.tally: dict[str, _Tally] = {}
        self.corrupt = 0
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)

    def poll(self, timeout_ms: int = 0) -> list[Received]:
        """Everything that has arrived, waiting up to ``timeout_ms`` for the first message."""
        out: list[Received] = []
        if not self._poller.poll(timeout_ms):
            return out
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return out
            item = self._accept(frames)
            if item is not None:
                out.append(item)

    def _accept(self, frames: list[bytes]) -> Received | None:
        try:
            header = json.loads(frames[0])
            producer = str(header["producer"])
        except (ValueError, KeyError, IndexError, TypeError):
            self.corrupt += 1
            return None
        tally = self.tally.setdefault(producer, _Tally())
        tally.bytes += sum(len(f) for f in frames)
        if header.get("type") == "end":
            try:
                sent = int(header.get("sent", 0))
            except (TypeError, ValueError):
                self.corrupt += 1
                return None
            tally.sent, tally.ended = sent, True
            return None
        try:
            batch = pa.ipc.open_stream(pa.py_buffer(frames[1])).read_next_batch()
            batch.validate(full=True)  # damaged offsets or counts would crash consumers later
            _ = batch.schema.names  # so would field names that are not UTF-8 (a ValueError)
            seq = int(header["seq"])
            sent_time = float(header.get("time", 0.0))
        except (pa.ArrowException, OSError, KeyError, IndexError, TypeError, ValueError, StopIteration):
            self.corrupt += 1
            return None
        tally.received += 1
        if seq > tally.next_seq:
            tally.gaps += seq - tally.next_seq
        elif seq < tally.next_seq:
            tally.out_of_order += 1
        tally.next_seq = max(tally.next_seq, seq + 1)
        return Received(producer, str(header.get("stream", "")), seq, batch, sent_time)

    def drain(self, producers: int, timeout_s: float = 30.0) -> list[Received]:
        """Receive until ``producers`` producers have sent their end message or time runs out."""
        out: list[Received] = []
        deadline = time.monotonic() + timeout_s
        while sum(t.ended for t in self.tally.values()) < producers:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            out.extend(self.poll(int(min(left, 0.1) * 1000)))
        out.extend(self.poll(0))
        return out

    def report(self) -> pd.DataFrame:
        """Per producer: received, bytes, gaps, out of order, sent (once ended) and lost."""
        rows = []
        for producer, t in sorted(self.tally.items()):
            lost = None if t.sent is None else t.sent - t.received
            rows.append({"producer": producer, "received": t.received, "bytes": t.bytes,
                         "gaps": t.gaps, "out_of_order": t.out_of_order, "sent": t.sent,
                         "lost": lost, "ended": t.ended})
        cols = ["producer", "received", "bytes", "gaps", "out_of_order", "sent", "lost", "ended"]
        return pd.DataFrame(rows, columns=cols).set_index("producer")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ZmqPullSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
