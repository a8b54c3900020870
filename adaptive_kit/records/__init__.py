"""Arrow schemas for the kit's streams, and sinks that write them to memory, files or ZeroMQ.

Every sink stamps each record batch with its producer id, a sequence number and (files and
ZeroMQ) a CRC32 of its bytes, and counts the batches, rows and bytes it sent; a file ends with a
trailer that states how many batches it holds. Readers verify all of it and report missing,
duplicated, reordered and corrupt batches by number (:class:`IntegrityReport`), so a lost or
damaged record is a reported number, never a silent gap.

- :mod:`.schemas`: :data:`SCHEMAS`, :func:`register_schema`, :func:`get_schema`, :func:`to_batch`,
  :func:`stats_batch`;
- :mod:`.sinks`: :class:`Sink`, :class:`MemorySink`;
- :mod:`.ipc`: :class:`IPCFileSink`, :func:`read_ipc`, :func:`read_ipc_checked`,
  :class:`IntegrityReport`;
- :mod:`.transport`: :class:`ZmqPushSink`, :class:`ZmqPullSource` (ZeroMQ).
"""
from .ipc import (
    EOS,
    IntegrityReport,
    IPCFileSink,
    _batch_bytes,
    batch_crc,
    read_ipc,
    read_ipc_checked,
)
from .schemas import (
    SCHEMAS,
    RecordsError,
    default_producer,
    get_schema,
    register_schema,
    stats_batch,
    to_batch,
)
from .sinks import MemorySink, Sink
from .transport import DrainResult, Received, UndeliveredError, ZmqPullSource, ZmqPushSink

__all__ = [
    "EOS", "SCHEMAS", "DrainResult", "IPCFileSink", "IntegrityReport", "MemorySink", "Received", "RecordsError",
    "Sink", "UndeliveredError", "ZmqPullSource", "ZmqPushSink", "_batch_bytes", "batch_crc", "default_producer",
    "get_schema", "read_ipc", "read_ipc_checked", "register_schema", "stats_batch", "to_batch",
]
