"""The anchors, as configurations of the same engine, and the real torch implementations.

Every method runs in one harness, so bytes, time and loss are counted the same way:

* ``ddp()``: every region Global — gradients averaged every step. Equal to
  ``DistributedDataParallel`` (a test checks it against the real DDP on gloo);
* ``local_sgd(period)``: periodic model averaging (``PeriodicModelAverager``);
* ``post_local_sgd(period, warmup)``: DDP for ``warmup`` steps, then local SGD
  (``PostLocalSGDOptimizer``); both checked against torch's own classes on gloo;
* ``diloco(period, outer_lr, outer_momentum)``: local steps, then an outer Nesterov step on the
  averaged pseudo-gradient (DiLoCo);
* ``speculative(...)``: ours, the Region Manager deciding per region.

:func:`torch_worker` runs the real DDP / model-averaging classes under torch.distributed.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from ..devices import rank_generator
from ..training import TrainConfig
from .engine import SpeculativeConfig
from .model import Task
from .regions import ManagerConfig

_FIXED = dict(adaptive=False, adapt_period=False, speculate=False, control_every=0, drift_correction=0.0)


def ddp() -> SpeculativeConfig:
    """Synchronous data parallel: every weight Global, gradients averaged every step."""
    return SpeculativeConfig(manager=ManagerConfig(initial_p=0.0), **_FIXED)


def local_sgd(period: int) -> SpeculativeConfig:
    """Periodic model averaging every ``period`` steps, blocking."""
    return SpeculativeConfig(manager=ManagerConfig(initial_p=1.0), period=period, **_FIXED)


def post_local_sgd(period: int, warmup: int) -> SpeculativeConfig:
    """DDP for ``warmup`` steps, then periodic averaging every ``period`` steps."""
    return replace(local_sgd(period), warmup=warmup)


def diloco(period: int, outer_lr: float = 0.7, outer_momentum: float = 0.9) -> SpeculativeConfig:
    """Local steps, then an outer Nesterov step on the averaged pseudo-gradient every ``period``."""
    return replace(local_sgd(period), outer_lr=outer_lr, outer_momentum=outer_momentum)


def speculative(**kwargs) -> SpeculativeConfig:
    """Ours: the Region Manager's states and schedules; keyword arguments override
    :class:`SpeculativeConfig`'s defaults."""
    return SpeculativeConfig(**kwargs)


def torch_worker(rank: int, world: int, task: Task, method: str, train_config: TrainConfig,
                 period: int = 1, warmup: int = 0) -> torch.Tensor:
    """Train with torch's own DDP (``method="ddp"``) or model averaging (``"local_sgd"``,
    ``"post_local_sgd"``) on this rank's shard; return the final weights (N,) of this rank.

    Draws batches exactly as the engine does, so the two can be compared step for step.
    """
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(train_config.seed)
    model: nn.Module = task.build()
    gen = rank_generator(train_config.seed, rank)
    x, y = task.shards[rank]
    averager = None
    if method == "ddp":
        net = DistributedDataParallel(model)
    elif method in ("local_sgd", "post_local_sgd"):
        net = model
        averager = PeriodicModelAverager(period=period, warmup_steps=warmup)
    else:
        raise ValueError(f"torch_worker(method={method!r}): expected 'ddp', 'local_sgd' or 'post_local_sgd'")
    opt = torch.optim.SGD(net.parameters(), lr=train_config.lr, momentum=train_config.momentum)
    for step in range(train_config.steps):
        i = torch.randint(0, len(x), (train_config.batch_size,), generator=gen)
        loss = task.loss(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        if method == "post_local_sgd" and step < warmup:
            for p in model.parameters():  # post-local SGD's warm-up: plain gradient all-reduce
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        if averager is not None:
            averager.average_parameters(model.parameters())
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
