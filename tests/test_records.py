"""Arrow schemas, record batches, memory/file sinks and the ZeroMQ transport."""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import warnings

import dist_workers
import numpy as np
import pyarrow as pa
import pytest
import torch
import zmq

from adaptive_kit.distributed import launch
from adaptive_kit.records import (
    EOS,
    SCHEMAS,
    IPCFileSink,
    MemorySink,
    RecordsError,
    ZmqPullSource,
    ZmqPushSink,
    get_schema,
    read_ipc,
    register_schema,
    stats_batch,
    to_batch,
)
from adaptive_kit.stats import STAT_NAMES, HostCopy, batched_stats

# One valid row per schema: every field set, with a value of that field's type.
ROWS = {
    "stats": {"step": 3, "time": 1.5, "rank": 1, "kind": "grad", "layer": "fc1",
              **{n: (7 if n in ("count", "nonfinite") else 0.25) for n in STAT_NAMES}},
    "scalars": {"step": 3, "time": 1.5, "rank": 0, "name": "loss", "value": 0.75},
    "resources": {"time": 1.5, "device": "cpu", "util_percent": 12.5, "mem_used_bytes": 10,
                  "mem_total_bytes": 20, "torch_allocated_bytes": None,
                  "torch_reserved_bytes": None, "process_rss_bytes": 5},
}


def scalars(steps, name="loss", rank=0):
    steps = list(steps)
    return to_batch("scalars", {"step": steps, "time": 100.0, "rank": rank, "name": name,
                                "value": [s * 0.5 for s in steps]})


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- schemas and batches ---------------------------------------------------------------------

def test_rows_cover_every_builtin_schema():
    assert set(ROWS) <= set(SCHEMAS)
    for name in ("stats", "scalars", "resources"):
        assert set(ROWS[name]) == set(SCHEMAS[name].names)


@pytest.mark.parametrize("stream", ["stats", "scalars", "resources"])
def test_to_batch_columns_and_broadcast(stream):
    schema = SCHEMAS[stream]
    one = to_batch(stream, ROWS[stream])
    assert one.schema.equals(schema)
    assert one.num_rows == 1
    assert one.to_pylist() == [ROWS[stream]]

    # one list column of length 3, every other field a scalar broadcast to 3 rows
    first = schema.names[0]
    base = ROWS[stream][first]
    cols = dict(ROWS[stream], **{first: [base, base + 1, base + 2]})
    b = to_batch(stream, cols)
    assert b.num_rows == 3
    assert b.column(first).to_pylist() == [base, base + 1, base + 2]
    for name in schema.names[1:]:
        assert b.column(name).to_pylist() == [ROWS[stream][name]] * 3, name


def test_to_batch_accepts_numpy_and_torch_columns_and_scalars():
    b = to_batch("scalars", {"step": np.arange(4), "time": np.float64(2.0), "rank": torch.tensor(1),
                             "name": ["a", "b", "c", "d"], "value": torch.linspace(0, 1, 4)})
    assert b.column("step").to_pylist() == [0, 1, 2, 3]
    assert b.column("rank").to_pylist() == [1, 1, 1, 1]  # a 0-d tensor is a scalar
    assert b.column("time").to_pylist() == [2.0] * 4
    np.testing.assert_allclose(b.column("value").to_numpy(), [0, 1 / 3, 2 / 3, 1], rtol=1e-6)
    # a loss tensor (0-d) and a 0-d numpy array broadcast like Python scalars
    loss = torch.tensor(0.125, requires_grad=True) * 2
    b = to_batch("scalars", dict(ROWS["scalars"], step=[1, 2], value=loss, time=np.array(3.0)))
    assert b.column("value").to_pylist() == [0.25, 0.25]
    assert b.column("time").to_pylist() == [3.0, 3.0]


def test_to_batch_missing_and_unknown_fields():
    cols = dict(ROWS["scalars"])
    del cols["value"]
    with pytest.raises(RecordsError, match=r"scalars: missing fields \['value'\], unknown fields \[\]"):
        to_batch("scalars", cols)
    with pytest.raises(RecordsError, match=r"unknown fields \['bogus'\]"):
        to_batch("scalars", dict(ROWS["scalars"], bogus=1))


