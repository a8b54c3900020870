"""ZeroMQ transport: a PUSH sink and a PULL source carrying Arrow IPC batches, with delivery counts."""
from __future__ import annotations

import json
import threading
import time
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
import zmq

from .ipc import IntegrityReport, _batch_bytes, _ranges
from .schemas import RecordsError
from .sinks import Sink

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
