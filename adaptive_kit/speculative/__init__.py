"""Speculative training: per-region speculation over K data-parallel workers, with reconciliation.

The Region Manager puts each region (a layer, or a group of weights) in Full-speculative,
Hybrid(p) or Global-only state from all-reduced statistics; speculative regions train on local
weights and synchronise on their own schedule; reconciliation keeps or rolls back.
"""
from .baselines import ddp, diloco, local_sgd, post_local_sgd, speculative, torch_worker
from .comm import Collective, DistComm, SimComm
from .engine import Engine, SpecConfig, train, worker
from .model import FlatModel, Task, cross_entropy, mse, region_index
from .network import PROFILES, NetworkProfile, ring_allreduce_s, simulated_time, traffic_frame
from .regions import FULL, GLOBAL, HYBRID, ManagerConfig, RegionManager, RegionStats
from .result import NotReached, RunResult, loss_at_bytes
from .tasks import TinyGPT, digits_task, regression_task, sequence_task

__all__ = [
    "FULL", "GLOBAL", "HYBRID", "PROFILES", "Collective", "DistComm", "Engine", "FlatModel",
    "ManagerConfig", "NetworkProfile", "NotReached", "RegionManager", "RegionStats", "RunResult", "SimComm",
    "SpecConfig", "Task", "TinyGPT", "cross_entropy", "ddp", "digits_task", "diloco", "local_sgd", "loss_at_bytes",
    "mse", "post_local_sgd", "regression_task", "region_index", "ring_allreduce_s", "sequence_task", "simulated_time", "speculative",
    "torch_worker", "traffic_frame", "train", "worker",
]
