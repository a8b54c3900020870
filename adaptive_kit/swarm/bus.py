"""The swarm's metadata bus: Arrow record batches over ZeroMQ PUSH/PULL, checked per member.

Members' reports are aggregated per round (mean, last and largest loss over the round's steps
instead of one message per step) and carry a per-member sequence number, so the receiver
reports, per member, what was sent, what arrived and what is missing.
"""
from __future__ import annotations

import itertools
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import zmq

from ..records import DrainResult, Received, ZmqPullSource, ZmqPushSink, register_schema

SWARM_SCHEMA = pa.schema([
    ("time", pa.float64()),  # time.time() when the report was made: one clock for every process
    ("member", pa.int32()),
    ("seq", pa.int64()),  # the member's report number: 0, 1, 2 ... with no gap
    ("round", pa.int32()),
    ("step", pa.int64()),  # the member's optimiser steps so far
    ("epochs", pa.float64()),  # the member's passes over its training data so far
    ("steps", pa.int32()),  # steps granted this round
    ("loss_mean", pa.float64()),  # training loss over this round's steps (NaN if none)
    ("loss_last", pa.float64()),
    ("loss_max", pa.float64()),
    ("nonfinite", pa.int64()),  # non-finite losses this round
    ("val_acc", pa.float64()),
    ("val_loss", pa.float64()),
    ("train_acc", pa.float64()),
    ("fitness", pa.float64()),
    ("lr", pa.float64()),
    ("momentum", pa.float64()),
    ("weight_decay", pa.float64()),
    ("batch_size", pa.int32()),
    ("arch", pa.string()),
    ("n_params", pa.int64()),
    ("compute_s", pa.float64()),  # this member's share of the round's training time
    ("cpu_percent", pa.float64()),  # of the member's process
    ("rss_bytes", pa.int64()),  # of the member's process
    ("gpu_bytes", pa.int64()),  # torch-allocated bytes on the member's GPU; null on CPU
    ("device", pa.string()),
    ("status", pa.string()),  # "active" or "quarantined"
    ("origin", pa.string()),  # how the member got its weights: "init", "exploit 3", "breed 2x5"
])
ALARM_SCHEMA = pa.schema([
    ("time", pa.float64()), ("round", pa.int32()), ("member", pa.int32()), ("detector", pa.string()),
    ("kind", pa.string()), ("scope", pa.string()),  # "own" history or "population"
    ("evidence", pa.string()), ("value", pa.float64()),
])
register_schema("swarm", SWARM_SCHEMA)
register_schema("swarm_alarms", ALARM_SCHEMA)

_ids = itertools.count()


def inproc_address() -> str:
    """A fresh in-process address (one ZeroMQ context, no sockets on the network)."""
    return f"inproc://adaptive-kit-swarm-{next(_ids)}"


@dataclass
class MemberTally:
    received: int = 0
    next_seq: int = 0
    gaps: int = 0
    duplicates: int = 0


@dataclass
class Collector:
    """Receives the swarm's streams and keeps them as tables; checks members' sequence numbers.

    Binds ``address`` (default: in-process); sinks from :meth:`sink` (or ``ZmqPushSink`` s in
    other processes, for a ``tcp://127.0.0.1:*`` address) connect to :attr:`address`.
    """

    address: str = field(default_factory=inproc_address)
    tables: dict[str, list[pa.RecordBatch]] = field(default_factory=lambda: defaultdict(list))
    latencies: list[float] = field(default_factory=list)  # receive time - report time, seconds
    members: dict[int, MemberTally] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.source = ZmqPullSource(self.address)
        self.address = self.source.address

    def sink(self, producer: str | None = None, heartbeat_s: float | None = None) -> ZmqPushSink:
        """A PUSH sink connected to this collector (same context, so in-process addresses work)."""
        return ZmqPushSink(self.address, producer=producer, context=zmq.Context.instance(),
                           heartbeat_s=heartbeat_s)

    def expect(self, producers: Sequence[str]) -> None:
        """Name the producers (sinks) this collector waits for: one that never reports, or stops
        without closing, is named by :meth:`drain` and :meth:`producers`."""
        self.source.expect(producers)

    def poll(self, timeout_ms: int = 0) -> list[Received]:
        """Take what has arrived; return it (also kept in :attr:`tables`)."""
        return self._keep(self.source.poll(timeout_ms))

    def _keep(self, got: list[Received]) -> list[Received]:
        now = time.time()
        for r in got:
            self.tables[r.stream].append(r.batch)
            if r.stream == "swarm" and r.batch.num_rows:
                self._check(r.batch, now)
        return got

    def _check(self, batch: pa.RecordBatch, now: float) -> None:
        members = batch.column("member").to_numpy()
        seqs = batch.column("seq").to_numpy()
        self.latencies.extend((now - batch.column("time").to_numpy()).tolist())
        for m, s in zip(members.tolist(), seqs.tolist()):
            t = self.members.setdefault(m, MemberTally())
            t.received += 1
            if s > t.next_seq:
                t.gaps += s - t.next_seq
            elif s < t.next_seq:
                t.duplicates += 1
            t.next_seq = max(t.next_seq, s + 1)

    def drain(self, producers: int | Sequence[str], timeout_s: float = 30.0,
              stale_s: float | None = None) -> DrainResult:
        """Receive until ``producers`` sinks (a count or their names) have closed or time runs out.

        Returns:
            what arrived, with ``missing`` naming the producers that did not close (and
            ``silent`` those quiet for ``stale_s``); see :meth:`ZmqPullSource.drain`.
        """
        got = self.source.drain(producers, timeout_s, stale_s)
        self._keep(got)
        if got.missing:
            warnings.warn(f"Collector({self.address}): producers {got.missing} did not close their "
                          f"stream (silent: {got.silent}); their last reports may be missing", stacklevel=2)
        return got

    def producers(self) -> pd.DataFrame:
        """Per producer (sink): received, sent, lost, missing / corrupt / duplicated batch numbers,
        ended, and seconds since its last message (:meth:`ZmqPullSource.report`)."""
        return self.source.report()

    def frame(self, stream: str = "swarm") -> pd.DataFrame:
        """Everything received on ``stream`` as a DataFrame (empty with the schema's columns if nothing)."""
        batches = self.tables.get(stream, [])
        if not batches:
            from ..records import get_schema
            return get_schema(stream).empty_table().to_pandas()
        return pa.Table.from_batches(batches).to_pandas()

    def report(self, sent: dict[int, int] | None = None) -> pd.DataFrame:
        """Per member: reports sent (when ``sent`` is given), received, missing and gaps.

        ``sent`` maps member -> reports sent (:attr:`Swarm.sent`); members absent from it but
        received are listed too. ``lost`` = sent - received.
        """
        ids = sorted(set(self.members) | set(sent or {}))
        rows = []
        for m in ids:
            t = self.members.get(m, MemberTally())
            s = None if sent is None else sent.get(m, 0)
            rows.append({"member": m, "sent": s, "received": t.received, "lost": None if s is None else s - t.received,
                         "gaps": t.gaps, "duplicates": t.duplicates})
        return pd.DataFrame(rows, columns=["member", "sent", "received", "lost", "gaps", "duplicates"]).set_index("member")

    def latency_percentiles(self, q: tuple[float, ...] = (50, 95, 99)) -> dict[str, float]:
        """Report-to-receipt latency percentiles in milliseconds (NaN before anything arrived)."""
        lat = np.asarray(self.latencies) * 1e3
        return {f"p{int(p)}_ms": float(np.percentile(lat, p)) if lat.size else float("nan") for p in q}

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
