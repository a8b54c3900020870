"""A swarm on two gloo ranks (spawned processes) against the same swarm in one process; members
spread across GPUs (one rank per GPU) when there are several."""
import numpy as np
import pytest
import torch

from adaptive_kit.datasets import digits
from adaptive_kit.swarm import OptimiserConfig, Swarm, SwarmConfig, train_distributed


@pytest.fixture(scope="module")
def data():
    return digits(seed=0)


@pytest.mark.timeout(180)
def test_two_ranks_match_one_process_and_lose_no_report(data):
    # exploit after rounds 2 and 3, with breeding: weights cross ranks when a parent lives on the other one
    pol = OptimiserConfig(exploit_every=1, warmup_rounds=2, breed_rate=0.5, truncation=0.4)
    cfg = SwarmConfig(members=5, steps_per_round=5, seed=3, eval_rows=256, optimiser=pol)
    rounds = 4
    with Swarm(data, cfg) as one:
        one.run(rounds, progress=False)
    polls = []
    swarm, collector = train_distributed(data, cfg, rounds=rounds, world_size=2, timeout_s=150,
                                         on_step=lambda c: polls.append(1))
    try:
        assert polls  # the caller's hook ran while the ranks trained
        assert swarm.round == rounds and swarm.world == 1
        a, b = one.table(), swarm.table()
        assert a["arch"].tolist() == b["arch"].tolist() and a["status"].tolist() == b["status"].tolist()
        assert a["origin"].tolist() == b["origin"].tolist() and a["steps"].tolist() == b["steps"].tolist()
        for col in ("lr", "momentum", "weight_decay", "val_acc", "train_acc"):
            np.testing.assert_allclose(a[col], b[col], atol=1e-4, err_msg=col)
        la, lb = one.lineage_frame(), swarm.lineage_frame()
        assert set(la["kind"]) == {"exploit", "breed"}
        # some replacement took weights from a parent trained on the other rank (members dealt round-robin)
        assert any(p % 2 != m % 2 for m, ps in zip(la["member"], la["parents"]) for p in ps)
        for col in ("round", "member", "kind", "parents", "after"):
            assert la[col].tolist() == lb[col].tolist(), col
        ha, hb = one.history(), swarm.history()
        assert len(ha) == len(hb) == rounds * cfg.members
        assert ha[["round", "member", "steps", "arch"]].values.tolist() == hb[["round", "member", "steps", "arch"]].values.tolist()
        np.testing.assert_allclose(ha["val_acc"], hb["val_acc"], atol=1e-4)
        np.testing.assert_allclose(ha["loss_mean"], hb["loss_mean"], atol=1e-4)
        # the gathered members carry their weights: the best one scores what it reported
        best = swarm.best()
        assert swarm.accuracy(best.id, swarm.x_val, swarm.y_val) == pytest.approx(best.val_acc)
        # every report reached the collector
        assert swarm.sent == {m: rounds for m in range(cfg.members)}
        rep = collector.report(swarm.sent)
        assert rep.index.tolist() == list(range(cfg.members))
        assert (rep["lost"] == 0).all() and (rep["gaps"] == 0).all() and (rep["duplicates"] == 0).all()
        assert collector.address.startswith("tcp://127.0.0.1:")
        frame = collector.frame("swarm")
        assert len(frame) == rounds * cfg.members
        assert sorted(frame["member"].unique().tolist()) == list(range(cfg.members))
        # each rank reported its own members (round-robin): weight statistics carry the member as rank
        stats = collector.frame("stats")
        assert set(stats["rank"]) == set(range(cfg.members))
        assert (collector.source.report()["lost"] == 0).all()  # both ranks' sinks ended cleanly
        assert len(collector.source.report()) == 2
    finally:
        collector.close()


def test_more_ranks_than_members_raises(data):
    with pytest.raises(ValueError, match="world_size=3.*more ranks than members \\(2\\)"):
        train_distributed(data, SwarmConfig(members=2), rounds=1, world_size=3)
    with pytest.raises(ValueError, match="world_size=0"):
        train_distributed(data, SwarmConfig(members=2), rounds=1, world_size=0)
    with pytest.raises(ValueError, match="device='tpu'"):
        train_distributed(data, SwarmConfig(members=2), rounds=1, world_size=1, device="tpu")


GPUS = torch.cuda.device_count()


@pytest.mark.timeout(240)
@pytest.mark.skipif(GPUS < 2, reason=f"members across GPUs need >= 2 GPUs; {GPUS} visible here")
def test_members_spread_across_gpus_report_to_one_collector(data):
    world = min(GPUS, 4)
    cfg = SwarmConfig(members=2 * world, steps_per_round=5, seed=1, eval_rows=256,
                      optimiser=OptimiserConfig(exploit_every=1, warmup_rounds=1))
    swarm, collector = train_distributed(data, cfg, rounds=3, world_size=world, device="auto", timeout_s=200)
    try:
        h = swarm.history()
        assert set(h["device"]) == {f"cuda:{i}" for i in range(world)}
        assert {m: h[h["member"] == m]["device"].iloc[0] for m in range(cfg.members)} == {
            m: f"cuda:{m % world}" for m in range(cfg.members)}  # members dealt round-robin to GPUs
        rep = collector.report(swarm.sent)
        assert (rep["lost"] == 0).all() and len(collector.frame("swarm")) == 3 * cfg.members
    finally:
        collector.close()
