"""The swarm's bus: what a Swarm sends reaches its Collector (per-member sequence check, report
frames, weight statistics, alarms), hand-made gaps are counted, latencies, addresses."""
import math
import time

import numpy as np
import pytest

from adaptive_kit.datasets import digits
from adaptive_kit.records import ZmqPushSink, to_batch
from adaptive_kit.swarm import (
    ALARM_SCHEMA,
    SWARM_SCHEMA,
    Collector,
    Layer,
    MemberSpec,
    OptimiserConfig,
    Swarm,
    SwarmConfig,
)

NO_EVOLVE = OptimiserConfig(exploit_every=0)


@pytest.fixture(scope="module")
def data():
    return digits(seed=0)


def receive_all(collector, expected_rows, timeout_s=5.0):
    """Poll until ``expected_rows`` swarm rows have arrived (or time runs out)."""
    deadline = time.monotonic() + timeout_s
    while sum(t.received for t in collector.members.values()) < expected_rows and time.monotonic() < deadline:
        collector.poll(50)


def row(member, seq, **over):
    """One hand-made report of the swarm schema."""
    cols = {name: 0 for name in SWARM_SCHEMA.names}
    cols.update(time=time.time(), member=member, seq=seq, arch="linear8/relu", device="cpu", status="active",
                origin="init", gpu_bytes=None)
    cols.update(over)
    return cols


def send(sink, rows):
    sink.write(to_batch("swarm", {k: [r[k] for r in rows] for k in rows[0]}), "swarm")


def test_collector_receives_everything_a_swarm_sends(data):
    specs = [MemberSpec((Layer("linear", 16),), lr=0.05), MemberSpec((Layer("linear", 8), Layer("linear", 8, "tanh"))),
             MemberSpec(layers=()), MemberSpec((Layer("linear", 16),), lr=0.1)]
    cfg = SwarmConfig(members=4, steps_per_round=5, seed=0, eval_rows=128, optimiser=NO_EVOLVE)
    rounds = 3
    with Swarm(data, cfg, specs=specs) as swarm:
        c = swarm.collector
        assert c.frame("swarm").columns.tolist() == SWARM_SCHEMA.names  # nothing yet: empty, with the columns
        assert all(math.isnan(v) for v in c.latency_percentiles().values())
        swarm.inject(2, "nan")
        swarm.run(rounds, progress=False)
        sent = swarm.sent
        n_rows = sum(sent.values())
        assert sent == {0: 3, 1: 3, 2: 1, 3: 3}  # the quarantined member stops reporting
        receive_all(c, n_rows)
        rep = c.report(sent)
        assert rep.index.tolist() == [0, 1, 2, 3]
        assert (rep["lost"] == 0).all() and (rep["gaps"] == 0).all() and (rep["duplicates"] == 0).all()
        assert rep["received"].tolist() == [3, 3, 1, 3]

        frame = c.frame("swarm")
        assert frame.columns.tolist() == SWARM_SCHEMA.names
        assert len(frame) == n_rows == len(swarm.history())
        cols = ["member", "seq", "round", "step", "steps", "val_acc", "arch", "status"]
        got = frame[cols].sort_values(["round", "member"]).reset_index(drop=True)
        assert got.equals(swarm.history()[cols].astype(got.dtypes.to_dict()).reset_index(drop=True))
        assert frame.groupby("round").size().tolist() == [4, 3, 3]

        stats = c.frame("stats")
        assert set(stats["kind"]) == {"weight"}
        assert set(stats["rank"]) == {0, 1, 3}  # rank = member; the NaN member's weights are not reported
        for m in swarm.members:
            mine = stats[stats["rank"] == m.id]
            names = swarm.layer_names(m.spec)
            assert names == [f"h{i}" for i in range(len(m.spec.layers))] + ["out"]
            if not m.active:
                assert mine.empty
                continue
            assert len(mine) == rounds * len(names)
            assert mine["layer"].tolist() == names * rounds
            # the last round's numbers are those of the member's current weights
            last = mine.iloc[-len(names):].set_index("layer")
            assert (last["step"] == m.steps).all()
            tensors = list(m.params.values())  # weight, bias per layer, in order
            for j, name in enumerate(names):
                layer = tensors[2 * j: 2 * j + 2]
                assert last.loc[name, "count"] == sum(t.numel() for t in layer)
                assert last.loc[name, "norm"] == pytest.approx(
                    math.sqrt(sum(float((t.double() ** 2).sum()) for t in layer)), rel=1e-6)
                assert last.loc[name, "nonfinite"] == 0

        alarms = c.frame("swarm_alarms")
        assert alarms.columns.tolist() == ALARM_SCHEMA.names
        assert alarms[["round", "member", "detector"]].values.tolist() == [[0, 2, "nonfinite"]]

        lat = c.latency_percentiles()
        assert set(lat) == {"p50_ms", "p95_ms", "p99_ms"}
        assert all(math.isfinite(v) and v >= 0 for v in lat.values())
        assert lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"]


