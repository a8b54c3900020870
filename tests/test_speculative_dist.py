"""Speculative training on real gloo collectives: against torch's own DDP and model averagers, against
the one-process simulation, bytes counted against bytes moved, and workers that break.

Each launch runs several jobs on one process group (see ``dist_workers.speculative_jobs``), and the
workers are forked from a parent that has already trained once, so they start warm: on this 2-core
machine a spawned worker spends ~20 s importing torch (and torch._dynamo, which the first vmapped
gradient pulls in) before its first step. Spawning itself is tested in ``test_distributed.py``; that
everything a worker receives and returns pickles, in ``test_speculative.py``.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import replace

import dist_workers
import numpy as np
import pytest
import torch

import adaptive_kit.speculative as sp
from adaptive_kit.distributed import WorkerError, launch
from adaptive_kit.training import TrainConfig

TRAIN = TrainConfig(lr=0.05, momentum=0.9, batch_size=16, steps=29)
TRAIN27 = replace(TRAIN, steps=27)  # post-local SGD (4, 10) averages after 10, 14, 18, 22, 26
SPEC = sp.baselines.speculative(period=4, reconcile_threshold=0.9)  # under the workers' own spread: rolls back
NAN_SGD = sp.baselines.local_sgd(4)  # worker 1 poisoned after step 5: caught by the average after step 8
NAN_DDP = replace(sp.baselines.ddp(), health_every=4)  # caught in the gradient all-reduce of step 6


def start(fn, world: int, args: tuple, timeout_s: float = 120):
    return launch(fn, world, args, threads_per_worker=1, timeout_s=timeout_s, start_method="fork")


def poison(rank: int, at: int):
    def on_step(step, eng):
        if step == at:
            eng.theta[rank, :5] = float("nan")
    return on_step


@pytest.fixture(scope="module")
def task2() -> sp.Task:
    return sp.tasks.digits_task(2, 0.5)


@pytest.fixture(scope="module")
def sim2(task2) -> dict[str, sp.RunResult]:
    """The same runs simulated in this process (which also warms it up before the forks)."""
    return {"ddp": sp.train(task2, sp.baselines.ddp(), TRAIN), "local_sgd": sp.train(task2, sp.baselines.local_sgd(4), TRAIN),
            "post_local_sgd": sp.train(task2, sp.baselines.post_local_sgd(4, 10), TRAIN27),
            "spec": sp.train(task2, SPEC, TRAIN),
            "nan_sgd": sp.train(task2, NAN_SGD, TRAIN, on_step=poison(1, 5)),
            "nan_ddp": sp.train(task2, NAN_DDP, TRAIN, on_step=poison(1, 5))}


@pytest.fixture(scope="module")
def k2(task2, sim2) -> dict[str, list[dict]]:
    """Every K=2 job, per job name a list by rank."""
    jobs = {"ddp": ("ours", sp.baselines.ddp(), TRAIN, -1, -1),
            "torch_ddp": ("torch", "ddp", TRAIN, 1, 0),
            "torch_local_sgd": ("torch", "local_sgd", TRAIN, 4, 0),
            "torch_post_local_sgd": ("torch", "post_local_sgd", TRAIN27, 4, 10),
            "spec": ("worker", SPEC, TRAIN),
            "nan_sgd": ("ours", NAN_SGD, TRAIN, 1, 5),
            "nan_ddp": ("ours", NAN_DDP, TRAIN, 1, 5)}
    out = start(dist_workers.speculative_jobs, 2, (task2, list(jobs.values())))
    assert mp.active_children() == []
    return {name: [ranks[i] for ranks in out] for i, name in enumerate(jobs)}


@pytest.fixture(scope="module")
def k3() -> tuple[dict[str, sp.RunResult], dict[str, list[dict]]]:
    task = sp.tasks.digits_task(3, 0.5, hidden=(32, 32))
    sim = {"spec": sp.train(task, SPEC, TRAIN), "ddp": sp.train(task, sp.baselines.ddp(), TRAIN)}
    jobs = {"spec": ("worker", SPEC, TRAIN), "ddp": ("ours", sp.baselines.ddp(), TRAIN, -1, -1),
            "torch_ddp": ("torch", "ddp", TRAIN, 1, 0)}
    out = start(dist_workers.speculative_jobs, 3, (task, list(jobs.values())))
    return sim, {name: [ranks[i] for ranks in out] for i, name in enumerate(jobs)}


# --- exactness ------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_all_global_is_distributed_data_parallel(k2, sim2):
    ddp = [r["theta"] for r in k2["torch_ddp"]]
    assert torch.equal(ddp[0], ddp[1])  # DDP keeps its replicas identical
    for rank in range(2):
        ours = k2["ddp"][rank]["result"]
        torch.testing.assert_close(ours.theta, ddp[rank], atol=1e-6, rtol=0)
        assert torch.equal(ours.theta, sim2["ddp"].theta)  # two workers: sums of two, bit for bit
    torch.testing.assert_close(sim2["ddp"].theta, ddp[0], atol=1e-6, rtol=0)
    assert (sim2["ddp"].theta != k2["torch_local_sgd"][0]["theta"]).any()  # the tolerance is not loose


@pytest.mark.timeout(120)
def test_local_sgd_and_post_local_sgd_are_torchs_model_averaging(k2, sim2):
    for name in ("local_sgd", "post_local_sgd"):
        torch_theta = [r["theta"] for r in k2[f"torch_{name}"]]
        assert torch.equal(torch_theta[0], torch_theta[1])  # the last step averaged
        torch.testing.assert_close(sim2[name].theta, torch_theta[0], atol=1e-6, rtol=0)
    # post-local SGD: DDP for 10 steps, then an average after steps 10, 14, 18, 22, 26
    post = sim2["post_local_sgd"]
    assert [c.step for c in post.log if c.kind == "grad"] == list(range(10))
    assert [c.step for c in post.log if c.kind == "weights"] == [10, 14, 18, 22, 26]


@pytest.mark.timeout(120)
def test_real_collectives_equal_the_simulation(k2, sim2):
    sim = sim2["spec"]
    results = [r["result"] for r in k2["spec"]]
    for res in results:
        assert torch.equal(res.theta, sim.theta)  # every rank ends at the one consensus model
        assert res.log == sim.log and res.bytes_per_worker() == sim.bytes_per_worker()
        assert res.evals.equals(sim.evals) and np.array_equal(res.p, sim.p)
        assert res.regions == sim.regions and res.workers == 2
    # per-rank counts add up to the simulation's totals; the simulated loss is the ranks' mean
    for col in ("rollbacks", "reconciled", "recomputes"):
        assert (sum(r.history[col] for r in results) == sim.history[col]).all(), col
    assert sim.history["rollbacks"].sum() > 0  # the default threshold does roll back here
    np.testing.assert_allclose(sum(r.history["loss"] for r in results) / 2, sim.history["loss"], rtol=1e-6)


@pytest.mark.timeout(180)
def test_three_workers(k3):
    sim, dist = k3
    ddp = [r["theta"] for r in dist["torch_ddp"]]
    spec = [r["result"] for r in dist["spec"]]
    for rank in range(3):
        torch.testing.assert_close(dist["ddp"][rank]["result"].theta, ddp[rank], atol=1e-6, rtol=0)
        torch.testing.assert_close(sim["ddp"].theta, ddp[rank], atol=1e-6, rtol=0)
        # three-way sums may round differently in gloo's ring: equal to float tolerance, same traffic
        torch.testing.assert_close(spec[rank].theta, sim["spec"].theta, atol=1e-5, rtol=0)
        assert spec[rank].log == sim["spec"].log
        assert torch.equal(spec[rank].theta, spec[0].theta)
    for col in ("rollbacks", "reconciled", "recomputes"):
        assert sum(r.history[col].sum() for r in spec) == sim["spec"].history[col].sum(), col


# --- bytes ----------------------------------------------------------------------------------------

@pytest.mark.timeout(180)
@pytest.mark.parametrize("job", ["ddp", "spec", "nan_sgd", "nan_ddp"])
def test_bytes_counted_are_bytes_all_reduced(k2, k3, job):
    runs = k2[job] + (k3[1][job] if job in k3[1] else [])
    for out in runs:
        log = out["result"].log
        assert out["all_reduce_calls"] == len(log)
        assert out["all_reduce_bytes"] == sum(c.payload_bytes + c.control_bytes for c in log)
    kinds = {c.kind for c in k2[job][0]["result"].log}
    assert "eval" in kinds and ("grad" if "ddp" in job else "weights") in kinds
    assert ("repair" in kinds) == job.startswith("nan")  # repairing the poisoned worker counts too


@pytest.mark.timeout(120)
def test_ddp_bytes_per_step(task2, k2, sim2):
    n = sum(p.numel() for p in task2.build().parameters())
    for res in [k2["ddp"][0]["result"], sim2["ddp"]]:
        assert (res.history["payload_bytes"] == 4 * n).all()
        assert (res.history["control_bytes"] == 4 * 2).all()  # one float32 health flag per worker


# --- reliability ----------------------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize(("job", "alarm"), [("nan_sgd", (8, "weights", [1])), ("nan_ddp", (6, "grad", [1]))])
def test_nan_in_one_rank_is_caught_and_repaired(k2, sim2, job, alarm):
    results = [r["result"] for r in k2[job]]
    for res in results:
        # every rank reads the same flags, so every rank reports the poisoned one
        assert [(a["step"], a["kind"], a["ranks"]) for a in res.alarms] == [alarm]
        assert torch.isfinite(res.theta).all() and np.isfinite(res.evals["test_loss"]).all()
        assert torch.equal(res.theta, results[0].theta)
        # the real repair is the simulated one: the healthy rank was never touched by the NaN
        assert torch.equal(res.theta, sim2[job].theta)
    assert sim2[job].alarms == results[0].alarms


@pytest.mark.timeout(60)
def test_a_worker_that_raises_is_reported_by_rank(task2, sim2, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as info:
        start(dist_workers.speculative_fails, 2, (task2, TRAIN, 1, "raise", str(tmp_path)), timeout_s=50)
    assert time.monotonic() - t0 < 30  # rank 0, waiting in its all-reduce, was stopped at once
    assert (tmp_path / "rank1.pid").exists()
    assert mp.active_children() == []
    msg = str(info.value)
    # rank 0's all-reduce fails too ("Connection closed by peer"), but after rank 1's error
    assert info.value.rank == 1 and "worker rank 1 failed" in msg
    assert "RuntimeError: injected failure in rank 1 at step 1" in msg


@pytest.mark.timeout(60)
def test_a_worker_that_hangs_times_out(task2, sim2, tmp_path):
    t0 = time.monotonic()
    # the launcher's deadline; or, under heavy load, rank 0's gloo timeout (the same 6 s, counted
    # from its all-reduce) may fire first: either way rank 0, still waiting, is the one named
    timed_out = r"(?s)timed out after 6 s waiting for ranks \[0, 1\]|worker rank 0 failed:.*[Tt]imed? ?out"
    with pytest.raises(WorkerError, match=timed_out) as info:
        start(dist_workers.speculative_fails, 2, (task2, TRAIN, 1, "hang", str(tmp_path)), timeout_s=6)
    assert info.value.rank == 0
    assert 6 <= time.monotonic() - t0 < 20
    assert (tmp_path / "rank1.pid").exists()  # rank 1 reached its hang: the timeout is the hang's
    assert mp.active_children() == []