@pytest.mark.parametrize(
    ("stream", "field", "value", "shown"),
    [
        ("scalars", "step", "abc", "['abc']"),
        ("scalars", "step", [1, "x"], "[1, 'x']"),
        ("scalars", "value", "high", "['high']"),
        ("stats", "count", 2.5, "[2.5]"),
        ("resources", "mem_used_bytes", "lots", "['lots']"),
        ("resources", "device", 3, "[3]"),
    ],
)
def test_to_batch_wrong_type_names_field_and_value(stream, field, value, shown):
    with pytest.raises(RecordsError, match=re.escape(f"{stream}.{field}={shown}: not ")):
        to_batch(stream, dict(ROWS[stream], **{field: value}))


def test_to_batch_mismatched_lengths():
    with pytest.raises(RecordsError, match=r"scalars: columns of different lengths \{'step': 2, 'value': 3\}"):
        to_batch("scalars", dict(ROWS["scalars"], step=[1, 2], value=[0.1, 0.2, 0.3]))


def test_register_and_get_schema():
    custom = pa.schema([("step", pa.int64()), ("x", pa.float32())])
    try:
        register_schema("test_custom", custom)
        register_schema("test_custom", pa.schema([("step", pa.int64()), ("x", pa.float32())]))
        assert get_schema("test_custom").equals(custom)
        b = to_batch("test_custom", {"step": [1, 2], "x": 0.5})
        assert b.schema.field("x").type == pa.float32()
        with pytest.raises(RecordsError, match=r"register_schema\(name='test_custom'\): a different schema"):
            register_schema("test_custom", pa.schema([("step", pa.int32())]))
        assert get_schema("test_custom").equals(custom)  # the failed call changed nothing
        with pytest.raises(RecordsError, match=r"register_schema\(name='scalars'\)"):
            register_schema("scalars", custom)
    finally:
        SCHEMAS.pop("test_custom", None)
    with pytest.raises(RecordsError, match=r"stream='nope': unknown; known streams are \[.*'scalars'"):
        get_schema("nope")
    with pytest.raises(RecordsError, match=r"stream='nope'"):
        to_batch("nope", {})


def test_stats_batch_round_trips_batched_stats():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=g)
    b = torch.zeros(3)
    x = torch.randn(300, generator=g)  # spans two chunks of the padded layout
    x[10] = float("nan")
    x[20] = float("inf")
    layers = ["fc.weight+bias", "act"]
    values = HostCopy(batched_stats({layers[0]: [w, b], layers[1]: x})).wait()
    batch = stats_batch(values, layers, step=12, kind="grad", rank=2, t=99.5)

    assert batch.schema.equals(SCHEMAS["stats"])
    assert batch.num_rows == 2
    assert batch.column("layer").to_pylist() == layers
    assert batch.column("step").to_pylist() == [12, 12]
    assert batch.column("rank").to_pylist() == [2, 2]
    assert batch.column("kind").to_pylist() == ["grad", "grad"]
    assert batch.column("time").to_pylist() == [99.5, 99.5]
    for i, name in enumerate(STAT_NAMES):
        col = batch.column(name)
        if name in ("count", "nonfinite"):
            assert col.type == pa.int64()
        np.testing.assert_array_equal(col.to_numpy(), values[:, i].numpy(), err_msg=name)
    # and the numbers are the right ones (torch as the oracle)
    wb = torch.cat([w.reshape(-1), b])
    fin = x[torch.isfinite(x)]
    assert batch.column("count").to_pylist() == [38, 300]
    assert batch.column("nonfinite").to_pylist() == [0, 2]
    np.testing.assert_allclose(batch.column("mean").to_numpy(), [wb.mean(), fin.mean()], rtol=1e-5)
    np.testing.assert_allclose(batch.column("std").to_numpy(),
                               [wb.std(correction=0), fin.std(correction=0)], rtol=1e-5)
    np.testing.assert_allclose(batch.column("max").to_numpy(), [wb.max(), fin.max()])
    np.testing.assert_allclose(batch.column("zero_frac").to_numpy(), [3 / 38, 0.0])
    assert batch.to_pandas().set_index("layer").loc["act", "nonfinite"] == 2


