"""Arrow schemas for the kit's streams, and sinks that write them to memory, files or ZeroMQ.

Every sink stamps each record batch with its producer id, a sequence number and (files and
ZeroMQ) a CRC32 of its bytes, and counts the batches, rows and bytes it sent; a file ends with a
trailer that states how many batches it holds. Readers verify all of it and report missing,
duplicated, reordered and corrupt batches by number (:class:`IntegrityReport`), so a lost or
damaged record is a reported number, never a silent gap.
"""
from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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


def batch_crc(batch: pa.RecordBatch) -> int:
    """CRC32 of a batch's canonical Arrow IPC encoding (the same before writing and after reading)."""
    return zlib.crc32(batch.serialize())


def _ranges(numbers: Iterable[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7' (at most 12 ranges shown)."""
    out: list[str] = []
    nums = sorted(set(numbers))
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ", ".join(out[:12]) + (f" and {len(out) - 12} more ranges" if len(out) > 12 else "")


@dataclass
class IntegrityReport:
    """What a reader found in a stream: batches by sequence number, and every defect by number.

    ``expected`` is the number of batches the writer says it wrote (from the file's trailer or
    the producer's end message; ``None`` when that never arrived). ``lost`` counts the batches
    that did not come back whole: missing plus corrupt (plus an unknown tail when ``expected``
    is unknown, which ``complete`` = False flags).
    """

    source: str
    good: int = 0  # batches returned
    rows: int = 0  # rows returned
    expected: int | None = None
    missing: list[int] = field(default_factory=list)  # sequence numbers never seen
    duplicated: list[int] = field(default_factory=list)  # seen more than once (kept once)
    reordered: list[int] = field(default_factory=list)  # seen after a later number
    corrupt: list[int] = field(default_factory=list)  # seen, but the checksum failed
    damaged_at: list[int] = field(default_factory=list)  # byte offsets that did not decode
    complete: bool = False  # the end was verified (trailer, end-of-stream marker, nothing after)
    problems: list[str] = field(default_factory=list)  # in words, in the order found
    checked: bool = True  # the batches carried sequence numbers and checksums

    @property
    def ok(self) -> bool:
        return self.complete and not (self.missing or self.duplicated or self.reordered or self.corrupt
                                      or self.damaged_at or self.problems)

    @property
    def lost(self) -> int:
        """Batches that did not come back whole (missing + corrupt, where their numbers are known)."""
        return len(set(self.missing) | set(self.corrupt))

    def summary(self) -> str:
        parts = list(self.problems)
        for name in ("missing", "corrupt", "duplicated", "reordered"):
            nums = getattr(self, name)
            if nums:
                parts.append(f"{name} batches {_ranges(nums)}")
        return "; ".join(parts) if parts else "intact"


class IPCFileSink(Sink):
    """Appends batches to an Arrow IPC stream file; ``bytes`` counts the bytes written.

    The schema is fixed by the first batch. Each batch's metadata holds its producer, sequence
    number and CRC32 (:func:`batch_crc`); :meth:`close` appends a trailer (an empty batch whose
    metadata says how many batches and rows came before) and the end-of-stream marker, so
    :func:`read_ipc` can tell a finished file from a cut-off or damaged one and name what is lost.
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
        self._writer.write_batch(batch, custom_metadata={**meta, "crc32": str(batch_crc(batch))})
        self._file.flush()
        return self._file.tell() - before

    def close(self) -> None:
        if self.closed:
            return
        before = self._file.tell()
        if self._writer is not None:
            trailer = self._schema.empty_table().to_batches() or [
                pa.RecordBatch.from_pylist([], schema=self._schema)]
            self._writer.write_batch(trailer[0], custom_metadata={
                "producer": self.producer, "end": "1", "batches": str(self.seq), "rows": str(self.rows)})
            self._writer.close()
        self.bytes += self._file.tell() - before
        self._file.close()
        super().close()


_CONT = b"\xff\xff\xff\xff"


def _read_message(data: bytes, offset: int) -> tuple[Any, int] | None:
    """The IPC message at ``offset`` and where it ends, or None when none decodes there."""
    if offset + 8 > len(data):
        return None
    src = pa.BufferReader(pa.py_buffer(data)[offset:])
    try:
        msg = pa.ipc.read_message(src)
    except (pa.ArrowException, OSError, EOFError, ValueError):
        return None
    return msg, offset + src.tell()


def _decode(head: bytes, data: bytes, start: int, end: int) -> tuple[pa.RecordBatch, dict[str, str]] | None:
    """The batch in ``data[start:end]`` and its custom metadata, read after the schema ``head``."""
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(head + data[start:end] + EOS))
        batch, meta = reader.read_next_batch_with_custom_metadata()
        batch.validate(full=True)  # damaged offsets or counts would crash later readers
        _ = batch.schema.names
    except (pa.ArrowException, OSError, UnicodeDecodeError, StopIteration, ValueError):
        return None
    return batch, {k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
                   for k, v in (meta or {}).items()}


def read_ipc_checked(path: str | os.PathLike, expected: int | None = None) -> tuple[pa.Table, IntegrityReport]:
    """Read an Arrow IPC stream file and verify it: the good batches and an :class:`IntegrityReport`.

    Every message is decoded on its own, so damage in one batch costs that batch only: after
    a part that does not decode, the reader resynchronises on the next message whose checksum
    verifies. Batches come back in sequence order, each once. ``expected`` is the writer's own
    count (:attr:`Sink.seq`) when the caller has it: a file cut off before its trailer then
    names its lost tail by number too (without it, the tail of a cut-off file is unknown).

    Raises:
        RecordsError: the file is missing, empty, or does not start with an Arrow IPC schema.
    """
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise RecordsError(f"read_ipc(path={name!r}): no such file")
    data = path.read_bytes()
    if not data:
        raise RecordsError(f"read_ipc(path={name!r}): the file is empty")
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        schema = reader.schema
        _ = schema.names  # a damaged name is not UTF-8 and would fail at first use
        first = _read_message(data, 0)
        if first is None or first[0].type != "schema":
            raise OSError("no schema message")
    except (pa.ArrowException, OSError, UnicodeDecodeError, ValueError) as e:
        raise RecordsError(f"read_ipc(path={name!r}): not an Arrow IPC stream ({e})") from None
    head = data[:first[1]]
    rep = IntegrityReport(source=name)
    good: dict[int, pa.RecordBatch] = {}
    legacy: list[pa.RecordBatch] = []  # batches without a sequence number (files of other writers)
    order: list[int] = []
    trailer: dict[str, str] | None = None
    pos, eos_at = first[1], None
    while pos < len(data):
        if data[pos:pos + 8] in (EOS, b"\x00" * 8) or data[pos:pos + 4] == b"\x00" * 4:
            if len(data) - pos <= 8:
                eos_at = pos
                break
            # an end-of-stream marker with data after it: zeroed bytes, not the end
            rep.problems.append(f"an end-of-stream marker at byte {pos} with {len(data) - pos - 8} bytes after it")
            nxt = _resync(head, data, pos + 1)
            if nxt is None:
                break
            pos = nxt
            continue
        got = _read_message(data, pos)
        decoded = _decode(head, data, pos, got[1]) if got is not None and got[0].type == "record batch" else None
        if decoded is None:
            rep.damaged_at.append(pos)
            nxt = _resync(head, data, pos + 1)
            if nxt is None:
                break
            pos = nxt
            continue
        batch, meta = decoded
        pos = got[1]
        if meta.get("end") == "1":
            trailer = meta
            continue
        if "seq" not in meta:
            legacy.append(batch)
            continue
        try:
            seq = int(meta["seq"])
        except ValueError:
            rep.damaged_at.append(pos)
            continue
        if "crc32" in meta and meta["crc32"] != str(batch_crc(batch)):
            rep.corrupt.append(seq)
            continue
        if seq in good:
            rep.duplicated.append(seq)
            continue
        if order and seq < max(order):
            rep.reordered.append(seq)
        good[seq] = batch
        order.append(seq)
    if legacy and not good:  # a stream written without sequence numbers: nothing to check but its end
        rep.checked = False
    batches = legacy + [good[k] for k in sorted(good)]
    rep.good, rep.rows = len(batches), sum(b.num_rows for b in batches)
    if trailer is not None:
        try:
            rep.expected = int(trailer.get("batches", ""))
        except ValueError:
            rep.problems.append("its trailer does not decode")
    if expected is not None:
        if rep.expected is not None and rep.expected != expected:
            rep.problems.append(f"the trailer says {rep.expected} batches, the writer {expected}")
        rep.expected = max(expected, rep.expected or 0)
    highest = max([*good, *rep.corrupt], default=-1) + 1
    known = rep.expected if rep.expected is not None else highest
    if rep.checked:
        rep.corrupt = sorted(set(rep.corrupt) - set(good))
        rep.missing = sorted(set(range(known)) - set(good) - set(rep.corrupt))
    for at in rep.damaged_at:
        rep.problems.append(f"damaged at byte {at}")
    if eos_at is None or (rep.checked and trailer is None):
        rep.problems.append(f"cut off after {rep.good} complete batches ("
                            + ("no trailer" if eos_at is not None else "no end-of-stream marker")
                            + "; batches after the cut are unknown)")
    else:
        rep.complete = eos_at + 8 >= len(data) and (trailer is not None or not rep.checked)
    if rep.damaged_at and not any(p.startswith("cut off") for p in rep.problems):
        rep.problems.insert(0, f"damaged after {rep.good} complete batches")
    return pa.Table.from_batches(batches, schema=schema), rep


def _resync(head: bytes, data: bytes, start: int) -> int | None:
    """Offset of the next decodable record batch message at or after ``start`` (None: none)."""
    pos = data.find(_CONT, start)
    while pos >= 0:
        got = _read_message(data, pos)
        if got is not None and got[0].type == "record batch" and _decode(head, data, pos, got[1]) is not None:
            return pos
        if data[pos:pos + 8] == EOS and pos + 8 == len(data):
            return pos
        pos = data.find(_CONT, pos + 1)
    return None


def read_ipc(path: str | os.PathLike, allow_partial: bool = False) -> pa.Table:
    """Read an Arrow IPC stream file written by :class:`IPCFileSink`, verifying its integrity.

    Args:
        path: the file.
        allow_partial: return the good batches of a cut-off or damaged file (with a warning
            that names what is missing or corrupt) instead of raising;
            :func:`read_ipc_checked` returns the :class:`IntegrityReport` itself.

    Raises:
        RecordsError: the file is missing, empty, not Arrow IPC, damaged, cut off, or has
            missing, duplicated, reordered or corrupt batches; the message names the path,
            how many batches were good and the defective ones by number.
    """
    table, rep = read_ipc_checked(path)
    if not rep.ok:
        problem = rep.summary()
        if not allow_partial:
            raise RecordsError(f"read_ipc(path={str(path)!r}): {problem}; allow_partial=True reads "
                               f"the {rep.good} good batches")
        warnings.warn(f"read_ipc({str(path)!r}): {problem}", stacklevel=2)
    return table


def _batch_bytes(batch: pa.RecordBatch) -> bytes:
    out = pa.BufferOutputStream()
    with pa.ipc.new_stream(out, batch.schema) as w:
        w.write_batch(batch)
    return out.getvalue().to_pybytes()


_UNDELIVERED = ("warn", "raise", "count")


class UndeliveredError(RecordsError):
    """A :class:`ZmqPushSink` with ``on_undelivered="raise"`` could not hand a message over."""


class ZmqPushSink(Sink):
    """Sends batches to a :class:`ZmqPullSource` over ZeroMQ PUSH.

    Each message is two frames: a JSON header (producer, stream, seq, CRC32 of the payload) and
    a self-contained Arrow IPC stream of one batch; ``bytes`` counts both. Messages are queued
    only to a receiver that is connected (``ZMQ_IMMEDIATE``), so a sink with no receiver knows
    it from the first message: a send not handed over within ``send_timeout_ms`` is counted in
    ``dropped`` (its number in ``dropped_seqs``) and, per ``on_undelivered``, warned about
    (default), raised (:class:`UndeliveredError`) or only counted; while the receiver stays
    unreachable, later sends fail at once instead of waiting again. With ``heartbeat_s``, a
    background thread sends a heartbeat (with the count sent so far) when the sink has been
    quiet that long, so the receiver notices a producer that stops. :meth:`close` sends a final
    message with the number of batches sent, so the receiver reports any loss by number.
    """

    def __init__(self, address: str, producer: str | None = None, send_timeout_ms: int = 10_000,
                 context: zmq.Context | None = None, *, on_undelivered: str = "warn",
                 heartbeat_s: float | None = None) -> None:
        super().__init__(producer)
        if not isinstance(address, str) or "://" not in address:
            raise RecordsError(f"ZmqPushSink(address={address!r}): expected e.g. 'tcp://127.0.0.1:5555'")
        if on_undelivered not in _UNDELIVERED:
            raise RecordsError(f"ZmqPushSink(on_undelivered={on_undelivered!r}): expected one of {_UNDELIVERED}")
        if heartbeat_s is not None and not (isinstance(heartbeat_s, (int, float)) and heartbeat_s > 0):
            raise RecordsError(f"ZmqPushSink(heartbeat_s={heartbeat_s!r}): expected a number > 0 or None")
        self.address = address
        self.on_undelivered = on_undelivered
        self.send_timeout_ms = send_timeout_ms
        self.dropped_seqs: list[int] = []
        self.reachable: bool | None = None  # unknown until the first send
        self._outage = False
        self._lock = threading.Lock()
        self._last_send = time.monotonic()
        self._sock = (context or zmq.Context.instance()).socket(zmq.PUSH)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only to a connected receiver
        self._sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
        self._sock.setsockopt(zmq.LINGER, send_timeout_ms)
        try:
            self._sock.connect(address)
        except zmq.ZMQError as e:
            self._sock.close()
            raise RecordsError(f"ZmqPushSink(address={address!r}): cannot connect ({e})") from None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        if heartbeat_s is not None:
            self._beat = threading.Thread(target=self._heartbeats, args=(float(heartbeat_s),),
                                          name=f"adaptive-kit-heartbeat-{self.producer}", daemon=True)
            self._beat.start()

    def _heartbeats(self, every_s: float) -> None:
        while not self._stop.wait(every_s / 2):
            if time.monotonic() - self._last_send >= every_s:
                self.heartbeat()

    def heartbeat(self) -> None:
        """Tell the receiver this producer is alive and how many batches it has sent."""
        if not self.closed:
            self.bytes += self._frames({"type": "beat", "producer": self.producer, "sent": self.seq,
                                        "time": time.time()}, quiet=True)

    def _frames(self, header: dict[str, Any], payload: bytes = b"", quiet: bool = False) -> int:
        frames = [json.dumps(header).encode(), payload]
        with self._lock:
            if self._sock.closed:
                return 0
            try:
                # an unreachable receiver fails at once; a reachable one may block up to the timeout
                self._sock.send_multipart(frames, flags=zmq.NOBLOCK if self.reachable is False else 0)
                self.reachable = True
            except zmq.Again:
                self.reachable = False
                if header.get("type") == "beat":
                    return 0
                self.dropped += 1
                if "seq" in header:
                    self.dropped_seqs.append(int(header["seq"]))
                what = (f"message {header.get('seq')}" if header.get("type") == "batch"
                        else f"its {header.get('type')} message")
                msg = (f"ZmqPushSink({self.address}): {what} not delivered within the send timeout "
                       f"({self.send_timeout_ms} ms; is a receiver listening?); {self.dropped} dropped so far")
                if self.on_undelivered == "raise" and not quiet:
                    raise UndeliveredError(msg) from None
                # one warning when an outage starts (and a summary at close), not one per message
                if self.on_undelivered == "warn" and not quiet and not self._outage:
                    warnings.warn(msg + "; later drops are counted in .dropped / .dropped_seqs",
                                  stacklevel=4)
                self._outage = True
            else:
                self._outage = False
            finally:
                self._last_send = time.monotonic()
        return sum(len(f) for f in frames)

    def _send(self, batch: pa.RecordBatch, meta: dict[str, str]) -> int:
        payload = _batch_bytes(batch)
        header = {"type": "batch", "producer": meta["producer"], "stream": meta["stream"],
                  "seq": int(meta["seq"]), "time": time.time(), "crc32": zlib.crc32(payload)}
        try:
            return self._frames(header, payload)
        except UndeliveredError:
            self.seq += 1  # the batch was numbered: the receiver sees the gap, the caller the error
            raise

    def close(self) -> None:
        if self.closed:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        try:
            self.bytes += self._frames({"type": "end", "producer": self.producer, "sent": self.seq,
                                        "dropped": self.dropped, "time": time.time()}, quiet=True)
            if self.dropped and self.on_undelivered == "warn":
                warnings.warn(f"ZmqPushSink({self.address}): {self.dropped} messages not delivered "
                              f"(batches {_ranges(self.dropped_seqs)}"
                              + (", and the end message" if self.dropped > len(self.dropped_seqs) else "")
                              + f") of {self.seq} batches", stacklevel=2)
        finally:
            with self._lock:
                self._sock.close()
            Sink.close(self)


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
    gaps: int = 0  # batches skipped in the sequence when a later one arrived
    out_of_order: int = 0
    sent: int | None = None  # from the producer's end message
    ended: bool = False
    holes: set[int] = field(default_factory=set)  # numbers skipped and not (yet) arrived
    duplicated: list[int] = field(default_factory=list)
    reordered: list[int] = field(default_factory=list)
    corrupt: list[int] = field(default_factory=list)  # numbers whose payload failed its checksum
    last_seen: float = 0.0  # time.monotonic() of the last message of any kind
    beat_sent: int = 0  # batches the producer had sent at its last heartbeat

    def missing(self) -> list[int]:
        """Numbers not received whole: skipped ones, and the tail below what the producer says it sent."""
        top = max(self.next_seq, self.sent if self.sent is not None else self.beat_sent)
        return sorted((self.holes | set(range(self.next_seq, top))) - set(self.corrupt))


class DrainResult(list):
    """The batches :meth:`ZmqPullSource.drain` received (a list), and who did not finish.

    ``missing`` names the expected producers that sent no end message (``"3 unnamed"`` for
    producers expected by count and never heard from); ``silent`` those of them that fell
    silent (no message for ``stale_s``); ``complete`` is True when nobody is missing.
    """

    missing: list[str]
    silent: list[str]

    @property
    def complete(self) -> bool:
        return not self.missing


class ZmqPullSource:
    """Receives from any number of :class:`ZmqPushSink` s; verifies and counts per producer.

    Binds ``tcp://127.0.0.1`` on a free port by default (loopback only); :attr:`address` is what
    sinks connect to. Messages that do not decode, or whose payload fails its CRC32, are counted
    in :attr:`corrupt` (and by number per producer), never raised into the loop. :meth:`expect`
    names the producers it waits for, so one that never starts or stops without its end message
    is named by :meth:`drain` and :meth:`report`.
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
        self.expected: list[str] = []
        self.corrupt = 0
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)

    def expect(self, producers: Iterable[str]) -> None:
        """Name producers this source waits for (reported even if never heard from)."""
        for p in producers:
            if str(p) not in self.expected:
                self.expected.append(str(p))

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
        tally.last_seen = time.monotonic()
        kind = header.get("type")
        if kind in ("end", "beat"):
            try:
                sent = int(header.get("sent", 0))
            except (TypeError, ValueError):
                self.corrupt += 1
                return None
            if kind == "end":
                tally.sent, tally.ended = sent, True
            else:
                tally.beat_sent = max(tally.beat_sent, sent)
            return None
        try:
            seq = int(header["seq"])
            crc = header.get("crc32")
            if crc is not None and int(crc) != zlib.crc32(frames[1]):
                tally.corrupt.append(seq)
                self.corrupt += 1
                return None
            batch = pa.ipc.open_stream(pa.py_buffer(frames[1])).read_next_batch()
            batch.validate(full=True)  # damaged offsets or counts would crash consumers later
            _ = batch.schema.names  # so would field names that are not UTF-8 (a ValueError)
            sent_time = float(header.get("time", 0.0))
        except (pa.ArrowException, OSError, KeyError, IndexError, TypeError, ValueError, StopIteration):
            self.corrupt += 1
            return None
        if seq < tally.next_seq:
            if seq not in tally.holes:
                tally.duplicated.append(seq)
                return None  # handed on once only
            tally.holes.discard(seq)
            tally.reordered.append(seq)
            tally.out_of_order += 1
        elif seq > tally.next_seq:
            tally.gaps += seq - tally.next_seq
            tally.holes.update(range(tally.next_seq, seq))
        tally.received += 1
        tally.next_seq = max(tally.next_seq, seq + 1)
        return Received(producer, str(header.get("stream", "")), seq, batch, sent_time)

    def _unfinished(self, producers: int | Sequence[str]) -> list[str]:
        if not isinstance(producers, int):
            self.expect(producers)
        names = list(self.expected) + [p for p in self.tally if p not in self.expected]
        missing = [p for p in names if not (p in self.tally and self.tally[p].ended)]
        if isinstance(producers, int) and not self.expected:
            ended = sum(t.ended for t in self.tally.values())
            unheard = producers - len(self.tally)
            if ended >= producers:
                return []
            if unheard > 0:
                missing.append(f"{unheard} unnamed")
        return missing

    def drain(self, producers: int | Sequence[str], timeout_s: float = 30.0,
              stale_s: float | None = None) -> DrainResult:
        """Receive until the expected producers have sent their end message, or time runs out.

        Args:
            producers: how many producers, or their names (added to :meth:`expect`).
            timeout_s: the longest wait.
            stale_s: stop waiting for a producer silent for this long (no batch, heartbeat or
                end message; pair with the sinks' ``heartbeat_s``): it is named in ``silent``.

        Returns:
            a :class:`DrainResult`: the batches received, and ``missing`` / ``silent`` producers.
        """
        out = DrainResult()
        deadline = time.monotonic() + timeout_s
        while True:
            missing = self._unfinished(producers)
            if not missing:
                break
            now = time.monotonic()
            if stale_s is not None and all(
                    p in self.tally and now - self.tally[p].last_seen > stale_s for p in missing):
                break
            left = deadline - now
            if left <= 0:
                break
            out.extend(self.poll(int(min(left, 0.1) * 1000)))
        out.extend(self.poll(0))
        out.missing = self._unfinished(producers)
        now = time.monotonic()
        out.silent = [p for p in out.missing if p in self.tally
                      and stale_s is not None and now - self.tally[p].last_seen > stale_s]
        return out

    def report(self) -> pd.DataFrame:
        """Per producer: received, bytes, gaps, out of order, sent (once ended), lost, and by number.

        ``lost`` = sent - received once the producer ended; ``missing`` / ``corrupt`` /
        ``duplicated`` / ``reordered`` list sequence numbers (missing includes the tail below the
        count of the producer's last heartbeat); ``silent_s`` is the time since its last message.
        Producers named by :meth:`expect` and never heard from have a row with ``received`` 0.
        """
        rows = []
        now = time.monotonic()
        for producer in sorted(set(self.tally) | set(self.expected)):
            t = self.tally.get(producer, _Tally())
            lost = None if t.sent is None else t.sent - t.received
            rows.append({"producer": producer, "received": t.received, "bytes": t.bytes,
                         "gaps": t.gaps, "out_of_order": t.out_of_order, "sent": t.sent,
                         "lost": lost, "ended": t.ended, "missing": t.missing(),
                         "corrupt": list(t.corrupt), "duplicated": list(t.duplicated),
                         "reordered": list(t.reordered),
                         "silent_s": now - t.last_seen if producer in self.tally else float("nan")})
        cols = ["producer", "received", "bytes", "gaps", "out_of_order", "sent", "lost", "ended",
                "missing", "corrupt", "duplicated", "reordered", "silent_s"]
        return pd.DataFrame(rows, columns=cols).set_index("producer")

    def integrity(self, producer: str) -> IntegrityReport:
        """One producer's stream as an :class:`IntegrityReport` (as :func:`read_ipc_checked` gives for a file)."""
        t = self.tally.get(producer, _Tally())
        rep = IntegrityReport(source=f"{self.address} from {producer}", good=t.received, expected=t.sent,
                              missing=t.missing(), duplicated=list(t.duplicated), reordered=list(t.reordered),
                              corrupt=sorted(set(t.corrupt) - (set(range(t.next_seq)) - t.holes)),
                              complete=t.ended)
        if not t.ended:
            rep.problems.append(f"no end message from {producer!r}")
        return rep

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ZmqPullSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
