"""Speculative training: K data-parallel workers where each region of the model is Global
(gradients averaged every step), Hybrid or Full-speculative (local weights, averaged on the
region's own schedule, reconciled or rolled back), as the Region Manager decides.

    result = speculative.train(speculative.tasks.digits_task(workers=8), speculative.SpeculativeConfig())
    result.time_to(target=0.3, net="wan"), result.bytes_per_worker(), result.rollback_rate()
"""
from . import baselines, tasks  # the anchors as presets (ddp, local_sgd, ...); the benchmark tasks
from .engine import Engine, SpeculativeConfig, train, worker
from .model import Task
from .network import PROFILES
from .regions import FULL, GLOBAL, HYBRID, ManagerConfig
from .result import RunResult, loss_at_bytes, with_shared_compute

__all__ = [
    "Engine", "FULL", "GLOBAL", "HYBRID", "ManagerConfig", "PROFILES", "RunResult", "SpeculativeConfig",
    "Task", "baselines", "loss_at_bytes", "tasks", "train", "with_shared_compute", "worker",
]
