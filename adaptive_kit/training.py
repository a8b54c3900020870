"""A small classifier and a plain training loop that reports every step without a host sync."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .checks import check_int, check_number
from .datasets import Split


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """A multi-layer perceptron ``sizes[0] -> ... -> sizes[-1]`` with ``activation`` between layers.

    Raises:
        ValueError: fewer than two sizes, or a size < 1.
    """
    if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1
                             for s in sizes):
        raise ValueError(f"mlp(sizes={list(sizes)!r}): need at least two sizes, each an int >= 1")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 0.1  # SGD learning rate
    momentum: float = 0.9  # SGD momentum
    batch_size: int = 64  # examples per step, drawn with replacement by a seeded generator
    steps: int = 200  # optimiser steps
    seed: int = 0  # seeds the batch order

    def __post_init__(self) -> None:
        check_number("TrainConfig.lr", self.lr, 0.0, open_low=True)
        check_number("TrainConfig.momentum", self.momentum, 0.0, 1.0, open_high=True)
        for name in ("batch_size", "steps"):
            check_int(f"TrainConfig.{name}", getattr(self, name), 1)


@dataclass
class TrainResult:
    losses: np.ndarray  # (steps_run,) training loss per step
    test_accuracy: float  # accuracy on data.x_test after the last step
    steps_run: int  # steps actually taken (fewer when on_step asked to stop)


StepCallback = Callable[[int, torch.Tensor, nn.Module], bool | None]


def train_classifier(model: nn.Module, data: Split, config: TrainConfig = TrainConfig(), *,
                     on_step: StepCallback | None = None, progress: bool = True) -> TrainResult:
    """Train ``model`` on ``data`` with SGD and cross-entropy.

    ``on_step(step, loss, model)`` runs after every optimiser step with the loss still on the
    device (read it without forcing a sync, or batch the reads); returning ``False`` stops
    the run early. Losses stay on the device until the run ends, then move in one copy.
    """
    device = next(model.parameters()).device
    data = data.to(device)
    g = torch.Generator(device="cpu").manual_seed(config.seed)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    losses = torch.empty(config.steps, device=device)
    model.train()
    steps_run = 0
    for step in tqdm(range(config.steps), desc="train", disable=not progress, leave=False):
        idx = torch.randint(0, len(data.x_train), (config.batch_size,), generator=g).to(device)
        loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses[step] = loss.detach()
        steps_run = step + 1
        if on_step is not None and on_step(step, losses[step], model) is False:
            break
    return TrainResult(losses[:steps_run].cpu().numpy(), accuracy(model, data.x_test, data.y_test), steps_run)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` that ``model`` labels as ``y`` (evaluation mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        return float((model(x).argmax(1) == y).float().mean())
    finally:
        model.train(was_training)
