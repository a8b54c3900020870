"""The federated meta-learner: FedAvg, FedProx, one-shot averaging, Reptile, first-order MAML
(Per-FedAvg) and Meta-SGD over clients' subsets, with personalised evaluation after local steps.

Clients are vectorised: each split (train / val / test) is padded to one (C, m, d) tensor with a
(C, m) mask, and local gradient steps run for all clients at once under
``torch.func.vmap(grad(...))``. A round (the seed's pseudocode):

1. every client trains a local model from the broadcast global parameters — FedAvg / FedProx:
   ``local_steps`` full-batch steps; Reptile: the same, and the meta-gradient is the
   difference; Per-FedAvg (``fomaml``) and Meta-SGD (``metasgd``): one adaptation step on half
   of the client's train rows and the meta-gradient of the loss on the other half —
   first-order for Per-FedAvg, exact (second-order, through the step) for Meta-SGD, which also
   learns one adaptation step size per parameter;
2. a client whose update is not finite is left out of the aggregate and reported;
3. the server averages the updates (weighted by rows) and steps: plain averaging for FedAvg /
   FedProx, Adam on the meta-gradient for the meta-learners;
4. validation drives the global model: the loss on the clients' validation rows after one
   adaptation step is tracked, the best global model so far is kept, and the server step is
   halved after ``patience`` rounds without improvement;
5. the new global model is broadcast.

With ``torch.distributed`` initialised and ``distributed=True``, each rank holds its own clients
and the sums of step 3 and the validation loss go through ``all_reduce``; every rank then makes
the same server step, and rank 0's parameters are broadcast. The result equals the one-process
run on all clients (a test).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.func import grad, vmap

from ..checks import check_int, check_number
from ..devices import pick_device
from . import ordinal
from .checks import check_features, check_labels, check_steps

METHODS = ("fedavg", "fedprox", "oneshot", "reptile", "fomaml", "metasgd", "metacurv")
META_METHODS = ("reptile", "fomaml", "metasgd", "metacurv")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Clients:
    """Padded per-client data (float64): ``x[split]`` (C, m, d), ``y[split]`` (C, m), ``mask[split]``
    (C, m) with 1 for real rows, for each split in train / val / test. ``ids`` are the clients'
    global numbers (ranks hold a subset)."""

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor]
    classes: int
    ids: torch.Tensor

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def features(self) -> int:
        return self.x["train"].shape[-1]

    @property
    def sizes(self) -> torch.Tensor:
        """Train rows per client."""
        return self.mask["train"].sum(1)

    def subset(self, which: Sequence[int] | torch.Tensor) -> Clients:
        """The clients at positions ``which`` (e.g. the ones a rank holds)."""
        idx = torch.as_tensor(which, dtype=torch.long)
        pick = {s: v[idx] for s, v in self.x.items()}
        return Clients(pick, {s: v[idx] for s, v in self.y.items()},
                       {s: v[idx] for s, v in self.mask.items()}, self.classes, self.ids[idx])


def _pad(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m = max(len(y) for _, y in parts)
    d = parts[0][0].shape[1]
    x = torch.zeros(len(parts), m, d, dtype=torch.float64)
    y = torch.zeros(len(parts), m, dtype=torch.long)
    mask = torch.zeros(len(parts), m, dtype=torch.float64)
    for i, (xi, yi) in enumerate(parts):
        x[i, : len(yi)], y[i, : len(yi)], mask[i, : len(yi)] = xi.double(), yi.long(), 1.0
    return x, y, mask


def make_clients(x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, val_fraction: float = 0.2,
                 test_fraction: float = 0.2, seed: int = 0, classes: int | None = None,
                 device: torch.device | str | None = None) -> Clients:
    """One client per part of ``labels``, each with its own seeded train / val / test split, on
    ``device`` (default :func:`~adaptive_kit.pick_device`); training and evaluation follow it.

    Raises:
        ValueError: NaN features, labels not 0..J-1, fractions outside (0, 1) or summing to >= 1,
            a part with fewer than 3 rows.
    """
    x = check_features(x)
    labels = torch.as_tensor(labels)
    if len(labels) != len(x) or len(y) != len(x):
        raise ValueError(f"x, y and labels need the same rows, got {len(x)}, {len(y)}, {len(labels)}")
    y, found = check_labels(y)
    classes = classes or found
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < f < 1:
            raise ValueError(f"{name} must be in (0, 1), got {f!r}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction!r}")
    g = torch.Generator().manual_seed(seed)
    splits: dict[str, list] = {s: [] for s in SPLITS}
    parts = torch.unique(labels)
    for p in parts.tolist():
        idx = (labels == p).nonzero()[:, 0]
        if len(idx) < 3:
            raise ValueError(f"part {p} has {len(idx)} row(s); a client needs at least 3 (train, val, test)")
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = max(1, int(round(len(idx) * val_fraction)))
        n_test = max(1, int(round(len(idx) * test_fraction)))
        for s, rows in zip(SPLITS, (idx[n_val + n_test:], idx[:n_val], idx[n_val:n_val + n_test])):
            splits[s].append((x[rows], y[rows]))
    dev = pick_device(device)
    padded = {s: [t.to(dev) for t in _pad(v)] for s, v in splits.items()}
    return Clients({s: v[0] for s, v in padded.items()}, {s: v[1] for s, v in padded.items()},
                   {s: v[2] for s, v in padded.items()}, classes, torch.arange(len(parts), device=dev))


@dataclass(frozen=True)
class FederatedConfig:
    """How :func:`train` learns the global model (see the module docstring for each method)."""

    method: str = "metasgd"  # one of METHODS: fedavg, fedprox, oneshot, reptile, fomaml, metasgd, metacurv
    rounds: int = 30  # server rounds (one-shot: local steps = rounds x local_steps, one average)
    local_steps: int = 5  # full-batch client steps per round (FedAvg / FedProx / Reptile / one-shot)
    local_lr: float = 0.5  # client and adaptation step size (Meta-SGD: its initial per-parameter step)
    server_lr: float = 0.05  # Adam step of the meta-learners on the mean meta-gradient (FedAvg / FedProx average plainly)
    mu: float = 0.1  # FedProx's proximal weight on |p - global|^2 / 2
    l2: float = 1e-4  # ridge penalty on the coefficients (not the thresholds) of every client's loss
    patience: int = 5  # rounds without validation improvement before the server step halves
    seed: int = 0  # seeds the initial model and the meta-learners' support / query split

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("rounds", "local_steps", "patience"):
            check_int(name, getattr(self, name), 1)
        for name in ("local_lr", "server_lr"):
            check_number(name, getattr(self, name), 0, open_low=True)
        for name in ("mu", "l2"):
            check_number(name, getattr(self, name), 0)


@dataclass
class MetaModel:
    """A global model and the per-parameter adaptation steps clients take from it."""

    params: torch.Tensor  # (P,)
    steps: torch.Tensor  # (P,) adaptation step sizes (all local_lr except for Meta-SGD)


@dataclass
class FederatedResult:
    """What :func:`train` returns: the best global model on validation and how training went."""

    model: MetaModel  # the best global model on validation
    history: list[dict] = field(default_factory=list)  # per round: val_loss, val_mae, server_lr, failed
    failed: list[tuple[int, int]] = field(default_factory=list)  # (round, client id) left out
    bytes_per_client: int = 0  # sent + received over all rounds
    best_round: int = -1


def _loss(p: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, classes: int, l2: float) -> torch.Tensor:
    return ordinal.nll(p, x, y, classes, w) + l2 * (p[: x.shape[-1]] ** 2).sum()


def adapt(params: torch.Tensor, clients: Clients, steps: int, lr: float | torch.Tensor, l2: float = 1e-4,
          prox: tuple[torch.Tensor, float] | None = None, weight: torch.Tensor | None = None,
          newton: float | None = None) -> torch.Tensor:
    """(C, P) parameters after ``steps`` full-batch gradient steps on each client's train rows
    (``weight`` (C, m) selects rows; default all) from ``params`` (P,) or (C, P). ``lr`` is a
    number or a (P,) vector of per-parameter steps; ``prox`` = (anchor, mu) adds FedProx's term.

    With ``newton`` = damping λ > 0 each step is a damped Newton step on the client's own loss,
    ``p - lr (H + λ I)^-1 g``: one step moves a client most of the way to the optimum of its own
    loss plus (λ / 2) |p - start|^2, the global model acting as a prior (λ large: a gradient
    step of size lr / λ; λ small: the client's own Newton fit). ``lr`` must then be a number."""
    c = clients
    steps = check_steps((steps,))[0]
    x, y = c.x["train"], c.y["train"]
    w = c.mask["train"] if weight is None else weight
    p = params.expand(c.n, -1).clone() if params.dim() == 1 else params.clone()
    if steps == 0:
        return p

    def objective(pi, xi, yi, wi, anchor, mu):
        return _loss(pi, xi, yi, wi, c.classes, l2) + 0.5 * mu * ((pi - anchor) ** 2).sum()

    g = vmap(grad(objective), in_dims=(0, 0, 0, 0, None, None))
    anchor, mu = prox if prox is not None else (p[0].detach(), 0.0)
    if newton is not None:
        if not newton > 0 or isinstance(lr, torch.Tensor):
            raise ValueError(f"newton damping must be > 0 with a number lr, got {newton!r}, lr {type(lr).__name__}")
        h = vmap(torch.func.hessian(objective), in_dims=(0, 0, 0, 0, None, None))
        eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
    for _ in range(steps):
        gr = g(p, x, y, w, anchor, mu)
        if newton is not None:
            p = p - lr * torch.linalg.solve(h(p, x, y, w, anchor, mu) + newton * eye, gr)
        else:
            p = p - (gr @ lr.T if isinstance(lr, torch.Tensor) and lr.dim() == 2 else lr * gr)
    return p


def _halves(clients: Clients) -> tuple[torch.Tensor, torch.Tensor]:
    """(support, query) row weights: alternate real train rows (rows are shuffled per client)."""
    w = clients.mask["train"]
    even = (torch.arange(w.shape[1], device=w.device) % 2 == 0).double()
    return w * even, w * (1 - even)


def evaluate(model: MetaModel | torch.Tensor, clients: Clients, steps: Sequence[int] = (0, 1, 5),
             lr: float = 0.5, l2: float = 1e-4, split: str = "test", guard: bool = False,
             newton: float | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Per-client accuracy (of the most probable class), MAE (of the median class) and loss on
    ``split`` after 0, 1, 5 ... adaptation steps on the client's train rows from ``model`` (a
    :class:`MetaModel`, a (P,) global or (C, P) per-client parameters, adapted with ``lr``).

    With ``guard`` each client keeps, of its models after 0, 1, ..., s steps, the one with the
    lowest loss on its own validation rows (early stopping): adaptation cannot leave a client
    worse on validation than the model it started from. ``steps[i]`` then means "at most".
    ``newton`` (a damping) adapts by damped Newton steps (:func:`adapt`) instead of gradient steps.

    Raises:
        ValueError: ``steps`` empty or holding a negative or non-integer count, an unknown ``split``.
    """
    c = clients
    steps = check_steps(steps)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    params, step = (model.params, model.steps) if isinstance(model, MetaModel) else (model, lr)
    x, y, w = c.x[split], c.y[split], c.mask[split]

    def scores(p: torch.Tensor) -> dict[str, torch.Tensor]:
        mode = vmap(lambda pi, xi: ordinal.predict(pi, xi, c.classes))(p, x)
        median = vmap(lambda pi, xi: ordinal.predict(pi, xi, c.classes, "median"))(p, x)
        loss = vmap(lambda pi, xi, yi, wi: ordinal.nll(pi, xi, yi, c.classes, wi))(p, x, y, w)
        return {"accuracy": ((mode == y).double() * w).sum(1) / w.sum(1),
                "mae": ((median - y).abs().double() * w).sum(1) / w.sum(1), "loss": loss}

    def val_loss(p: torch.Tensor) -> torch.Tensor:
        vx, vy, vw = c.x["val"], c.y["val"], c.mask["val"]
        loss = vmap(lambda pi, xi, yi, wi: ordinal.nll(pi, xi, yi, c.classes, wi))(p, vx, vy, vw)
        return torch.nan_to_num(loss, nan=torch.inf)

    out = {}
    p = adapt(params, c, 0, step, l2)
    best, best_val = p, val_loss(p) if guard else None
    for k in range(max(steps) + 1):
        if k > 0:
            p = adapt(p, c, 1, step, l2, newton=newton)
            if guard:
                v = val_loss(p)
                better = v < best_val
                best, best_val = torch.where(better[:, None], p, best), torch.where(better, v, best_val)
        if k in steps:
            out[k] = scores(best if guard else p)
    return {s: out[s] for s in steps}


def local_only(clients: Clients, l2: float = 1e-4, max_iter: int = 100) -> torch.Tensor:
    """(C, P) each client fitted alone to convergence (L-BFGS on its train rows): the yardstick
    personalisation must not fall below. A client missing classes keeps the thresholds' init."""
    out = []
    for i in range(clients.n):
        rows = clients.mask["train"][i] > 0
        x, y = clients.x["train"][i, rows], clients.y["train"][i, rows]
        init = ordinal.init_params(clients.features, clients.classes, y).to(x.device)
        out.append(ordinal.fit(x, y, clients.classes, l2=l2, init=init, max_iter=max_iter).params)
    return torch.stack(out)


def _allreduce(t: torch.Tensor, on: bool) -> torch.Tensor:
    if on:
        dist.all_reduce(t)
    return t


def _val(model: MetaModel, c: Clients, l2: float, on: bool) -> tuple[float, float]:
    """Mean over all clients of validation loss and MAE after one adaptation step."""
    ev = evaluate(model, c, (1,), l2=l2, split="val")[1]
    loss = torch.nan_to_num(ev["loss"], nan=torch.inf)
    s = _allreduce(torch.stack([loss.sum(), ev["mae"].sum(), torch.tensor(float(c.n), dtype=torch.float64, device=loss.device)]), on)
    return float(s[0] / s[2]), float(s[1] / s[2])


def _local_update(p: torch.Tensor, steps: torch.Tensor, c: Clients, cfg: FederatedConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, P) per-client parameter update direction (FedAvg-style: the local model; meta: the
    meta-gradient) and (C, P) the Meta-SGD step-size gradient (zeros otherwise)."""
    zero = torch.zeros(c.n, steps.numel(), dtype=p.dtype, device=p.device)
    if cfg.method in ("fedavg", "fedprox", "reptile"):
        prox = (p, cfg.mu) if cfg.method == "fedprox" else None
        local = adapt(p, c, cfg.local_steps, cfg.local_lr, cfg.l2, prox=prox)
        return (local if cfg.method != "reptile" else p - local), zero
    support, query = _halves(c)

    def meta_loss(pi, st, xi, yi, si, qi):
        gs_ = grad(_loss)(pi, xi, yi, si, c.classes, cfg.l2)
        inner = pi - (st @ gs_ if cfg.method == "metacurv" else torch.exp(st) * gs_)
        if cfg.method == "fomaml":
            inner = inner.detach()  # first order: the query gradient at the adapted point
            return _loss(inner + pi - pi.detach(), xi, yi, qi, c.classes, cfg.l2)
        return _loss(inner, xi, yi, qi, c.classes, cfg.l2)

    gp, gs = vmap(grad(meta_loss, argnums=(0, 1)), in_dims=(None, None, 0, 0, 0, 0))(
        p, steps if cfg.method == "metacurv" else torch.log(steps), c.x["train"], c.y["train"], support, query)
    if cfg.method in ("metasgd", "metacurv"):
        return gp, gs.reshape(c.n, -1)
    return gp, zero


def train(clients: Clients, config: FederatedConfig = FederatedConfig(), fail: dict[int, list[int]] | None = None,
          distributed: bool = False, progress: bool = False, on_step=None) -> FederatedResult:
    """Train a global model over ``clients`` with ``config.method`` (see the module docstring).

    ``fail`` maps a round to client ids whose update is replaced by NaN there (fault injection);
    ``on_step(round, model, history_row)`` is called after each round (live panels).
    """
    cfg, c = config, clients
    on = distributed and dist.is_available() and dist.is_initialized()
    torch.manual_seed(cfg.seed)
    p = ordinal.init_params(c.features, c.classes).to(c.ids.device)
    model = MetaModel(p, torch.eye(p.numel(), dtype=p.dtype, device=p.device) * cfg.local_lr if cfg.method == "metacurv"
                      else torch.full_like(p, cfg.local_lr))
    per_msg = (p.numel() + (model.steps.numel() if cfg.method in ("metasgd", "metacurv") else 0)) * p.element_size()
    sizes = c.sizes
    result = FederatedResult(MetaModel(p.clone(), model.steps.clone()))
    if cfg.method == "oneshot":  # the divide-and-conquer combiner: fit each alone, average once
        local = adapt(p, c, cfg.local_steps * cfg.rounds, cfg.local_lr, cfg.l2)
        _inject(local, c, (fail or {}).get(0, []))
        ok = torch.isfinite(local).all(1)
        w = sizes * ok
        s = _allreduce(torch.cat([(torch.nan_to_num(local) * w[:, None]).sum(0), w.sum()[None]]), on)
        result.model.params = s[:-1] / s[-1].clamp(min=1e-12)
        result.failed = _failures(0, c, ok, on)
        result.bytes_per_client = 2 * per_msg
        return result
    meta = cfg.method in META_METHODS
    server_lr = cfg.server_lr
    k = p.numel() + model.steps.numel()
    opt_state = [torch.zeros(k, dtype=p.dtype, device=p.device), torch.zeros(k, dtype=p.dtype, device=p.device), 0]
    best, _ = _val(model, c, cfg.l2, on)
    stale = 0
    rounds = range(cfg.rounds)
    if progress:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc=f"{cfg.method}", leave=False)
    for r in rounds:
        upd, step_grad = _local_update(model.params, model.steps, c, cfg)
        _inject(upd, c, (fail or {}).get(r, []))
        ok = torch.isfinite(upd).all(1) & torch.isfinite(step_grad).all(1)
        failed = _failures(r, c, ok, on)
        result.failed += failed
        w = sizes * ok
        s = _allreduce(torch.cat([(torch.nan_to_num(upd) * w[:, None]).sum(0),
                                  (torch.nan_to_num(step_grad) * w[:, None]).sum(0), w.sum()[None]]), on)
        if s[-1] > 0:
            mean = s[:-1] / s[-1]
            if meta:
                _adam(model, mean, opt_state, server_lr, learn=cfg.method)
            else:
                model.params = mean[: p.numel()].clone()
        if on:
            for t in (model.params, model.steps):
                dist.broadcast(t, 0)
        loss, mae = _val(model, c, cfg.l2, on)
        if loss < best - 1e-9:
            best, stale = loss, 0
            result.model = MetaModel(model.params.clone(), model.steps.clone())
            result.best_round = r
        else:
            stale += 1
            if stale >= cfg.patience:
                server_lr, stale = server_lr / 2, 0
        row = {"round": r, "val_loss": loss, "val_mae": mae, "best_val_loss": best, "server_lr": server_lr,
               "failed": len(failed)}
        result.history.append(row)
        result.bytes_per_client += 2 * per_msg
        if on_step is not None:
            on_step(r, model, row)
    return result


def _inject(upd: torch.Tensor, c: Clients, ids: Sequence[int]) -> None:
    for i in ids:
        hit = (c.ids == i).nonzero()[:, 0]
        upd[hit] = float("nan")


def _failures(r: int, c: Clients, ok: torch.Tensor, on: bool) -> list[tuple[int, int]]:
    """(round, client id) of every failed client on every rank."""
    dev = c.ids.device
    bad = torch.zeros(int(c.ids.max()) + 1 if c.n else 0, dtype=torch.float64, device=dev)
    if on:  # ids are global: gather them by summing indicator vectors of the largest size
        size = torch.tensor([float(len(bad))], dtype=torch.float64, device=dev)
        dist.all_reduce(size, op=dist.ReduceOp.MAX)
        bad = torch.zeros(int(size), dtype=torch.float64, device=dev)
    bad[c.ids[~ok]] = 1.0
    _allreduce(bad, on)
    return [(r, int(i)) for i in bad.nonzero()[:, 0].tolist()]


def _adam(model: MetaModel, g: torch.Tensor, state: list, lr: float, learn: str,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """One Adam step on [params, log steps] with the mean meta-gradient ``g``."""
    m, v, t = state
    t += 1
    m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
    v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
    step = lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    n = model.params.numel()
    model.params = model.params - step[:n]
    if learn == "metasgd":
        model.steps = torch.exp(torch.log(model.steps) - step[n:])
    elif learn == "metacurv":
        model.steps = model.steps - step[n:].view_as(model.steps)
    state[2] = t


def summary(ev: dict[int, dict[str, torch.Tensor]], alone: dict[int, dict[str, torch.Tensor]] | None = None) -> dict:
    """Mean accuracy / MAE per adaptation step, and the share of clients worse than alone."""
    out = {f"{k}_{s}": float(v[k].mean()) for s, v in ev.items() for k in ("accuracy", "mae")}
    if alone is not None:
        ref = alone[0]["mae"]
        for s, v in ev.items():
            out[f"worse_than_alone_{s}"] = float((v["mae"] > ref + 1e-12).double().mean())
    return out



def _worker(rank: int, world: int, clients: Clients, config: FederatedConfig, fail: dict | None) -> FederatedResult:
    from .subsets import assign_resources

    mine = assign_resources(clients.sizes.tolist(), world)[rank]
    return train(clients.subset(sorted(mine)), config, fail=fail, distributed=True)


def train_distributed(clients: Clients, config: FederatedConfig = FederatedConfig(), world_size: int = 2,
                      fail: dict[int, list[int]] | None = None, **launch_kwargs) -> FederatedResult:
    """:func:`train` with clients as ranks: each of ``world_size`` gloo processes (or this rank under
    torchrun) holds the clients :func:`~adaptive_kit.federated.subsets.assign_resources` gives it
    (balanced by rows). Returns rank 0's result (every rank holds the same model).

    Raises:
        ValueError: more ranks than clients.
    """
    from ..distributed import is_torchrun, run

    world = int(os.environ["WORLD_SIZE"]) if is_torchrun() else world_size
    if world > clients.n:
        raise ValueError(f"world_size {world} exceeds the {clients.n} clients; every rank needs one")

    return run(_worker, world_size, (clients, config, fail), **launch_kwargs)[0]

