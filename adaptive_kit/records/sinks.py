"""Sinks: where record batches go, each stamped with its producer and sequence number; in memory."""
from __future__ import annotations

import pandas as pd
import pyarrow as pa

from .schemas import RecordsError, default_producer


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