def test_stats_batch_time_defaults_to_now():
    before = time.time()
    batch = stats_batch(batched_stats([torch.ones(4)]), ["a"], step=0, kind="weight")
    assert before <= batch.column("time")[0].as_py() <= time.time()


@pytest.mark.parametrize("shape", [(2, 7), (3, 8), (8,), (1, 2, 8)])
def test_stats_batch_rejects_wrong_shapes(shape):
    with pytest.raises(RecordsError, match=re.escape(f"stats_batch(values.shape={shape}): expected (2, 8)")):
        stats_batch(torch.zeros(shape, dtype=torch.float64), ["a", "b"], step=0, kind="grad")


def test_stats_batch_rejects_device_tensor():
    with pytest.raises(RecordsError, match=r"stats_batch\(values.device=meta\)"):
        stats_batch(torch.zeros(2, 8, device="meta"), ["a", "b"], step=0, kind="grad")


# --- memory sink -----------------------------------------------------------------------------

def test_memory_sink_counts_and_tables():
    sink = MemorySink()
    other = MemorySink()
    assert sink.producer != other.producer
    assert str(os.getpid()) in sink.producer
    assert (sink.seq, sink.rows, sink.bytes) == (0, 0, 0)
    with pytest.raises(RecordsError, match=r"holds no batches"):
        sink.table()

    batches = [scalars(range(0, 3)), scalars(range(3, 8)), scalars([8])]
    for b in batches:
        sink.write(b, stream="scalars")
    assert sink.seq == 3
    assert sink.rows == 9
    assert sink.bytes == sum(pa.ipc.get_record_batch_size(b) for b in batches)
    assert sink.dropped == 0
    table = sink.table()
    assert table.num_rows == 9
    assert table.column("step").to_pylist() == list(range(9))
    df = sink.to_pandas()
    assert list(df.columns) == SCHEMAS["scalars"].names
    assert df["value"].tolist() == [s * 0.5 for s in range(9)]

    with pytest.raises(RecordsError, match=r"write\(batch=dict\): expected a pyarrow.RecordBatch"):
        sink.write({"step": 1})
    with pytest.raises(RecordsError, match=r"write\(batch=Table\)"):
        sink.write(table)
    assert sink.seq == 3  # rejected writes are not counted

    with MemorySink(producer="p1") as s2:
        s2.write(batches[0])
    assert s2.closed
    with pytest.raises(RecordsError, match=r"MemorySink\(producer='p1'\) is closed"):
        s2.write(batches[0])
    assert s2.seq == 1


# --- IPC files -------------------------------------------------------------------------------

def write_file(path, batches):
    sink = IPCFileSink(path, producer="file")
    for b in batches:
        sink.write(b)
    sink.close()
    return sink


def test_ipc_file_round_trip_and_bytes(tmp_path):
    path = tmp_path / "run.arrow"
    batches = [scalars(range(i * 4, i * 4 + 4), name=f"m{i}") for i in range(5)]
    sink = write_file(path, batches)
    assert sink.seq == 5 and sink.rows == 20
    assert sink.bytes == path.stat().st_size
    assert path.read_bytes().endswith(EOS)
    table = read_ipc(path)
    assert table.equals(pa.Table.from_batches(batches))
    assert table.to_batches()[2].equals(batches[2])
    sink.close()  # closing twice is harmless
    with pytest.raises(RecordsError, match=r"IPCFileSink\(producer='file'\) is closed"):
        sink.write(batches[0])


def test_ipc_file_schema_change_raises(tmp_path):
    path = tmp_path / "mixed.arrow"
    sink = IPCFileSink(path)
    sink.write(scalars([1, 2]))
    with pytest.raises(RecordsError, match=re.escape(str(path)) + r": batch schema \['time', 'device'"):
        sink.write(to_batch("resources", ROWS["resources"]))
    assert sink.seq == 1
    sink.write(scalars([3]))
    sink.close()
    assert read_ipc(path).column("step").to_pylist() == [1, 2, 3]


