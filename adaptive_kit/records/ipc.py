"""Arrow IPC files: a sink with CRCs and a trailer, and readers that report every missing or bad batch."""
from __future__ import annotations

import os
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from .schemas import RecordsError
from .sinks import Sink

EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # Arrow IPC end-of-stream marker


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
