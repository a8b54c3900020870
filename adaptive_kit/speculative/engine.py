"""Speculative data-parallel training: K workers, per-region speculation, reconciliation.

Every worker holds the model as one flat parameter vector; a process holds W of them as rows
of a (W, N) tensor (W = K when :class:`~.comm.SimComm` simulates all workers in one process,
W = 1 under torch.distributed; the engine calls K ``n_workers``, W ``n_local``) and runs forward and backward for all its rows at once with
``torch.func.vmap``. Each step:

1. if a weight average launched last step is still in flight, compute on the local
   (speculative) weights meanwhile: the loss and gradient are *tagged*;
2. reconcile: adopt the average for the regions it covers; a worker whose speculative weights
   sit at relative RMSE >= ``reconcile_threshold`` from it rolls back — its tagged outputs are
   recomputed with the global weights (counted);
3. all-reduce the gradients of the Global part (every step) and one health flag per worker; the
   control statistics, due every ``control_every`` steps, ride on the next collective;
4. SGD with momentum; the speculative part of each region trains on local gradients;
5. launch the weight average of the regions whose schedule is due (overlapped with the next
   step's compute).

A worker whose gradients or weights are not finite sends zeros and raises its flag, so every
average is over the healthy workers only; the flags are read at reconciliations and every
``health_every`` steps, when the worker is repaired from the others and reported in ``alarms``.
It never reaches the global model silently.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..checks import check_int, check_number
from ..devices import pick_device, rank_generator
from ..training import TrainConfig
from .comm import SimComm, _Comm
from .model import FlatModel, Task, region_index
from .network import profile, ring_allreduce_s
from .regions import ManagerConfig, RegionManager
from .result import RunResult


@dataclass(frozen=True)
class SpeculativeConfig:
    """How regions speculate and synchronise. The presets in :mod:`.baselines` set these."""

    manager: ManagerConfig = ManagerConfig()  # the Region Manager's thresholds
    adaptive: bool = True  # False: every region keeps manager.initial_p
    regions: str | Mapping[str, Sequence[str]] = "layer"  # "layer", "param" or {region: [param names]}
    period: int = 16  # base period: steps between weight averages (a Full region's is 1-max_period of these)
    adapt_period: bool = False  # AdaComm: the base period falls with sqrt(loss / first loss) (not below 1)
    reconcile_threshold: float = 2.5  # a worker rolls back when its distance from the average is this many
    #                                   times the layer's usual RMS spread (its history per step, and today's)
    network: str = "lan"  # the link the Region Manager plans for (a profile of .network.PROFILES)
    step_compute_s: float = 2e-3  # compute per step it plans with: Global only where an all-reduce hides behind it
    speculate: bool = True  # compute ahead while the average is in flight; False: wait for it
    control_every: int = 8  # steps between control statistics (0: never, fixed schedules)
    warmup: int = 0  # steps with every region Global first (post-local SGD's warm-up)
    outer_lr: float = 1.0  # outer step on the averaged pseudo-gradient (DiLoCo: 0.7)
    outer_momentum: float = 0.0  # its Nesterov momentum (DiLoCo: 0.9)
    drift_correction: float = 1.0  # subtract this share of each worker's own drift (its update minus the
    #                                averaged one, per step) from its gradients until the next average
    sketch: int = 16  # count-sketch buckets per region for the control statistics
    health_every: int = 32  # steps between reads of the workers' non-finite flags (and repairs)

    def __post_init__(self) -> None:
        for name, lo in (("period", 1), ("control_every", 0), ("warmup", 0), ("sketch", 1),
                         ("health_every", 1)):
            check_int(f"SpeculativeConfig.{name}", getattr(self, name), lo)
        check_number("SpeculativeConfig.reconcile_threshold", self.reconcile_threshold, 0)
        check_number("SpeculativeConfig.outer_lr", self.outer_lr, 0, 2, open_low=True)
        check_number("SpeculativeConfig.drift_correction", self.drift_correction, 0, 1)
        check_number("SpeculativeConfig.outer_momentum", self.outer_momentum, 0, 1, open_high=True)
        profile(self.network)
        check_number("SpeculativeConfig.step_compute_s", self.step_compute_s, 0, open_low=True)
        if self.adaptive and self.control_every == 0:
            raise ValueError("SpeculativeConfig: adaptive=True needs control_every >= 1")
        if isinstance(self.regions, str) and self.regions not in ("layer", "param"):
            raise ValueError(f"SpeculativeConfig.regions={self.regions!r}: expected 'layer', 'param' or a mapping")


class Engine:
    """The training state of the workers in this process and one step of the algorithm."""

    def __init__(self, task: Task, config: SpeculativeConfig, train_config: TrainConfig, comm: _Comm,
                 device: torch.device) -> None:
        if task.workers != comm.world:
            raise ValueError(f"task has {task.workers} shards for {comm.world} workers")
        self.task, self.cfg, self.train_config, self.comm, self.device = task, config, train_config, comm, device
        torch.manual_seed(train_config.seed)  # same initial weights on every worker
        self.model = FlatModel(task.build().to(device), task.loss, "accuracy" in task.metrics)
        self.n_workers, self.n_local = comm.world, comm.local  # all workers; rows held here
        self.theta = self.model.flat().to(device).expand(self.n_local, -1).clone()  # (W, N)
        self.mom = torch.zeros_like(self.theta)
        self.corr = torch.zeros_like(self.theta) if config.drift_correction else None
        names, self.region_of = region_index(self.model.names, self.model.sizes, config.regions)
        self.region_of = self.region_of.to(device)
        self.n_regions = len(names)
        g = torch.Generator().manual_seed(train_config.seed + 1)  # identical on every worker
        order = torch.empty(self.model.n)
        for r in range(self.n_regions):  # a fixed random order inside each region: p selects a prefix
            idx = (self.region_of == r).nonzero().squeeze(1).cpu()
            order[idx] = torch.randperm(len(idx), generator=g).float() / len(idx)
        self.order = order.to(device)
        m = config.sketch
        self.bucket = (self.region_of * m + torch.randint(0, m, (self.model.n,), generator=g).to(device))
        self.sign = (torch.randint(0, 2, (self.model.n,), generator=g).float() * 2 - 1).to(device)
        sizes = np.bincount(self.region_of.cpu().numpy(), minlength=self.n_regions)
        global_ok = ring_allreduce_s(4.0 * sizes, self.n_workers, profile(config.network)) <= config.step_compute_s
        self.manager = RegionManager(names, config.manager, global_ok)
        self.p = np.zeros(self.n_regions) if config.warmup else self.manager.p.copy()
        self.base_period = config.period
        self.drift_stats = config.adaptive or config.speculate  # fixed schedules send no drift evidence
        self.period = np.full(self.n_regions, config.period)
        self.force = np.zeros(self.n_regions, dtype=bool)  # average at the next step whatever the schedule
        self.last_sync = np.full(self.n_regions, config.warmup - 1)  # step after which the region was last averaged
        self.anchor = self.theta[0].clone()  # last global weights (DiLoCo's outer optimiser)
        self.outer_buf = torch.zeros_like(self.anchor)
        self.pending: dict | None = None
        self.p_target: np.ndarray | None = None
        self.loss0 = 0.0
        self.ctrl_wanted = False
        self._seen = torch.zeros(self.n_workers, dtype=torch.bool, device=device)  # flagged since last check
        self._flag_log: list[tuple[int, str, torch.Tensor]] = []
        self._last_rollbacks = self._last_reconciled = 0
        self.alarms: list[dict] = []
        self.ranks = comm.ranks.tolist()
        self.gens = [rank_generator(train_config.seed, r) for r in self.ranks]
        self._masks()

    # -- masks -----------------------------------------------------------------------------
    def _masks(self) -> None:
        p = torch.as_tensor(self.p, dtype=torch.float32, device=self.device)
        self.speculative_mask = self.order < p[self.region_of]  # (N,) True = trains on local weights
        self.global_index = (~self.speculative_mask).nonzero().squeeze(1)  # weights averaged every step
        self.speculative_index = [(self.speculative_mask & (self.region_of == r)).nonzero().squeeze(1)
                                  for r in range(self.n_regions)]  # per region: its speculative weights

    def _set_p(self, new_p: np.ndarray, step: int) -> None:
        """Grow speculation at once; shrink it only at the region's next average (forced now)."""
        grow = new_p > self.p
        self.p_target = new_p
        if grow.any():
            self.p = np.where(grow, new_p, self.p)
            self._masks()
        shrink = new_p < self.p
        self.force |= shrink
        self.period = self.base_period * self.manager.mult

    # -- data ------------------------------------------------------------------------------
    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for r, gen in zip(self.ranks, self.gens):
            x, y = self.task.shards[r]
            i = torch.randint(0, len(x), (self.train_config.batch_size,), generator=gen)
            xs.append(x[i])
            ys.append(y[i])
        return torch.stack(xs).to(self.device), torch.stack(ys).to(self.device)

    # -- health ----------------------------------------------------------------------------
    def _bad_rows(self, buf: torch.Tensor) -> torch.Tensor:
        return (~torch.isfinite(buf)).any(1)

    def _flags(self, buf: torch.Tensor) -> torch.Tensor:
        """(W, K) one-hot of this process's rows whose ``buf`` row is not finite."""
        flags = torch.zeros(self.n_local, self.n_workers, device=self.device)
        flags[torch.arange(self.n_local, device=self.device), self.comm.ranks] = self._bad_rows(buf).float()
        return flags

    def _start(self, buf: torch.Tensor, step: int, kind: str, control: int, overlapped: bool):
        """Launch the sum of ``buf``; a non-finite row sends zeros and raises its health flag."""
        flags = self._flags(buf)
        clean = torch.where(flags.sum(1, keepdim=True) > 0, 0.0, buf)
        return self.comm.start_sum(torch.cat([clean, flags], 1), step=step, kind=kind,
                                   control=control + self.n_workers, overlapped=overlapped)

    def _healthy_mean(self, buf: torch.Tensor, summed: torch.Tensor, step: int, kind: str) -> torch.Tensor:
        """Mean over the healthy workers of ``buf`` (W, n), from its flagged sum, on device.

        A flagged worker contributed zeros, so it never reaches the average; the flags are kept
        on device and read at the next :meth:`_check_health`, not now (no host sync per step).
        """
        flags = summed[0, -self.n_workers:] > 0
        self._flag_log.append((step, kind, flags))
        self._seen = self._seen | flags
        return summed[:, : buf.shape[1]] / (self.n_workers - flags.sum()).clamp_min(1)

    def _check_health(self, step: int) -> None:
        """Report flagged workers and give them the healthy workers' mean weights and momentum.

        Every rank reads the same all-reduced flags, so all take part in the repair together.

        Raises:
            FloatingPointError: every worker was flagged.
        """
        if not bool(self._seen.any()):  # one host read per check
            self._flag_log.clear()
            return
        runs: dict[tuple[str, tuple[int, ...]], dict] = {}  # one alarm per kind and set of ranks
        for when, kind, flags in self._flag_log:
            ranks = tuple(flags.nonzero().squeeze(1).tolist())
            if ranks:
                run = runs.setdefault((kind, ranks), dict(step=when, last=when, kind=kind,
                                                          ranks=list(ranks), count=0))
                run["last"], run["count"] = when, run["count"] + 1
        self.alarms.extend(runs.values())
        if bool(self._seen.all()):
            raise FloatingPointError(f"step {step}: every worker went non-finite ({self.alarms[-1]})")
        state = torch.cat([self.theta, self.mom], 1)
        bad = (self._seen[self.comm.ranks] | self._bad_rows(state))[:, None]
        summed = self.comm.all_sum(torch.cat([torch.where(bad, 0.0, state), (~bad).float()], 1),
                                   step=step, kind="repair", control=1)
        fixed = torch.where(bad, summed[:, :-1] / summed[:, -1:], state)
        self.theta.copy_(fixed[:, : self.model.n])
        self.mom.copy_(fixed[:, self.model.n:])
        self._seen = torch.zeros_like(self._seen)
        self._flag_log.clear()

    # -- reconciliation ----------------------------------------------------------------------
    def _launch(self, step: int, due: np.ndarray, overlapped: bool, ctrl: torch.Tensor | None = None) -> None:
        regions = np.flatnonzero(due)
        idx = torch.cat([self.speculative_index[r] for r in regions])
        seg = torch.cat([torch.full((len(self.speculative_index[r]),), i, device=self.device)
                         for i, r in enumerate(regions)])
        parts = [self.theta[:, idx]]
        if self.drift_stats:  # each worker's squared update per region: the manager's drift evidence
            parts.append(torch.zeros(self.n_local, len(regions), device=self.device).index_add_(
                1, seg, (self.theta[:, idx] - self.anchor[idx]) ** 2))
        payload = torch.cat(parts + ([] if ctrl is None else [ctrl]), 1)
        n_ctrl = payload.shape[1] - len(idx)
        if ctrl is not None:
            self.ctrl_wanted = False
        self.pending = dict(regions=regions, idx=idx, seg=seg, step=step, payload=payload, n_ctrl=n_ctrl,
                            steps=step - self.last_sync[regions],
                            handle=self._start(payload, step, "weights", n_ctrl, overlapped))
        self.last_sync[regions] = step
        self.force[regions] = False

    def _reconcile(self, step: int, computed: bool) -> torch.Tensor:
        """Adopt the in-flight average; return (W,) rows whose speculative outputs must be redone."""
        pend, self.pending = self.pending, None
        regions, idx, seg = pend["regions"], pend["idx"], pend["seg"]
        n, nr = len(idx), len(regions)
        mean = self._healthy_mean(pend["payload"], pend["handle"].wait(), pend["step"], "weights")
        mean_w = mean[0, :n]
        local = self.theta[:, idx]  # what this step computed with
        d2 = torch.zeros(self.n_local, nr, device=self.device).index_add_(1, seg, (local - mean_w) ** 2)
        # the layer's own scale: its workers' usual spread per step, from earlier averages (all-reduced,
        # so every rank holds the same); none yet (NaN) rolls nobody back, unless the threshold is 0
        kappa = self.cfg.reconcile_threshold
        steps = torch.as_tensor(pend["steps"], dtype=torch.float32, device=self.device)
        usual = torch.as_tensor(np.nan_to_num(self.manager.spread[regions], nan=np.inf if not self.drift_stats
                                              else 0.0), dtype=torch.float32,
                                device=self.device)
        nu = nr if self.drift_stats else 0
        u2 = mean[0, n: n + nu]  # mean over workers of |u_w|^2
        prog = (torch.zeros(nr, device=self.device).index_add_(0, seg, (mean_w - self.anchor[idx]) ** 2)
                if nu else u2)  # |mean u|^2, the averaged update
        if nu:  # and today's spread: a worker rolls back only as an outlier against both
            usual = torch.maximum(usual * steps, (u2 - prog).clamp_min(0))
        roll = ~(d2 <= kappa * kappa * usual) if kappa > 0 else torch.ones_like(d2, dtype=torch.bool)
        redo = roll.any(1) if computed else torch.zeros(self.n_local, dtype=torch.bool, device=self.device)
        # outer step on the pseudo-gradient anchor - mean (lr 1, momentum 0: plain averaging)
        delta = self.anchor[idx] - mean_w
        self.outer_buf[idx] = self.cfg.outer_momentum * self.outer_buf[idx] + delta
        self.anchor[idx] -= self.cfg.outer_lr * (delta + self.cfg.outer_momentum * self.outer_buf[idx])
        drift = (mean_w - local) if self.corr is not None else None
        self.theta[:, idx] = self.anchor[idx]
        ev = torch.cat([(u2 - prog).clamp_min(0), prog, roll.sum(0).float()]).double().cpu().numpy()  # one host copy
        if nu:
            self.manager.observe_sync(regions, ev[:nu], ev[nu: 2 * nu], pend["steps"])
        if drift is not None:  # SCAFFOLD's control variate from what every worker already holds: its
            # own update minus the averaged one, per step (momentum's gain 1 / (1 - momentum) taken out)
            per_step = torch.as_tensor(1.0 / np.maximum(pend["steps"], 1), dtype=torch.float32,
                                       device=self.device)[seg]
            self.corr[:, idx] = (self.cfg.drift_correction * (1 - self.train_config.momentum) / self.train_config.lr
                                 * drift * per_step)
        if pend["n_ctrl"] > nu:
            self._apply_control(mean[0, n + nu:], step)
        target = self.p_target
        if target is not None and (target[regions] < self.p[regions]).any():
            self.p[regions] = np.minimum(self.p[regions], target[regions])
            was = self.speculative_mask
            self._masks()
            # weights turning Global were just averaged, but their local momentum differs per
            # worker: left alone, the same averaged gradient would move them apart again
            self.mom[:, was & ~self.speculative_mask] = 0.0
        if computed:
            self._last_rollbacks = int(ev[2 * nu:].sum())
            self._last_reconciled = nr * self.n_local
        return redo

    # -- one step --------------------------------------------------------------------------
    def _control(self, loss: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per worker: count sketch of the gradient per region, its squared norm, the loss."""
        m = self.cfg.sketch
        s = torch.zeros(self.n_local, self.n_regions * m, device=self.device).index_add_(1, self.bucket, g * self.sign)
        s2 = s.view(self.n_local, self.n_regions, m).pow(2).sum(2)
        return torch.cat([s, s2, loss[:, None]], 1)

    def _apply_control(self, c: torch.Tensor, t: int) -> None:
        """Feed the workers' mean control vector to the Region Manager and the schedule."""
        self.ctrl_wanted = False
        cfg, m = self.cfg, self.cfg.sketch
        stats = self.manager.observe(c[: self.n_regions * m].view(self.n_regions, m), c[self.n_regions * m: self.n_regions * m + self.n_regions],
                                     float(c[-1]))
        if cfg.adaptive:
            self._set_p(self.manager.decide(stats), t)
        if cfg.adapt_period and np.isfinite(stats.loss):  # AdaComm: sqrt(loss / first loss)
            self.loss0 = self.loss0 or max(stats.loss, 1e-12)
            scale = np.sqrt(max(stats.loss, 0.0) / self.loss0)
            self.base_period = int(np.clip(np.ceil(cfg.period * scale), 1, cfg.period))
        self.period = self.base_period * self.manager.mult

    def step(self, t: int) -> dict:
        cfg = self.cfg
        if t == cfg.warmup and cfg.warmup:
            self._set_p(self.manager.p.copy(), t)
        x, y = self.batch()
        redo = None
        reconciled = self.pending is not None
        if self.pending is not None and not cfg.speculate:
            self._reconcile(t, computed=False)
        tagged = self.pending is not None  # computed on weights whose average is still in flight
        loss, g = self.model.loss_and_grad(self.theta, x, y)
        self._last_rollbacks = self._last_reconciled = 0
        if self.pending is not None:
            redo = self._reconcile(t, computed=True)
            if bool(redo.any()):
                loss2, g2 = self.model.loss_and_grad(self.theta, x, y)
                loss = torch.where(redo, loss2, loss)
                g = torch.where(redo[:, None], g2, g)
        if cfg.control_every and t % cfg.control_every == 0 and t >= cfg.warmup:
            self.ctrl_wanted = True  # rides on the next collective, so it adds no latency
        # every average starts on a multiple of its period (powers of two of the base): they nest
        on_time = (t >= cfg.warmup) & ((t - cfg.warmup) % self.period == 0)
        if self.corr is not None:
            g = g - self.corr
        due = (on_time | self.force) & np.array([len(s) > 0 for s in self.speculative_index])
        ng = len(self.global_index)
        ctrl = self._control(loss, g) if self.ctrl_wanted and (ng or due.any()) else None
        if ng:
            buf = g[:, self.global_index] if ctrl is None else torch.cat([g[:, self.global_index], ctrl], 1)
            n_ctrl = 0 if ctrl is None else ctrl.shape[1]
            # a gradient all-reduce overlaps the backward pass, as DDP's buckets do
            mean = self._healthy_mean(buf, self._start(buf, t, "grad", n_ctrl, True).wait(), t, "grad")
            g[:, self.global_index] = mean[:, :ng]
            if ctrl is not None:
                self._apply_control(mean[0, ng:], t)
                ctrl = None
        self.mom.mul_(self.train_config.momentum).add_(g)
        self.theta.sub_(self.train_config.lr * self.mom)
        if reconciled or t % cfg.health_every == cfg.health_every - 1:
            self._check_health(t)  # at steps every rank shares: reconciliations and a fixed beat
        if due.any():
            self._launch(t, due, overlapped=cfg.speculate, ctrl=ctrl)
        # what the step produced, for on_step callbacks: loss stays on device (W,)
        self.last = dict(loss=loss.detach(), tagged=tagged, redo=redo, rollbacks=self._last_rollbacks)
        return self.last

    def average(self, step: int) -> torch.Tensor:
        """The workers' averaged weights (N,), for evaluation (logged as ``eval`` traffic)."""
        if self.n_local == self.n_workers and isinstance(self.comm, SimComm):
            self.comm._record(self.theta, step, "eval", 0, False)
            return self.theta.mean(0)
        return self.comm.all_sum(self.theta, step=step, kind="eval")[0] / self.n_workers

    def finish(self, step: int) -> None:
        """Reconcile what is in flight, then average every speculative weight: one consensus model."""
        done = np.zeros(self.n_regions, dtype=bool)
        if self.pending is not None:
            done[self.pending["regions"]] = True  # already one model: a second average would only
            self._reconcile(step, computed=False)  # cost bytes (and, with outer momentum, move it)
        self._check_health(step)
        due = np.array([len(s) > 0 for s in self.speculative_index]) & ~done
        if due.any():
            self._launch(step, due, overlapped=False)
            self._reconcile(step, computed=False)


def train(task: Task, config: SpeculativeConfig = SpeculativeConfig(), train_config: TrainConfig = TrainConfig(), *,
          comm: _Comm | None = None, device: torch.device | str | None = None, eval_every: int = 10,
          method: str = "speculative", on_step: Callable[[int, Engine], bool | None] | None = None,
          progress: bool = False) -> RunResult:
    """Train ``task`` over its workers with ``config``; return the :class:`RunResult`.

    Args:
        train_config: steps, batch size, learning rate, momentum and seed of every worker.
        comm: ``SimComm(K)`` (default: all K workers in this process) or ``DistComm()`` inside a
            worker started by :func:`adaptive_kit.distributed.launch` or ``torchrun``.
        device: where the workers' weights live; default :func:`adaptive_kit.pick_device`
            (CUDA when present, else CPU).
        eval_every: steps between test evaluations of the averaged model (and after the last).
        on_step: called after every step with ``(step, engine)``; return True to stop early.

    Raises:
        ValueError: an argument is invalid (the message names it).
        FloatingPointError: every worker went non-finite at once.
    """
    check_int("eval_every", eval_every, 1)
    device = pick_device(device)
    comm = comm or SimComm(task.workers, device)
    eng = Engine(task, config, train_config, comm, device)
    xt, yt = task.test[0].to(device), task.test[1].to(device)
    compute_s = _calibrate(eng)
    steps = train_config.steps
    losses = torch.zeros(steps, device=device)
    redo_n = torch.zeros(steps, device=device)
    tagged = np.zeros(steps, dtype=bool)
    rollbacks = np.zeros(steps, dtype=int)
    reconciled = np.zeros(steps, dtype=int)
    p_hist = np.zeros((steps, eng.n_regions))
    evals = []
    t0 = time.perf_counter()
    last = steps - 1
    for t in tqdm(range(steps), desc=method, disable=not progress, leave=False):
        out = eng.step(t)
        losses[t] = out["loss"].mean()
        if out["redo"] is not None:
            redo_n[t] = out["redo"].sum()
        tagged[t] = out["tagged"]
        rollbacks[t], reconciled[t] = eng._last_rollbacks, eng._last_reconciled
        p_hist[t] = eng.p
        stop = bool(on_step(t, eng)) if on_step is not None else False
        if stop or t == steps - 1:
            last = t
            eng.finish(t)
        if t % eval_every == 0 or t == last:
            evals.append((t, *eng.model.evaluate(eng.average(t), xt, yt)))
        if stop:
            break
    wall = time.perf_counter() - t0
    n = last + 1
    log = [c for c in comm.log if c.step < n]
    step_bytes = np.zeros((n, 2), dtype=np.int64)
    for c in log:
        if c.kind != "eval":
            step_bytes[c.step] += (c.payload_bytes, c.control_bytes)
    history = pd.DataFrame(dict(step=np.arange(n), loss=losses[:n].cpu().numpy(), tagged=tagged[:n],
                                rollbacks=rollbacks[:n], reconciled=reconciled[:n],
                                recomputes=redo_n[:n].cpu().numpy().astype(int),
                                payload_bytes=step_bytes[:, 0], control_bytes=step_bytes[:, 1]))
    return RunResult(method, eng.n_workers, eng.manager.names, history,
                     pd.DataFrame(evals, columns=["step", "test_loss", "test_accuracy"]), p_hist[:n], log,
                     compute_s, wall, eng.alarms, eng.theta[0].cpu())


def _calibrate(eng: Engine, warmup: int = 3, reps: int = 7) -> float:
    """Fastest of ``reps`` timings of one worker's forward + backward (the network model's compute
    time), after ``warmup`` untimed ones: the minimum is the least disturbed by other load."""
    gen_state = [g.get_state() for g in eng.gens]
    x, y = eng.batch()
    for g, s in zip(eng.gens, gen_state):
        g.set_state(s)
    times = []
    for _ in range(warmup + reps):
        t0 = time.perf_counter()
        loss, _ = eng.model.loss_and_grad(eng.theta[:1], x[:1], y[:1])
        float(loss[0])
        times.append(time.perf_counter() - t0)
    return float(min(times[warmup:]))


def worker(rank: int, world: int, task: Task, config: SpeculativeConfig, train_config: TrainConfig,
           eval_every: int = 10, method: str = "speculative",
           device: torch.device | str | None = None) -> RunResult:
    """One rank of :func:`train` under torch.distributed (for ``launch`` or ``torchrun``).

    ``adaptive_kit.distributed.launch(worker, K, (task, config, train_config))`` trains with real
    collectives (gloo on CPU, nccl on GPUs) and returns every rank's :class:`RunResult`.
    ``device`` defaults to the process group's: this rank's GPU under nccl, else the CPU (what
    :func:`adaptive_kit.pick_device` gives a process that holds one GPU or none).
    """
    from ..distributed import worker_device
    from .comm import DistComm

    device = worker_device() if device is None else pick_device(device)
    return train(task, config, train_config, comm=DistComm(device), device=device,
                 eval_every=eval_every, method=method)
