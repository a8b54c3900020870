"""``python -m adaptive_kit.swarm``: a swarm on the bundled digits, spawned here or under torchrun.

    python -m adaptive_kit.swarm --members 8 --rounds 20 --world 2
    torchrun --nproc-per-node 2 -m adaptive_kit.swarm --members 8 --rounds 20 --device auto
"""
from __future__ import annotations

import argparse
import threading

import torch.distributed as dist

from ..datasets import digits
from ..distributed import init_from_env, is_torchrun
from .bus import Collector
from .distributed import _gather, _worker, train_distributed
from .engine import SwarmConfig


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m adaptive_kit.swarm", description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=17, help="mean steps per member per round")
    ap.add_argument("--world", type=int, default=2, help="processes (ignored under torchrun)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=("cpu", "auto"), default="cpu", help="auto: one GPU per rank if any")
    ap.add_argument("--save", help="write the swarm's checkpoint here")
    a = ap.parse_args(argv)
    data = digits(seed=a.seed)
    config = SwarmConfig(members=a.members, steps_per_round=a.steps, seed=a.seed)
    if is_torchrun():
        rank, world = init_from_env("gloo" if a.device == "cpu" else None)
        collector, stop = (Collector("tcp://127.0.0.1:*"), threading.Event()) if rank == 0 else (None, None)
        address = [collector.address if collector else None]
        dist.broadcast_object_list(address, src=0)
        poller = None
        if collector is not None:  # the collector's socket is used by this thread only until it stops
            poller = threading.Thread(target=lambda: [collector.poll(100) for _ in iter(stop.is_set, True)],
                                      daemon=True)
            poller.start()
        state = _worker(rank, world, data, config, None, a.rounds, address[0], a.device)
        states = [None] * world
        dist.all_gather_object(states, state)
        dist.destroy_process_group()
        if collector is None:
            return
        stop.set()
        poller.join()
        collector.drain(world, timeout_s=10)
        swarm = _gather(data, config, states)
    else:
        swarm, collector = train_distributed(data, config, a.rounds, a.world, device=a.device)
    print(swarm.table().round(4).to_string())
    rep = collector.report(swarm.sent)
    print(f"\nreports: sent {int(rep.sent.sum())}, received {int(rep.received.sum())}, lost {int(rep.lost.sum())}; "
          f"latency {collector.latency_percentiles()}")
    best = swarm.best()
    print(f"best member {best.id}: {best.spec.arch}, val acc {best.val_acc:.4f}, "
          f"test acc {swarm.accuracy(best.id, data.x_test, data.y_test):.4f}")
    if a.save:
        print(f"saved {swarm.save(a.save)}")
    collector.close()
    swarm.close()


if __name__ == "__main__":
    main()
