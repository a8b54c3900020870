"""Soak test of the swarm bus: 64 members x 50 reports/s from several processes into one collector.

Ours: each producer process aggregates its members' reports into one Arrow batch every
``flush_s`` and sends it over ZeroMQ PUSH; the collector checks every member's sequence numbers.
Anchors: one message per report over PUSH/PULL, and over PUB/SUB (what dashboards often use),
with the same check. Run alone: ``python benchmarks/swarm_soak.py [--quick]``; ``benchmarks/swarm.py``
runs it as part of the swarm benchmark.
"""
from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pandas as pd
import zmq

MEMBERS, RATE_HZ, PRODUCERS = 64, 50.0, 4


def _rows(members: np.ndarray, seq: np.ndarray, now: float) -> dict:
    n = len(members)
    nan = np.full(n, np.nan)
    return {"time": np.full(n, now), "member": members.astype(np.int32), "seq": seq.copy(), "round": np.zeros(n, np.int32),
            "step": seq * 10, "epochs": seq * 0.1, "steps": np.full(n, 10, np.int32), "loss_mean": np.random.rand(n),
            "loss_last": nan, "loss_max": nan, "nonfinite": np.zeros(n, np.int64), "val_acc": np.random.rand(n),
            "val_loss": nan, "train_acc": nan, "fitness": nan, "lr": np.full(n, 0.1), "momentum": np.full(n, 0.9),
            "weight_decay": np.zeros(n), "batch_size": np.full(n, 32, np.int32), "arch": ["linear64/relu"] * n,
            "n_params": np.full(n, 4810, np.int64), "compute_s": nan, "cpu_percent": nan,
            "rss_bytes": np.zeros(n, np.int64), "gpu_bytes": [None] * n, "device": ["cpu"] * n,
            "status": ["active"] * n, "origin": ["init"] * n}


def _producer(rank: int, members: list[int], address: str, duration_s: float, mode: str, flush_s: float,
              start_at: float) -> None:
    import torch
    torch.set_num_threads(1)
    import adaptive_kit.swarm  # noqa: F401 - registers the swarm schema
    from adaptive_kit.records import ZmqPushSink, _batch_bytes, to_batch  # noqa: F401 (registers schemas)

    ids = np.array(members)
    seq = np.zeros(len(ids), np.int64)
    period = 1.0 / RATE_HZ
    if mode == "pubsub":
        sock = zmq.Context.instance().socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(address)
        sink = None
    else:
        sink = ZmqPushSink(address, producer=f"soak{rank}")
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.time()
    tick, pending, last_flush = 0, [], t0
    while True:
        due = t0 + tick * period
        now = time.time()
        if due > t0 + duration_s:
            break
        if due > now:
            time.sleep(due - now)
        now = time.time()
        cols = _rows(ids, seq, now)
        seq += 1
        tick += 1
        if mode == "batched":
            pending.append(cols)
            if now - last_flush >= flush_s:
                merged = {k: np.concatenate([np.asarray(p[k], dtype=object if k == "gpu_bytes" else None)
                                             for p in pending]) for k in cols}
                sink.write(to_batch("swarm", merged), "swarm")
                pending, last_flush = [], now
        else:
            for i in range(len(ids)):
                one = {k: (v[i:i + 1] if not isinstance(v, list) else v[i:i + 1]) for k, v in cols.items()}
                batch = to_batch("swarm", one)
                if mode == "pubsub":
                    sock.send_multipart([b"swarm", _batch_bytes(batch)])
                else:
                    sink.write(batch, "swarm")
    if mode == "batched" and pending:
        merged = {k: np.concatenate([np.asarray(p[k], dtype=object if k == "gpu_bytes" else None)
                                     for p in pending]) for k in pending[0]}
        sink.write(to_batch("swarm", merged), "swarm")
    if sink is not None:
        sink.close()
    else:
        sock.close()


def soak(mode: str, duration_s: float, flush_s: float = 0.1) -> dict:
    """One soak run; returns sent, received, lost, gaps, latency percentiles and the rate achieved."""
    import pyarrow as pa

    from adaptive_kit.swarm import Collector
    ctx = mp.get_context("spawn")
    per = MEMBERS // PRODUCERS
    groups = [list(range(r * per, (r + 1) * per)) for r in range(PRODUCERS)]
    if mode == "pubsub":
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        port = sub.bind_to_random_port("tcp://127.0.0.1")
        address, collector = f"tcp://127.0.0.1:{port}", None
    else:
        collector = Collector("tcp://127.0.0.1:*")
        address = collector.address
    start_at = time.time() + 4.0  # every producer imported and connected before the clock starts
    procs = [ctx.Process(target=_producer, args=(r, g, address, duration_s, mode, flush_s, start_at), daemon=True)
             for r, g in enumerate(groups)]
    for p in procs:
        p.start()
    latencies: list[np.ndarray] = []
    seqs: dict[int, list[int]] = {}
    received = 0
    deadline = start_at + duration_s + 30
    if mode == "pubsub":
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        while (any(p.is_alive() for p in procs) or poller.poll(500)) and time.time() < deadline:
            if not poller.poll(100):
                continue
            while True:
                try:
                    _, payload = sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                b = pa.ipc.open_stream(pa.py_buffer(payload)).read_next_batch()
                received += b.num_rows
                latencies.append(time.time() - b.column("time").to_numpy())
                for m, s in zip(b.column("member").to_pylist(), b.column("seq").to_pylist()):
                    seqs.setdefault(m, []).append(s)
        sub.close()
        gaps = sum(max(s) + 1 - len(s) for s in seqs.values())
    else:
        while any(p.is_alive() for p in procs) and time.time() < deadline:
            collector.poll(100)
        collector.drain(PRODUCERS, timeout_s=20)
        rep = collector.report()
        received = int(rep.received.sum())
        gaps = int(rep.gaps.sum())
        latencies = [np.asarray(collector.latencies)]
        collector.close()
    for p in procs:
        p.join(5)
    sent = int(MEMBERS * (duration_s * RATE_HZ // 1 + 1))
    lat = np.concatenate(latencies) * 1e3 if latencies else np.array([np.nan])
    return {"mode": mode, "seconds": duration_s, "events_per_s": MEMBERS * RATE_HZ, "sent": sent, "received": received,
            "lost": sent - received, "gaps": gaps, "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)), "p99_ms": float(np.percentile(lat, 99)),
            "max_ms": float(lat.max())}


def run(quick: bool) -> pd.DataFrame:
    ours = 10.0 if quick else 120.0
    anchor = 5.0 if quick else 30.0
    rows = [soak("batched", ours), soak("push", anchor), soak("pubsub", anchor)]
    frame = pd.DataFrame(rows).set_index("mode")
    frame.index = frame.index.map({"batched": "ours: Arrow batches every 0.1 s, PUSH/PULL",
                                   "push": "one message per event, PUSH/PULL",
                                   "pubsub": "one message per event, PUB/SUB"})
    return frame


if __name__ == "__main__":
    import sys
    print(run("--quick" in sys.argv).to_string())
