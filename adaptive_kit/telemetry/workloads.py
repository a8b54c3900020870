"""Workloads: a model builder and the data it trains on, and the kit's two episode models."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from ..datasets import Split, digits


@cache
def _digits() -> Split:
    return digits(seed=0)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))


@dataclass(frozen=True)
class Workload:
    """A model and the data it trains on: what an episode runs.

    ``build`` makes a fresh model (called after the episode's seed is set); ``data`` returns a
    :class:`~adaptive_kit.datasets.Split` (x_train, y_train, x_test, y_test). Classification
    (integer labels, ``n_classes`` >= 2) trains with cross-entropy and reports accuracy;
    ``n_classes=0`` is regression (mean squared error, no accuracy; label faults are refused).
    """

    name: str
    build: Callable[[], nn.Module]
    data: Callable[[], Split] = _digits  # bundled digits by default
    n_classes: int = 10  # 0: regression

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Workload.name must be a non-empty string, got {self.name!r}")
        if not callable(self.build) or not callable(self.data):
            raise ValueError(f"Workload {self.name!r}: build and data must be callables")
        n = self.n_classes
        if isinstance(n, bool) or not isinstance(n, int) or n == 1 or n < 0:
            raise ValueError(f"Workload.n_classes must be 0 (regression) or an int >= 2, got {self.n_classes!r}")

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.n_classes:
            return nn.functional.cross_entropy(out, y)
        return nn.functional.mse_loss(out.reshape(y.shape), y)


WORKLOADS: dict[str, Workload] = {"mlp": Workload("mlp", _mlp), "cnn": Workload("cnn", _cnn)}
MODELS: tuple[str, ...] = tuple(WORKLOADS)


def build_model(name: str) -> nn.Module:
    """The kit's episode models: ``mlp`` (64-64-32-10, ReLU) and ``cnn`` (two 3x3 convs on 8x8 digits).

    Raises:
        ValueError: unknown name.
    """
    if name not in WORKLOADS:
        raise ValueError(f"build_model(name={name!r}): expected one of {MODELS}")
    return WORKLOADS[name].build()


def workload(model: str | Workload) -> Workload:
    """The :class:`Workload` of a name in :data:`MODELS`, or the workload itself.

    Raises:
        ValueError: an unknown name or something else than a name or a Workload.
    """
    if isinstance(model, Workload):
        return model
    if isinstance(model, str) and model in WORKLOADS:
        return WORKLOADS[model]
    raise ValueError(f"EpisodeSpec.model={model!r}: expected one of {MODELS} or a Workload")