def test_ipc_file_truncated(tmp_path):
    batches = [scalars(range(i * 3, i * 3 + 3)) for i in range(4)]
    good = tmp_path / "good.arrow"
    sink = IPCFileSink(good)
    ends = []  # file size after each batch: the sink flushes every write
    for b in batches:
        sink.write(b)
        ends.append(good.stat().st_size)
    assert sink.bytes == ends[-1]
    sink.close()
    data = good.read_bytes()
    assert len(data) == sink.bytes and data.endswith(EOS)
    assert len(data) > ends[-1] + len(EOS)  # the trailer: how many batches the file holds

    cases = {  # bytes kept: complete batches before the cut
        len(data) - 4: 4,  # half of the end-of-stream marker
        len(data) - len(EOS): 4,  # the trailer, but no end-of-stream marker
        ends[-1]: 4,  # the writer was never closed: every batch, no trailer
        ends[-1] + 4: 4,  # half of the trailer
        ends[-1] - 1: 3,  # one byte short of the last batch
        ends[-1] - 30: 3,
        ends[1] + 10: 2,  # inside the metadata of batch 3
        ends[0]: 1,
    }
    for keep, complete in cases.items():
        path = tmp_path / f"cut{keep}.arrow"
        path.write_bytes(data[:keep])
        with pytest.raises(RecordsError, match=re.escape(f"read_ipc(path={str(path)!r})")) as info:
            read_ipc(path)
        assert f"after {complete} complete batches" in str(info.value), (keep, str(info.value))
        assert "allow_partial=True" in str(info.value)
        with pytest.warns(UserWarning, match=rf"after {complete} complete batches"):
            table = read_ipc(path, allow_partial=True)
        assert table.equals(pa.Table.from_batches(batches[:complete], schema=batches[0].schema)), keep

    # a file cut inside its schema message is not a stream at all
    path = tmp_path / "head.arrow"
    path.write_bytes(data[:20])
    with pytest.raises(RecordsError, match=re.escape(f"read_ipc(path={str(path)!r}): not an Arrow IPC stream")):
        read_ipc(path, allow_partial=True)


def test_ipc_file_bad_files(tmp_path):
    missing = tmp_path / "missing.arrow"
    with pytest.raises(RecordsError, match=re.escape(f"read_ipc(path={str(missing)!r}): no such file")):
        read_ipc(missing)
    with pytest.raises(RecordsError, match=r"no such file"):
        read_ipc(tmp_path)  # a directory
    empty = tmp_path / "empty.arrow"
    empty.write_bytes(b"")
    with pytest.raises(RecordsError, match=re.escape(f"read_ipc(path={str(empty)!r}): the file is empty")):
        read_ipc(empty, allow_partial=True)
    rng = np.random.default_rng(0)
    garbage = tmp_path / "garbage.arrow"
    for n in (1, 7, 64, 1000):
        garbage.write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        with pytest.raises(RecordsError, match=re.escape(f"read_ipc(path={str(garbage)!r})")):
            read_ipc(garbage)


