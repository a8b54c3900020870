"""Several ranks stream telemetry to one analysis process over ZeroMQ, as under torchrun."""
import pyarrow as pa
import pytest
from dist_workers import telemetry_worker

from adaptive_kit.distributed import launch
from adaptive_kit.records import ZmqPullSource


@pytest.mark.timeout(120)
def test_two_ranks_stream_telemetry_to_one_receiver_without_loss():
    steps = 6
    with ZmqPullSource() as source:
        results = launch(telemetry_worker, 2, (source.address, steps), timeout_s=90)
        received = source.drain(producers=2, timeout_s=30)
        report = source.report()
    assert [r["rank"] for r in results] == [0, 1]
    assert set(report.index) == {"rank0", "rank1"}
    # one batch per level in use (meso grads, macro weights) per step and rank
    assert (report["received"] == 2 * steps).all() and (report["sent"] == 2 * steps).all()
    assert (report["lost"] == 0).all() and (report["gaps"] == 0).all()
    assert report.loc["rank0", "bytes"] == results[0]["bytes"]
    table = pa.Table.from_batches([r.batch for r in received]).to_pandas()
    assert set(table["rank"]) == {0, 1} and set(table["level"]) == {"meso", "macro"}
    assert sorted(table["step"].unique()) == list(range(steps))
    # gradients are all-reduced after collection: each rank saw its own, different gradients
    g0 = table[(table["rank"] == 0) & (table["kind"] == "grad") & (table["step"] == 0)]["norm"].to_numpy()
    g1 = table[(table["rank"] == 1) & (table["kind"] == "grad") & (table["step"] == 0)]["norm"].to_numpy()
    assert len(g0) == len(g1) == 2 and not (g0 == g1).all()
    # weights start identical on every rank and stay identical: macro weight rows agree
    w = table[(table["kind"] == "weight") & (table["step"] == steps - 1)].set_index("rank")["norm"]
    assert w.loc[0] == pytest.approx(w.loc[1], rel=1e-6)
