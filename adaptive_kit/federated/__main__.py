"""``python -m adaptive_kit.federated --data fair --method metacurv`` (spawns ``--world-size`` gloo
processes) or ``torchrun --nproc-per-node K -m adaptive_kit.federated ...`` (one rank each):
partition a bundled data set, train with clients spread over the ranks, print the summary."""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from .data import fair, mixture, randhie
from .meta import METHODS, FederatedConfig, evaluate, make_clients, summary, train_distributed
from .subsets import adaptive_partition


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", choices=("fair", "randhie", "mixture"), default="fair")
    ap.add_argument("--method", choices=METHODS, default="metacurv")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--granularity", type=float, default=0.5)
    ap.add_argument("--min-size", type=int, default=200)
    ap.add_argument("--world-size", type=int, default=2, help="processes to spawn when not under torchrun")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    d = {"fair": fair, "randhie": randhie, "mixture": lambda: mixture(seed=a.seed)[0]}[a.data]()
    part = adaptive_partition(d.x, d.y, a.granularity, a.min_size, max_parts=16, seed=a.seed)
    clients = make_clients(d.x, d.y, part.labels, seed=a.seed)
    cfg = FederatedConfig(method=a.method, rounds=a.rounds, seed=a.seed)
    result = train_distributed(clients, cfg, a.world_size)
    s = summary(evaluate(result.model, clients, lr=cfg.local_lr, l2=cfg.l2))
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{a.data}: {clients.n} clients, {a.method}, best round {result.best_round}, "
              f"failed {len(result.failed)}; " + ", ".join(f"{k} {v:.3f}" for k, v in s.items()))
    return s


if __name__ == "__main__":
    main()
