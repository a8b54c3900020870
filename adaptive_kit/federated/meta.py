"""Federated learning over clients' subsets: FedAvg, FedProx, one-shot averaging, Reptile and
first-order MAML / Per-FedAvg, with personalised evaluation after local adaptation steps.

Clients are vectorised: their data are padded to one (C, m, d) tensor with a (C, m) mask, and
local gradient steps run for all clients at once under ``torch.func.vmap(grad(...))``. A
round's local training is ``local_steps`` full-batch gradient steps from the global parameters;
a client whose update is non-finite is reported and left out of that round's aggregate. The
server keeps the global parameters with the best validation loss ("validation-driven global
updates") and halves its step when a round makes validation worse.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.func import grad, vmap

from . import ordinal

METHODS = ("fedavg", "fedprox", "oneshot", "reptile", "fomaml")


@dataclass(frozen=True)
class Clients:
    """Padded per-client train and test data (float64)."""

    x: torch.Tensor  # (C, m, d)
    y: torch.Tensor  # (C, m)
    mask: torch.Tensor  # (C, m) 1 for real rows
    x_test: torch.Tensor  # (C, m_test, d)
    y_test: torch.Tensor
    mask_test: torch.Tensor
    classes: int

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def sizes(self) -> torch.Tensor:
        return self.mask.sum(1)


def _pad(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m = max(len(y) for _, y in parts)
    d = parts[0][0].shape[1]
    x = torch.zeros(len(parts), m, d, dtype=torch.float64)
    y = torch.zeros(len(parts), m, dtype=torch.long)
    mask = torch.zeros(len(parts), m, dtype=torch.float64)
    for i, (xi, yi) in enumerate(parts):
        x[i, : len(yi)], y[i, : len(yi)], mask[i, : len(yi)] = xi.double(), yi.long(), 1.0
    return x, y, mask


def make_clients(x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, test_fraction: float = 0.3,
                 seed: int = 0, classes: int | None = None) -> Clients:
    """One client per part of ``labels``, each with its own seeded train / test split.

    Raises:
        ValueError: NaN features, labels not 0..J-1, a part with fewer than 2 rows.
    """
    if not torch.isfinite(x).all():
        r, c = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"x has non-finite values (first at row {r}, column {c})")
    classes = classes or ordinal.check_ordinal(y)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for p in torch.unique(labels).tolist():
        idx = (labels == p).nonzero()[:, 0]
        if len(idx) < 2:
            raise ValueError(f"part {p} has {len(idx)} row(s); a client needs at least 2")
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = max(1, int(round(len(idx) * test_fraction)))
        test.append((x[idx[:cut]], y[idx[:cut]]))
        train.append((x[idx[cut:]], y[idx[cut:]]))
    return Clients(*_pad(train), *_pad(test), classes)


@dataclass(frozen=True)
class MetaConfig:
    method: str = "fomaml"
    rounds: int = 30
    local_steps: int = 5
    local_lr: float = 0.5  # client gradient steps (and the adaptation steps at evaluation)
    server_lr: float = 1.0  # Reptile / FO-MAML meta step; FedAvg / FedProx use 1 (plain averaging)
    mu: float = 0.1  # FedProx proximal weight
    l2: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("rounds", "local_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("local_lr", "server_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.mu >= 0 or not self.l2 >= 0:
            raise ValueError(f"mu and l2 must be >= 0, got mu={self.mu!r}, l2={self.l2!r}")


@dataclass
class MetaResult:
    params: torch.Tensor  # the global model
    history: list[dict] = field(default_factory=list)  # per round: val_loss, server_lr, failed
    failed: list[tuple[int, int]] = field(default_factory=list)  # (round, client) left out
    bytes_per_client: int = 0  # sent + received over all rounds


def _loss(p: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, classes: int, l2: float) -> torch.Tensor:
    return ordinal.nll(p, x, y, classes, w) + l2 * (p[: x.shape[-1]] ** 2).sum()


def adapt(params: torch.Tensor, clients: Clients, steps: int, lr: float, l2: float = 1e-4,
          prox: tuple[torch.Tensor, float] | None = None, rows: slice | None = None) -> torch.Tensor:
    """(C, P) parameters after ``steps`` full-batch gradient steps on each client's train rows,
    from ``params`` (P,) or (C, P); ``prox`` = (anchor, mu) adds FedProx's proximal term."""
    c = clients
    rows = rows or slice(None)
    x, y, w = c.x[:, rows], c.y[:, rows], c.mask[:, rows]
    p = params.expand(c.n, -1).clone() if params.dim() == 1 else params.clone()

    def objective(pi, xi, yi, wi, anchor, mu):
        return _loss(pi, xi, yi, wi, c.classes, l2) + 0.5 * mu * ((pi - anchor) ** 2).sum()

    g = vmap(grad(objective), in_dims=(0, 0, 0, 0, None, None))
    anchor, mu = prox if prox is not None else (p[0].detach(), 0.0)
    for _ in range(steps):
        p = p - lr * g(p, x, y, w, anchor, mu)
    return p


