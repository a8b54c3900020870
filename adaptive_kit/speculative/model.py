"""A task (model + one data shard per worker) and the model as one flat, vmapped parameter vector."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METRICS = ("loss", "accuracy")  # what a task may declare; accuracy is the argmax's, for classification


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error; predictions (B, 1) or (B,) against targets (B,)."""
    return nn.functional.mse_loss(out.reshape(y.shape), y)


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; sequence logits (B, T, V) are flattened against targets (B, T)."""
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@dataclass
class Task:
    """A model and one data shard per worker: what every method in the harness trains."""

    name: str
    build: Callable[[], nn.Module]  # picklable (module-level), so spawned workers can call it
    shards: list[tuple[torch.Tensor, torch.Tensor]]  # (x, y) per worker
    test: tuple[torch.Tensor, torch.Tensor]
    loss: Loss = cross_entropy
    metrics: tuple[str, ...] = ("loss", "accuracy")  # what evaluation reports; a regression: ("loss",)

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or "loss" not in self.metrics:
            raise ValueError(f"Task.metrics={self.metrics!r}: expected 'loss' and any of {METRICS}")

    @property
    def workers(self) -> int:
        return len(self.shards)


class FlatModel:
    """A module as one flat parameter vector; loss and gradient vectorised over workers."""

    def __init__(self, module: nn.Module, loss: Loss, accuracy: bool = True) -> None:
        if any(True for _ in module.buffers()):
            raise ValueError(f"{type(module).__name__} has buffers (BatchNorm?): workers would keep "
                             "diverging statistics; use LayerNorm or no normalisation")
        self.module, self.accuracy = module, accuracy
        named = list(module.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.n = sum(self.sizes)

        def f(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss(functional_call(module, self.unflatten(theta), (x,)), y)

        self._loss_grad = vmap(grad_and_value(f))
        self._loss = f

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, theta.split(self.sizes), self.shapes)}

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()])

    def loss_and_grad(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        """(W, N) weights, (W, B, ...) batches -> loss (W,), gradient (W, N)."""
        g, loss = self._loss_grad(theta, x, y)
        return loss, g

    @torch.no_grad()
    def evaluate(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """Test loss and accuracy of one weight vector (N,); accuracy NaN when the task has none."""
        loss = self._loss(theta, x, y)
        if not self.accuracy:
            return float(loss), float("nan")
        out = functional_call(self.module, self.unflatten(theta), (x,))
        acc = (out.argmax(-1) == y).float().mean()
        return float(loss), float(acc)


def region_index(names: list[str], sizes: list[int],
                 regions: str | Mapping[str, Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """Region names and the region of every flat element (N,) int64.

    Raises:
        ValueError: a mapping names an unknown parameter, or leaves one out, or uses one twice.
    """
    if regions == "param":
        groups = {n: [n] for n in names}
    elif regions == "layer":
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(n.rsplit(".", 1)[0] if "." in n else n, []).append(n)
    else:
        groups = {str(k): list(v) for k, v in regions.items()}
        seen = [p for ps in groups.values() for p in ps]
        unknown = sorted(set(seen) - set(names))
        if unknown:
            raise ValueError(f"SpeculativeConfig.regions names unknown parameters {unknown}; the model has {names}")
        missing = [n for n in names if n not in seen]
        twice = sorted({p for p in seen if seen.count(p) > 1})
        if missing or twice:
            raise ValueError(f"SpeculativeConfig.regions must put every parameter in exactly one region: "
                             f"missing {missing}, repeated {twice}")
    owner = {p: i for i, ps in enumerate(groups.values()) for p in ps}
    region_of = torch.cat([torch.full((s,), owner[n], dtype=torch.int64) for n, s in zip(names, sizes)])
    return list(groups), region_of