def test_param_layers_selects_the_reported_layers(data):
    specs = [MemberSpec((Layer("linear", 8), Layer("linear", 8))) for _ in range(2)]
    cfg = SwarmConfig(members=2, steps_per_round=2, seed=0, eval_rows=64, optimiser=NO_EVOLVE, param_layers=("h1", "out"))
    with Swarm(data, cfg, specs=specs) as swarm:
        swarm.run(2, progress=False)
        receive_all(swarm.collector, 4)
        stats = swarm.collector.frame("stats")
        assert stats["layer"].tolist() == ["h1", "out"] * 4
        assert stats["rank"].tolist() == [0, 0, 1, 1] * 2


def test_a_gap_in_a_members_sequence_is_counted():
    with Collector() as c:
        sink = c.sink("hand")
        send(sink, [row(0, 0), row(1, 0)])
        send(sink, [row(0, 2), row(1, 1)])  # member 0 skips seq 1
        send(sink, [row(0, 2)])  # and repeats 2
        sink.close()
        c.drain(1, timeout_s=5.0)
        rep = c.report({0: 3, 1: 2})
        assert rep.loc[0, ["received", "gaps", "duplicates", "lost"]].tolist() == [3, 1, 1, 0]
        assert rep.loc[1, ["received", "gaps", "duplicates", "lost"]].tolist() == [2, 0, 0, 0]
        assert len(c.frame("swarm")) == 5
        # members received but missing from ``sent`` are listed; sent counts for silent members too
        rep = c.report({0: 3, 7: 4})
        assert rep.index.tolist() == [0, 1, 7]
        assert rep.loc[7, ["sent", "received", "lost"]].tolist() == [4, 0, 4]
        assert rep.loc[1, "sent"] == 0 and rep.loc[1, "lost"] == -2
        assert c.report()["lost"].isna().all()


def test_a_gap_over_tcp_from_another_sink():
    with Collector("tcp://127.0.0.1:*") as c:
        assert c.address.startswith("tcp://127.0.0.1:") and not c.address.endswith("*")
        assert int(c.address.rsplit(":", 1)[1]) > 0
        sink = ZmqPushSink(c.address, producer="tcp-test")
        send(sink, [row(4, 0)])
        send(sink, [row(4, 2)])
        sink.close()
        c.drain(1, timeout_s=5.0)
        rep = c.report({4: 3})
        assert rep.loc[4, ["received", "gaps", "lost"]].tolist() == [2, 1, 1]
        lat = c.latency_percentiles((50,))
        assert list(lat) == ["p50_ms"] and np.isfinite(lat["p50_ms"])


def test_collector_latency_is_receipt_minus_report_time():
    with Collector() as c:
        sink = c.sink()
        send(sink, [row(0, 0, time=time.time() - 2.0)])  # reported two seconds ago
        sink.close()
        c.drain(1, timeout_s=5.0)
        assert len(c.latencies) == 1
        assert 2000 <= c.latency_percentiles()["p50_ms"] < 4000


def test_drain_names_the_producer_that_never_closed():
    with Collector() as c:
        c.expect(["rank0", "rank1"])
        closed, open_ = c.sink("rank0"), c.sink("rank1", heartbeat_s=0.1)
        send(closed, [row(0, 0)])
        send(open_, [row(1, 0)])
        closed.close()
        t0 = time.monotonic()
        with pytest.warns(UserWarning, match=r"producers \['rank1'\] did not close"):
            got = c.drain(["rank0", "rank1"], timeout_s=1.0)
        assert 0.9 <= time.monotonic() - t0 < 5
        assert got.missing == ["rank1"] and got.silent == [] and len(got) == 2
        open_.close()  # its heartbeats stop; its end message arrives
        assert c.drain(["rank0", "rank1"], timeout_s=5).complete
        producers = c.producers()
    assert producers["ended"].tolist() == [True, True]
    assert producers["lost"].tolist() == [0, 0] and producers["missing"].tolist() == [[], []]