def _split_rows(m: int) -> tuple[slice, slice]:
    half = max(1, m // 2)
    return slice(0, half), slice(half, m)


def evaluate(params: torch.Tensor, clients: Clients, steps: Sequence[int] = (0, 1, 5), lr: float = 0.5,
             l2: float = 1e-4) -> dict[int, dict[str, torch.Tensor]]:
    """Per client test accuracy and MAE after 0, 1, 5 ... personalisation steps from ``params``."""
    out = {}
    c = clients
    for s in steps:
        p = adapt(params, c, s, lr, l2) if s else params.expand(c.n, -1)
        pred = vmap(lambda pi, xi: ordinal.class_probs(pi, xi, c.classes).argmax(-1))(p, c.x_test)
        w = c.mask_test
        err = (pred - c.y_test).abs().double()
        out[s] = {"accuracy": ((err == 0).double() * w).sum(1) / w.sum(1), "mae": (err * w).sum(1) / w.sum(1)}
    return out


def local_only(clients: Clients, steps: int = 200, lr: float = 0.5, l2: float = 1e-4) -> torch.Tensor:
    """(C, P) each client trained alone (the yardstick personalisation must not fall below)."""
    p0 = ordinal.init_params(clients.x.shape[-1], clients.classes)
    return adapt(p0, clients, steps, lr, l2)


def train(clients: Clients, config: MetaConfig = MetaConfig(), val: Clients | None = None,
          fail: dict[int, list[int]] | None = None) -> MetaResult:
    """Train a global model over ``clients`` with ``config.method``.

    ``val`` (default: the clients' own test rows after 1 adaptation step) drives the server: a
    round that makes the validation loss worse halves the server step and is undone.
    ``fail`` maps a round to clients whose update is replaced by NaN there (fault injection).
    """
    cfg = config
    c = clients
    torch.manual_seed(cfg.seed)
    d = c.x.shape[-1]
    p_global = ordinal.init_params(d, c.classes)
    size = p_global.numel() * p_global.element_size()
    sizes = c.sizes
    result = MetaResult(p_global)
    if cfg.method == "oneshot":  # the divide-and-conquer combiner: fit each alone, average once
        local = adapt(p_global, c, cfg.local_steps * cfg.rounds, cfg.local_lr, cfg.l2)
        ok = torch.isfinite(local).all(1)
        result.params = (local[ok] * sizes[ok, None]).sum(0) / sizes[ok].sum()
        result.failed = [(0, i) for i in (~ok).nonzero()[:, 0].tolist()]
        result.bytes_per_client = 2 * size
        return result
    val = val or c
    lr = cfg.server_lr if cfg.method in ("reptile", "fomaml") else 1.0
    best = _val_loss(p_global, val, cfg)
    support, query = _split_rows(c.x.shape[1])
    for r in range(cfg.rounds):
        if cfg.method == "fomaml":  # Per-FedAvg (first order): adapt on half, gradient on the other half
            inner = adapt(p_global, c, 1, cfg.local_lr, cfg.l2, rows=support)
            gq = vmap(grad(_loss), in_dims=(0, 0, 0, 0, None, None))(
                inner, c.x[:, query], c.y[:, query], c.mask[:, query], c.classes, cfg.l2)
            local = p_global - cfg.local_lr * gq  # a local model in parameter space, for aggregation
        else:
            prox = (p_global, cfg.mu) if cfg.method == "fedprox" else None
            local = adapt(p_global, c, cfg.local_steps, cfg.local_lr, cfg.l2, prox=prox)
        for i in (fail or {}).get(r, []):
            local[i] = float("nan")
        ok = torch.isfinite(local).all(1)
        result.failed += [(r, i) for i in (~ok).nonzero()[:, 0].tolist()]
        if not ok.any():
            result.history.append({"round": r, "val_loss": best, "server_lr": lr, "failed": int((~ok).sum())})
            continue
        mean = (local[ok] * sizes[ok, None]).sum(0) / sizes[ok].sum()
        candidate = p_global + lr * (mean - p_global)
        loss = _val_loss(candidate, val, cfg)
        if loss <= best or cfg.method in ("fedavg", "fedprox"):
            p_global, best = candidate, min(best, loss)
        else:
            lr *= 0.5
        result.history.append({"round": r, "val_loss": loss, "server_lr": lr, "failed": int((~ok).sum())})
        result.bytes_per_client += 2 * size
    result.params = p_global
    return result


def _val_loss(p: torch.Tensor, val: Clients, cfg: MetaConfig) -> float:
    """Mean over clients of the test loss after one adaptation step (what personalisation sees)."""
    adapted = adapt(p, val, 1, cfg.local_lr, cfg.l2)
    losses = vmap(lambda pi, xi, yi, wi: ordinal.nll(pi, xi, yi, val.classes, wi))(
        adapted, val.x_test, val.y_test, val.mask_test)
    return float(losses.mean()) if torch.isfinite(losses).all() else float("inf")


def summary(ev: dict[int, dict[str, torch.Tensor]], alone: dict[int, dict[str, torch.Tensor]] | None = None) -> dict:
    """Mean accuracy / MAE per adaptation step, and the share of clients worse than alone."""
    out = {f"{k}_{s}": float(v[k].mean()) for s, v in ev.items() for k in ("accuracy", "mae")}
    if alone is not None:
        ref = alone[0]["mae"]
        for s, v in ev.items():
            out[f"worse_than_alone_{s}"] = float((v["mae"] > ref + 1e-12).double().mean())
    return out

