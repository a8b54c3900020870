"""Train one method over K workers from a shell: spawned, or one rank per process under torchrun.

    python -m adaptive_kit.speculative --workers 4 --method ours --steps 300
    torchrun --nproc_per_node=4 --master_addr=127.0.0.1 -m adaptive_kit.speculative --method ddp
"""
from __future__ import annotations

import argparse
import os

from ..distributed import is_torchrun, run
from ..training import TrainConfig
from . import baselines
from .engine import worker
from .network import PROFILES
from .tasks import digits_task, regression_task, sequence_task

METHODS = {
    "ours": lambda a: baselines.speculative(period=a.period, reconcile_threshold=a.threshold, network=a.network),
    "ddp": lambda a: baselines.ddp(),
    "local_sgd": lambda a: baselines.local_sgd(a.period),
    "post_local_sgd": lambda a: baselines.post_local_sgd(a.period, a.steps // 10),
    "diloco": lambda a: baselines.diloco(a.period),
}


def main(argv: list[str] | None = None) -> list:
    p = argparse.ArgumentParser(prog="python -m adaptive_kit.speculative", description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=4, help="K when spawning (torchrun sets its own)")
    p.add_argument("--method", choices=sorted(METHODS), default="ours")
    p.add_argument("--task", choices=("digits", "sequence", "regression"), default="digits")
    p.add_argument("--alpha", type=float, default=0.1, help="Dirichlet non-IID skew (small = skewed)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--period", type=int, default=16, help="steps between weight averages (ours: the base period)")
    p.add_argument("--threshold", type=float, default=2.5,
                   help="reconciliation: multiple of the layer's usual spread (ours)")
    p.add_argument("--network", choices=sorted(PROFILES), default="lan", help="the link ours plans for")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    k = int(os.environ["WORLD_SIZE"]) if is_torchrun() else a.workers
    make = {"digits": digits_task, "sequence": sequence_task, "regression": regression_task}[a.task]
    task = make(workers=k, alpha=a.alpha, seed=a.seed)
    train_config = TrainConfig(lr=a.lr, momentum=0.9, batch_size=32, steps=a.steps, seed=a.seed)
    results = run(worker, k, (task, METHODS[a.method](a), train_config, 25, a.method), threads_per_worker=1)
    if not is_torchrun() or int(os.environ["RANK"]) == 0:
        r = results[0]
        b = r.bytes_per_worker()
        times = ", ".join(f"{n} {r.simulated_time(n)[-1]:.1f} s" for n in PROFILES)
        print(f"{a.method} on {task.name}, K={k}: test loss {r.final_test_loss:.4f}, "
              f"accuracy {r.evals['test_accuracy'].iloc[-1]:.3f}; bytes per worker {b['payload']:,} payload "
              f"+ {b['control']:,} control; rollback rate {r.rollback_rate():.1%}; simulated {times}; "
              f"measured {r.wall_s:.1f} s")
    return results


if __name__ == "__main__":
    main()
