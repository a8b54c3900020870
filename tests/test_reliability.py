"""The fault suite: every injected fault is detected, named, and records lost = records reported lost.

The scenarios are those of ``benchmarks/reliability.py`` at small sizes: damaged Arrow files,
ZeroMQ links that drop or corrupt messages, a sink with no receiver, a killed producer, ranks
that raise, exit, are killed or hang, a NaN swarm member, a bus soak at twice the claimed rate,
the sockets a run listens on, and planners fed bad speeds.
"""
from __future__ import annotations

import os
import re
import sys
import time
import warnings
from pathlib import Path

import networkx as nx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reliability as rb  # noqa: E402

from adaptive_kit.distributed import launch  # noqa: E402
from adaptive_kit.partition import best_plan, plan_model  # noqa: E402
from adaptive_kit.partition.models import uneven_mlp  # noqa: E402
from adaptive_kit.partition.plan import milp_bound, partition_graph, refine  # noqa: E402
from adaptive_kit.records import (  # noqa: E402
    RecordsError,
    UndeliveredError,
    ZmqPullSource,
    ZmqPushSink,
    read_ipc,
    read_ipc_checked,
)


def accounted(row: dict) -> None:
    assert row["detected"] == "yes", row
    assert row["records lost"] == row["records reported lost"], row


# --- files -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["zeroed bytes", "flipped bytes", "truncated", "duplicated + reordered"])
def test_file_faults_are_detected_and_accounted(kind, tmp_path):
    row = rb._file_fault(kind, tmp_path)
    accounted(row)
    assert row["strict"] == "raises"


def test_zeroed_bytes_at_a_batch_boundary_name_the_lost_batch(tmp_path):
    path = tmp_path / "z.arrow"
    ends = rb._write_file(path, 10)
    data = bytearray(path.read_bytes())
    data[ends[4]:ends[4] + 8] = b"\0" * 8  # batch 5's length reads as an end-of-stream marker
    path.write_bytes(bytes(data))
    with pytest.raises(RecordsError, match=r"end-of-stream marker at byte \d+ with \d+ bytes after it; "
                                           r"missing batches 5; allow_partial=True reads the 9 good batches"):
        read_ipc(path)
    with pytest.warns(UserWarning, match="missing batches 5"):
        table = read_ipc(path, allow_partial=True)
    steps = table.column("step").to_pylist()
    assert len(steps) == 900 and 500 not in steps and 600 in steps  # the batches after it come back


def test_a_flipped_data_byte_fails_its_checksum(tmp_path):
    path = tmp_path / "f.arrow"
    ends = rb._write_file(path, 4)
    data = bytearray(path.read_bytes())
    data[ends[1] - 100] ^= 0x01  # one bit of a float in batch 1
    path.write_bytes(bytes(data))
    table, rep = read_ipc_checked(path)
    assert rep.corrupt == [1] and rep.missing == [] and rep.lost == 1 and not rep.ok and rep.complete
    assert table.num_rows == 300
    with pytest.raises(RecordsError, match="corrupt batches 1"):
        read_ipc(path)


def test_an_intact_file_reports_ok_and_its_count(tmp_path):
    path = tmp_path / "ok.arrow"
    rb._write_file(path, 3)
    table, rep = read_ipc_checked(path)
    assert rep.ok and rep.expected == 3 and rep.good == 3 and rep.rows == 300 and rep.summary() == "intact"
    assert table.equals(read_ipc(path))


def test_a_file_without_sequence_numbers_still_reads(tmp_path):
    import pyarrow as pa
    path = tmp_path / "plain.arrow"
    b = rb._batch(0)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, b.schema) as w:
        w.write_batch(b)
    table, rep = read_ipc_checked(path)
    assert not rep.checked and rep.ok and table.num_rows == 100


# --- ZeroMQ ----------------------------------------------------------------------------------

def test_a_sink_without_receiver_knows_from_the_first_message():
    row = rb.zmq_no_listener(n=5, timeout_ms=100)
    accounted(row)
    assert row["time to detection s"] < 2


def test_a_sink_without_receiver_can_raise():
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    sink = ZmqPushSink(address, producer="p", send_timeout_ms=50, on_undelivered="raise")
    with pytest.raises(UndeliveredError, match=r"message 0 not delivered .*is a receiver listening"):
        sink.write(rb._batch(0))
    assert sink.seq == 1 and sink.dropped_seqs == [0]
    sink.close()
    with pytest.raises(RecordsError, match="on_undelivered='maybe'"):
        ZmqPushSink(address, on_undelivered="maybe")


@pytest.mark.parametrize("kind", ["dropped messages", "corrupted messages"])
def test_link_faults_are_named_by_number(kind):
    row = rb.zmq_link_fault(kind, n=100)
    accounted(row)
    assert row["records lost"] > 0
    assert ("missing batches 50-54" if kind == "dropped messages" else "corrupt batches 33, 50") in row["named"]


@pytest.mark.timeout(120)
def test_a_killed_producer_is_named_silent_and_drain_returns_early():
    row = rb.zmq_killed_producer(run_s=0.5, stale_s=1.0)
    accounted(row)
    assert "silent ['doomed']" in row["named"] and "healthy ended=True" in row["named"]
    assert row["time to detection s"] < 10  # stale_s after the last heartbeat, not the 30 s timeout