def test_ipc_file_single_byte_damage_never_escapes_as_another_error(tmp_path):
    """Any one changed byte gives a table or a RecordsError, never a raw pyarrow error."""
    good = tmp_path / "good.arrow"
    write_file(good, [scalars([1, 2, 3]), scalars([4, 5])])
    data = good.read_bytes()
    bad = tmp_path / "bad.arrow"
    outcomes = {"table": 0, "error": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(len(data)):
            for value in (0x00, 0xFF):
                damaged = bytearray(data)
                damaged[k] = value
                bad.write_bytes(bytes(damaged))
                try:
                    table = read_ipc(bad, allow_partial=True)
                    table.validate(full=True)  # what comes back is safe to read
                    table.to_pylist()
                    outcomes["table"] += 1
                except RecordsError:
                    outcomes["error"] += 1
    assert outcomes["error"] > 0 and outcomes["table"] > 0


# --- ZeroMQ ----------------------------------------------------------------------------------

def _send_n(address, producer, n, counts):
    sink = ZmqPushSink(address, producer=producer)
    for i in range(n):
        sink.write(scalars(range(i, i + 2), name=producer), stream="scalars")
    sink.close()
    counts[producer] = (sink.seq, sink.rows, sink.bytes, sink.dropped)


def test_zmq_two_producers_no_loss():
    n = 40
    with ZmqPullSource() as source:
        assert source.address.startswith("tcp://127.0.0.1:")
        assert int(source.address.rsplit(":", 1)[1]) > 0
        counts: dict[str, tuple] = {}
        threads = [threading.Thread(target=_send_n, args=(source.address, p, n, counts))
                   for p in ("alpha", "beta")]
        for t in threads:
            t.start()
        got = source.drain(2, timeout_s=30)
        for t in threads:
            t.join(timeout=30)
        report = source.report()

    assert len(got) == 2 * n
    for p in ("alpha", "beta"):
        mine = [r for r in got if r.producer == p]
        assert [r.seq for r in mine] == list(range(n))  # one PUSH socket keeps its order
        assert all(r.stream == "scalars" for r in mine)
        assert mine[5].batch.equals(scalars(range(5, 7), name=p))
        assert all(r.sent_time > 0 for r in mine)
        sent, rows, nbytes, dropped = counts[p]
        assert (sent, rows, dropped) == (n, 2 * n, 0)
        row = report.loc[p]
        assert row["received"] == n and row["sent"] == n
        assert row["gaps"] == 0 and row["lost"] == 0 and row["out_of_order"] == 0
        assert bool(row["ended"])
        assert row["bytes"] == nbytes  # what arrived is what the sink counted, end message included
    assert source.corrupt == 0


def test_zmq_gap_is_reported_as_loss():
    with ZmqPullSource() as source:
        sink = ZmqPushSink(source.address, producer="gappy")
        sink.write(scalars([0]))
        sink.seq += 2  # seq 1 and 2 "lost on the way"
        sink.write(scalars([3]))
        sink.write(scalars([4]))
        sink.close()
        got = source.drain(1, timeout_s=10)
        report = source.report()
    assert [r.seq for r in got] == [0, 3, 4]
    row = report.loc["gappy"]
    assert (row["received"], row["sent"], row["gaps"], row["lost"]) == (3, 5, 2, 2)
    assert row["bytes"] == sink.bytes


def test_zmq_drain_times_out_without_end_message():
    with ZmqPullSource() as source:
        sink = ZmqPushSink(source.address, producer="open")
        sink.write(scalars([0, 1]))
        got = source.poll(10_000)  # waits for the first message only
        t0 = time.monotonic()
        more = source.drain(1, timeout_s=1.0)
        elapsed = time.monotonic() - t0
        report = source.report()
        sink.close()
    assert 0.9 <= elapsed < 5
    assert len(got) == 1 and more == []
    row = report.loc["open"]
    assert row["received"] == 1 and not bool(row["ended"])
    assert row["sent"] is None or np.isnan(row["sent"])  # unknown until the producer ends


def _batch_message(producer, seq):
    payload = pa.BufferOutputStream()
    b = scalars([seq])
    with pa.ipc.new_stream(payload, b.schema) as w:
        w.write_batch(b)
    header = json.dumps({"type": "batch", "producer": producer, "stream": "scalars", "seq": seq,
                         "time": 1.0}).encode()
    return [header, payload.getvalue().to_pybytes()]


def test_zmq_corrupt_messages_are_counted_not_raised():
    good_header, good_payload = _batch_message("raw", 0)
    hand_made = [
        [b"\xff\xfenot json", b"x"],
        [b"[1, 2, 3]", b"x"],  # JSON, but not a header
        [json.dumps({"type": "batch", "seq": 0}).encode(), good_payload],  # no producer
        [good_header],  # no payload frame
        [good_header, b"garbage payload"],
        [json.dumps({"type": "batch", "producer": "raw", "seq": "x"}).encode(), good_payload],
        [json.dumps({"type": "batch", "producer": "raw", "seq": 0, "time": "noon"}).encode(),
         good_payload],
        [json.dumps({"type": "end", "producer": "raw2", "sent": "many"}).encode(), b""],
    ]
    # every single-byte change of a valid payload: each decodes or is counted, none raises
    fuzzed = []
    for k in range(len(good_payload)):
        for value in (0x00, 0xFF, 0x80):
            damaged = bytearray(good_payload)
            damaged[k] = value
            fuzzed.append([good_header, bytes(damaged)])
    messages = hand_made + fuzzed + [_batch_message("raw", 1)]

    ctx = zmq.Context.instance()
    with ZmqPullSource() as source:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(source.address)
        try:
            for m in messages:
                push.send_multipart(m)
            got = []
            deadline = time.monotonic() + 20
            dups = lambda: sum(len(t.duplicated) for t in source.tally.values())  # noqa: E731
            while len(got) + source.corrupt + dups() < len(messages) and time.monotonic() < deadline:
                got.extend(source.poll(100))
        finally:
            push.close()
        report = source.report()
    # a decodable copy of batch 0 after the first is a duplicate: counted by number, handed on once
    assert len(got) + source.corrupt + dups() == len(messages)
    assert set(report.loc["raw", "duplicated"]) <= {0}
    assert source.corrupt >= len(hand_made)
    for r in got:  # what is handed on is safe to read
        r.batch.validate(full=True)
        r.batch.to_pylist()
    assert got[-1].seq == 1 and got[-1].batch.equals(scalars([1]))
    assert report.loc["raw", "received"] == len(got)
    assert not bool(report.loc["raw2", "ended"])  # an unreadable end message ends nothing


@pytest.mark.parametrize("address", ["not-an-address", "tcp://127.0.0.1:notaport", "foo://bar", 5])
def test_zmq_sink_bad_address(address):
    with pytest.raises(RecordsError, match=re.escape(f"ZmqPushSink(address={address!r})")):
        ZmqPushSink(address)


def test_zmq_source_bad_address():
    with ZmqPullSource() as taken:
        with pytest.raises(RecordsError, match=re.escape(f"ZmqPullSource(address={taken.address!r}): cannot bind")):
            ZmqPullSource(taken.address)


def test_zmq_sink_without_receiver_drops_and_warns():
    # PUSH queues up to its high-water mark even with no peer, then blocks for SNDTIMEO:
    # a context whose sockets default to SNDHWM=1 makes that point come after one message.
    ctx = zmq.Context()
    ctx.setsockopt(zmq.SNDHWM, 1)
    try:
        address = f"tcp://127.0.0.1:{free_port()}"  # nobody listens there
        sink = ZmqPushSink(address, producer="lonely", send_timeout_ms=50, context=ctx)
        t0 = time.monotonic()
        with pytest.warns(UserWarning, match=re.escape(f"ZmqPushSink({address}): message")) as rec:
            for i in range(5):
                sink.write(scalars([i]))
            sink.close()
        elapsed = time.monotonic() - t0
    finally:
        ctx.destroy(linger=0)
    assert elapsed < 5
    assert sink.seq == 5  # every batch is counted as sent, and those not delivered as dropped
    assert 4 <= sink.dropped <= 6  # at most the high-water mark's worth queued; end message too
    drops = [str(w.message) for w in rec]
    # one warning from the first message (the outage starts), one summary at close
    assert len(drops) == 2, drops
    assert "message 0 not delivered within the send timeout" in drops[0] and "; 1 dropped so far" in drops[0]
    assert f"{sink.dropped} messages not delivered (batches 0-4, and the end message) of 5" in drops[1]
    assert sink.dropped_seqs == [0, 1, 2, 3, 4]


@pytest.mark.timeout(120)
def test_zmq_two_processes_stream_without_loss():
    n = 30
    with ZmqPullSource() as source:
        results = launch(dist_workers.zmq_stream_worker, 2, (source.address, n), timeout_s=90)
        got = source.drain(2, timeout_s=30)
        report = source.report()
    assert [r["producer"] for r in results] == ["rank0", "rank1"]
    assert len(got) == 2 * n
    assert source.corrupt == 0
    for r in results:
        row = report.loc[r["producer"]]
        assert r["sent"] == n and r["rows"] == 3 * n and r["dropped"] == 0
        assert row["received"] == n and row["sent"] == n
        assert row["gaps"] == 0 and row["lost"] == 0 and bool(row["ended"])
        assert row["bytes"] == r["bytes"]
    rank1 = [g for g in got if g.producer == "rank1"]
    assert rank1[-1].batch.column("rank").to_pylist() == [1, 1, 1]
    assert rank1[-1].batch.column("step").to_pylist() == [n - 1] * 3