def test_drain_names_producers_never_heard_from():
    with ZmqPullSource() as source:
        sink = ZmqPushSink(source.address, producer="a")
        sink.write(rb._batch(0))
        sink.close()
        t0 = time.monotonic()
        got = source.drain(["a", "b"], timeout_s=0.5)
        assert time.monotonic() - t0 < 3
        assert got.missing == ["b"] and not got.complete and len(got) == 1
        rep = source.report()
    assert rep.loc["b", "received"] == 0 and not bool(rep.loc["b", "ended"])
    assert rep.loc["a", "lost"] == 0 and bool(rep.loc["a", "ended"])


# --- distributed -----------------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["raises", "exits", "killed", "hangs"])
def test_the_failing_rank_is_named(how):
    row = rb.dist_fault(how, timeout_s=6.0, start_method="fork")
    assert row["detected"] == "yes", row
    expected = {"raises": r"worker rank 1 failed: ValueError: injected fault in rank 1",
                "exits": r"rank 1 died without a result \(exit code 3\)",
                "killed": r"rank 1 died without a result \(killed by SIGKILL\)",
                "hangs": r"timed out after 6 s waiting for ranks \[0, 1\]: rank 1 hung \(busy in its own "
                         r"code at faulty_worker"}[how]
    assert re.search(expected, row["named"]), row["named"]
    assert "rank 0 hung" not in row["named"]  # the healthy rank, waiting in its barrier, is not blamed


@pytest.mark.timeout(120)
def test_nothing_listens_beyond_loopback():
    row = rb.open_ports(start_method="fork")
    assert row["met"], row
    assert "127.0.0.1" in row["detail"]


def _listening(rank: int, world_size: int) -> list[str]:
    return sorted({ip for _, ip, _ in rb.listening_worker(rank, world_size)})


@pytest.mark.timeout(120)
def test_master_addr_is_where_the_store_listens(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.2")
    for var in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    ips = launch(_listening, 2, timeout_s=60, start_method="fork")
    assert "127.0.0.2" in ips[0] and all(ip.startswith("127.") for r in ips for ip in r)


# --- swarm -----------------------------------------------------------------------------------

def test_a_nan_member_is_quarantined_and_nothing_is_lost():
    row = rb.swarm_nan_member()
    accounted(row)
    assert "member 2 quarantined" in row["named"]


@pytest.mark.timeout(120)
def test_bus_soak_at_twice_the_claimed_rate_loses_nothing():
    row = rb.bus_soak(3.0)
    accounted(row)
    assert row["records lost"] == 0 and row["events"] >= 0.9 * 64 * 100 * 3
    assert "missing producers []" in row["named"]


# --- partition: bad inputs and reproducible plans --------------------------------------------

def _chain(costs):
    g = nx.DiGraph()
    for i, c in enumerate(costs):
        g.add_node(i, time_s=c)
        if i:
            g.add_edge(i - 1, i, bytes=8.0)
    return g


@pytest.mark.parametrize("speeds", [[0.0, 1.0], [-1.0, 1.0], [float("nan"), 1.0], [float("inf"), 1.0], [1.0]])
def test_planners_reject_bad_speeds(speeds):
    g = _chain([1.0, 2.0, 3.0])
    pattern = r"speeds must (be finite and > 0|have one entry per device)"
    with pytest.raises(ValueError, match=pattern):
        milp_bound(g, 2, speeds=speeds)
    with pytest.raises(ValueError, match=pattern):
        partition_graph(g, 2, speeds=speeds)
    with pytest.raises(ValueError, match=pattern):
        best_plan(g, 2, speeds=speeds)
    with pytest.raises(ValueError, match=pattern):
        refine(g, partition_graph(g, 2), speeds=speeds)


@pytest.mark.parametrize("bandwidth", [0.0, -5.0, float("nan")])
def test_planners_reject_bad_bandwidth(bandwidth):
    g = _chain([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        best_plan(g, 2, bandwidth=bandwidth)
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        partition_graph(g, 2, bandwidth=bandwidth)


def test_the_rows_of_the_benchmark_checks():
    rows = rb.bad_inputs()
    assert all(r["met"] for r in rows), rows


@pytest.mark.timeout(300)
def test_plans_repeat_across_five_runs(monkeypatch):
    """Five plans of one model under five different draws of timing noise (every node and the
    whole model off by up to +-30 %, as on a loaded machine) are the same plan. The noise is
    injected, so the test checks the planner's robustness, not this machine's quietness."""
    import numpy as np

    from adaptive_kit.partition import graph as graph_module

    real = graph_module._measure
    rng = np.random.default_rng(0)

    def noisy(t: float) -> float:
        return t * float(rng.uniform(0.7, 1.3))

    def measure(fn, args, kwargs, reps, device):
        flops, _, out = real(fn, args, kwargs, 0, device)
        return flops, noisy(2e-5 + 1e-10 * flops), out

    monkeypatch.setattr(graph_module, "_measure", measure)
    monkeypatch.setattr(graph_module, "_node_times", lambda g, runners, reps, device: {
        v: noisy(1e-5 + 1e-10 * g.nodes[v]["flops"]) for v in runners})
    torch.manual_seed(0)
    model = uneven_mlp([64, 512, 256, 128, 64, 32, 10])
    x = torch.randn(32, 64)
    plans = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(5):
            mp = plan_model(model, x, 3, reps=3, split=False)
            plans.add(tuple(sorted(mp.plan.stage_of.items())))
    assert len(plans) == 1, plans


def test_no_worker_left_running():
    import multiprocessing as mp
    assert mp.active_children() == [] or all(not p.name.startswith("adaptive-kit") for p in mp.active_children())
    assert os.getpid() > 0
