"""Population search against the anchors users reach for: random search, Optuna TPE + Hyperband
and Ray Tune Population Based Training, on the same search space, data and budget.

Problems (``make_problem``): ``digits`` is ``ak.datasets.digits(seed=0)``: its test part (449 rows) is
the test set and 20 % of its train part (seeded by the run seed) the validation set, the rest
(1,078 rows) the training set; search space ``SearchSpace()`` (MLPs). ``noisy`` is the same
split with 30 % of the training labels (seeded) replaced by labels drawn uniformly from the 10
classes (validation and test stay clean), search space ``SearchSpace(kinds=("conv", "linear"))``
on ``image_shape=(1, 8, 8)``.

Budget: ``members x epochs`` member-epochs (8 x 30 = 240; quick: less, see ``QUICK``). An epoch is
``ceil(n_train / batch_size)`` SGD steps (``torch.optim.SGD`` with the spec's lr, momentum and
weight decay, cross-entropy) on batches drawn with replacement from a seeded generator. Every
method evaluates the model it just trained on validation and test after each of its epochs;
each evaluation is a point (member-epochs consumed so far by the whole method, val acc, test acc)
of the method's ``Curve``. From a curve (``curve_metrics``): the member-epochs consumed when val
acc first reaches the problem's target (never: censored, shown ``>budget``, +inf in medians); the
AUC of the best-so-far val acc over the budget axis (mean over consumed = 1..budget, 0 before the
first point, in [0, 1]); the test acc of the point with the best val acc; wall seconds; start-up
seconds (until the first SGD step); and work seconds (summed time inside the training and
evaluation loops, so a method's framework overhead is ``wall / work``).

Methods:

  random   8 specs from ``space.sample(rng)`` (rng seeded by the run seed), trained in lockstep
           (one epoch each, round robin): the plain torch loop of ``Member``.
  optuna   ``TPESampler(seed)`` + ``HyperbandPruner(min_resource=1, max_resource=epochs)``, ask and
           tell; the trial space mirrors ``SearchSpace`` (depth, per-layer kind / width /
           activation, log lr, momentum, log weight decay, batch size); val acc reported each
           epoch, a trial stops when pruned; trials run one after another until the budget is
           spent (a pruned trial consumes the epochs it ran, the last trial is cut at the budget).
  pbt      Ray Tune ``PopulationBasedTraining`` (``perturbation_interval`` = epochs / 6, at least 2;
           ``hyperparam_mutations`` over lr, momentum, weight decay, kept inside the space by
           ``custom_explore_fn``), 8 trials starting from the same 8 specs as ``random``; a
           function trainable saves model + optimiser state every perturbation interval and
           restores from it; ``CheckpointConfig(num_to_keep=None)``; ``reuse_actors=True`` (without
           it every pause / resume of the time-multiplexed population starts a new worker
           process: 300 s of overhead for 80 trivial epochs here). Each trial stops after
           ``epochs`` reports of its own (a ``Stopper`` counting reports per trial: after an
           exploit ``training_iteration`` restarts from the donor's, so a limit on it would not
           bound the compute), so the budget is exactly members x epochs. ``ray.init(num_cpus=2)``:
           two trials train at once (1 torch thread each) while the other methods use one core,
           which favours pbt's wall time up to 2x (see ``work_s``). Consumed member-epochs count the
           results in the order the driver receives them (a ``tune.Callback``'s
           ``on_trial_result``: one shared counter in the driver process). ``ray.init`` runs once
           per process; its seconds are added to every pbt run's wall and start-up time, as every
           user of a fresh PBT job pays them.
  swarm    ``run_swarm``: ``adaptive_kit.swarm.Swarm`` from the same 8 first specs as ``random``
           (default ``OptimiserConfig``: fitness-proportional steps at temperature 0.25, truncation
           exploit / explore and breeding every 2 rounds), rounds of 17 steps per member on
           average (about 4 member-epochs a round) until the next round would pass the budget;
           one point per member per round, consumed rounded up to whole member-epochs.
  pure     the 8 random specs trained for the whole budget in the plain loop without evaluation:
           the floor for the overhead of any method (``x_pure`` = wall / pure's wall).

Soak (``swarm_soak.py``): 64 members x 50 reports/s (3,200 events/s) from 4 processes into one
collector for 120 s (quick: 10 s), batched Arrow over PUSH/PULL, against one message per event over
PUSH/PULL and over PUB/SUB (30 s; quick: 5 s): sent, received, sequence gaps, latency percentiles.

Targets (``TARGET``) were calibrated on the full budget so that random search reaches them in
most but not all seeds (see the comment there).

Run from the repository root::

    .venv/bin/python benchmarks/swarm.py                  # full run, about 30 min on 2 CPU cores
    .venv/bin/python benchmarks/swarm.py --quick          # under 3 min (pbt on the first seed only)
    .venv/bin/python benchmarks/swarm.py --json out.json  # also write the tables, curves and machine
    .venv/bin/python benchmarks/swarm.py --quick --overhead-only --device cuda --members 64

Overhead on equal work (``run_overhead``, first): the swarm against a plain loop over the same
members (a module and ``torch.optim.SGD`` each, ``steps`` steps per member per round, batches
drawn on the device) for three populations of ``--members`` members (``overhead_populations``:
identical, all different, a mix), equal steps and no evolution; the swarm's seconds are its
rounds less the evaluation (``Swarm.phase_s``), so they include its reports and watch. After one
warm-up round each; repeats interleaved, medians. It runs on ``--device`` (default cpu); the
population search always runs on the CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import swarm_soak
import torch
import torch.nn.functional as F
from machine import describe, parse_args, show, write_json
from torch import nn
from tqdm.auto import tqdm

from adaptive_kit import datasets, pick_device
from adaptive_kit.swarm import (
    RANDOM_SEARCH,
    Layer,
    MemberSpec,
    SearchSpace,
    Swarm,
    SwarmConfig,
    build_model,
)

# Targets (val acc; the validation set has 270 rows, so steps of 1/270 = 0.0037), calibrated with
# random search on the full budget (8 x 30) and the full seeds so that it reaches them in most but
# not all seeds. digits: random's best val acc over seeds 0-9 was .985 .974 .978 .963 .989 .959
# .978 .967 .974 .974, so 0.97 is reached 7/10 (after 52-209 member-epochs, median ~111), 0.975
# only 4/10, 0.96 9/10. noisy: random's best over seeds 0-4 was .941 .959 .959 .930 .948, so 0.94
# is reached 4/5 (after 41-63, median 62); 0.93 also 4/5 but already after 14-41; 0.95 2/5.
TARGET = {"digits": 0.97, "noisy": 0.94}
VAL_FRACTION = 0.2
NOISE = 0.3  # share of the noisy problem's training labels replaced by uniform random labels
METHODS = ("random", "optuna", "pbt", "swarm")
ANCHORS = ("optuna", "pbt")  # x_best_anchor divides by the better of these (lower median to target)


@dataclass(frozen=True)
class Budget:
    members: int = 8  # members (trials) of the population
    epochs: int = 30  # epochs per member

    @property
    def total(self) -> int:
        """Member-epochs the method may consume."""
        return self.members * self.epochs


@dataclass(frozen=True)
class Plan:
    seeds: tuple[int, ...]
    budget: Budget
    pbt_seeds: int | None = None  # pbt on the first this many seeds only (None: all)


# full: pbt (about 50 s a run here, mostly Ray's start-up) on the first 5 digits seeds; noisy (conv members,
# about 30 s a method) on 3 seeds: the whole run then fits in about 25 minutes on 2 cores
FULL = {"digits": Plan((0, 1, 2, 3, 4, 5, 6, 7, 8, 9), Budget(8, 30), pbt_seeds=5),
        "noisy": Plan((0, 1, 2), Budget(8, 30))}
# quick: every Ray Tune fit costs 15-30 s of actor start-up and pause / resume on this 2-core VM
# (plus one ray.init of 12-30 s), so pbt runs on each problem's first seed only
QUICK = {"digits": Plan((0, 1), Budget(8, 8), pbt_seeds=1), "noisy": Plan((0,), Budget(8, 4), pbt_seeds=1)}


# ================================================================================ problems
@dataclass(frozen=True)
class Problem:
    """One problem at one seed: the same train / val / test tensors for every method."""

    name: str
    seed: int
    x_train: torch.Tensor
    y_train: torch.Tensor  # noisy: with the replaced labels
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    space: SearchSpace
    image_shape: tuple[int, int, int] | None
    target: float

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_val, self.y_test]).max()) + 1

    def build(self, spec: MemberSpec) -> nn.Sequential:
        """``build_model`` for this problem's inputs, classes and image shape."""
        return build_model(spec, self.n_features, self.n_classes, self.image_shape)

    def accuracy(self, model: nn.Module) -> tuple[float, float]:
        """(val acc, test acc) of ``model``."""
        return accuracy(model, self.x_val, self.y_val), accuracy(model, self.x_test, self.y_test)


def make_problem(name: str, seed: int) -> Problem:
    """``digits`` or ``noisy`` at ``seed`` (the validation carve and the label noise use it)."""
    split = datasets.digits(seed=0)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(split.y_train), generator=g)
    n_val = round(len(perm) * VAL_FRACTION)
    val, train = perm[:n_val], perm[n_val:]
    x_train, y_train = split.x_train[train], split.y_train[train].clone()
    space, image_shape = SearchSpace(), None
    if name == "noisy":
        flip = torch.rand(len(y_train), generator=g) < NOISE
        y_train[flip] = torch.randint(split.n_classes, (int(flip.sum()),), generator=g)
        space, image_shape = SearchSpace(kinds=("conv", "linear")), (1, 8, 8)
    elif name != "digits":
        raise ValueError(f"make_problem(name={name!r}): expected 'digits' or 'noisy'")
    return Problem(name, seed, x_train, y_train, split.x_train[val], split.y_train[val], split.x_test,
                   split.y_test, space, image_shape, TARGET[name])


def random_specs(problem: Problem, members: int) -> list[MemberSpec]:
    """The ``members`` specs of ``random`` (and pbt's and pure's start), seeded by the run seed."""
    rng = np.random.default_rng(problem.seed)
    return [problem.space.sample(rng) for _ in range(members)]


# ================================================================================ the plain torch loop
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def sgd(model: nn.Module, spec: MemberSpec) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                batch_size: int, gen: torch.Generator) -> None:
    """One epoch: ceil(n / batch_size) SGD steps on batches drawn with replacement."""
    n = len(y)
    for _ in range(math.ceil(n / batch_size)):
        idx = torch.randint(n, (batch_size,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


class Member:
    """A model, its optimiser and its batch generator, all seeded by ``seed``."""

    def __init__(self, problem: Problem, spec: MemberSpec, seed: int):
        torch.manual_seed(seed)
        self.problem, self.spec = problem, spec
        self.model = problem.build(spec)
        self.opt = sgd(self.model, spec)
        self.gen = torch.Generator().manual_seed(seed)

    def train_epoch(self) -> None:
        train_epoch(self.model, self.opt, self.problem.x_train, self.problem.y_train, self.spec.batch_size, self.gen)

    def evaluate(self) -> tuple[float, float]:
        return self.problem.accuracy(self.model)


# ================================================================================ curves
@dataclass
class Curve:
    """What one method did on one problem at one seed.

    A point per evaluation on validation, in the order they happened: ``consumed[i]`` is the
    member-epochs the whole method had consumed when the model scored ``val_acc[i]`` (and
    ``test_acc[i]``: the same model on the test set).
    """

    method: str
    problem: str
    seed: int
    budget: int  # member-epochs allowed
    consumed: list[int] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    wall_s: float = math.nan  # the whole run
    startup_s: float = math.nan  # until the first SGD step
    work_s: float = math.nan  # summed time inside the training and evaluation loops
    note: str = ""
    extra: dict = field(default_factory=dict)

    def add(self, consumed: int, val_acc: float, test_acc: float) -> None:
        self.consumed.append(int(consumed))
        self.val_acc.append(float(val_acc))
        self.test_acc.append(float(test_acc))


class Clock:
    """Wall time since construction; ``step()`` marks the first SGD step (start-up) once."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.startup: float | None = None

    def step(self) -> None:
        if self.startup is None:
            self.startup = time.perf_counter() - self.t0

    def stop(self, curve: Curve) -> Curve:
        curve.wall_s = time.perf_counter() - self.t0
        curve.startup_s = math.nan if self.startup is None else self.startup
        return curve


def curve_metrics(curve: Curve, target: float, budget: int) -> dict:
    """Epochs to target (inf: never), AUC of best-so-far val acc over the budget, test acc at the
    best val acc, and the curve's times."""
    c, v, t = np.asarray(curve.consumed, int), np.asarray(curve.val_acc), np.asarray(curve.test_acc)
    hit = np.flatnonzero(v >= target - 1e-12)
    best_at = np.zeros(budget)
    for ci, vi in zip(c, v):
        if 1 <= ci <= budget:
            best_at[ci - 1] = max(best_at[ci - 1], vi)
    auc = float(np.maximum.accumulate(best_at).mean()) if budget else math.nan
    i = int(np.argmax(v)) if len(v) else -1
    return {"problem": curve.problem, "method": curve.method, "seed": curve.seed,
            "to_target": float(c[hit[0]]) if len(hit) else math.inf, "auc": auc,
            "best_val": float(v[i]) if i >= 0 else math.nan, "test_acc": float(t[i]) if i >= 0 else math.nan,
            "consumed": int(c.max()) if len(c) else 0, "points": len(c), "wall_s": curve.wall_s,
            "startup_s": curve.startup_s, "work_s": curve.work_s}


def fmt_epochs(e: float, budget: int) -> str:
    return f">{budget}" if not math.isfinite(e) else f"{e:.0f}"


def ratio(a: float, b: float) -> float:
    """a / b of two medians to target: NaN when b is censored (inf) or missing, inf when only a is."""
    if not math.isfinite(b) or not b:
        return math.nan
    return a / b


def summarise(curves: list[Curve], target: float, budget: int, pure_s: dict[int, float] | None = None,
              notes: dict[str, str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-curve metrics and the per-method table of one problem.

    ``to_target`` is the median member-epochs to the target (inf counts as +inf; ``>budget``
    when the median is censored), ``reached`` how many runs got there; ``x_random`` /
    ``x_best_anchor`` divide it by random's / the better anchor's median (below 1: faster); auc,
    test_acc, wall_s, startup_s, work_s are medians over seeds; ``x_pure`` the median of wall /
    pure wall per seed (``pure_s``: seed -> seconds). ``notes`` adds rows for skipped methods.
    """
    per = pd.DataFrame([curve_metrics(c, target, budget) for c in curves])
    notes = dict(notes or {})
    med: dict[str, float] = {}
    rows = []
    for m in METHODS:
        g = per[per.method == m] if len(per) else per
        if not len(g):
            continue
        med[m] = float(np.median(g.to_target))
    anchors = [med[a] for a in ANCHORS if a in med]
    best_anchor = min(anchors) if anchors else math.nan
    pure_by_seed = dict(pure_s or {})
    for m in METHODS:
        if m not in med:
            if m in notes:
                rows.append({"method": m, "runs": 0, "note": notes[m]})
            continue
        g = per[per.method == m]
        x_pure = [w / pure_by_seed[s] for s, w in zip(g.seed, g.wall_s) if s in pure_by_seed]
        rows.append({"method": m, "runs": len(g), "to_target": fmt_epochs(med[m], budget),
                     "reached": f"{int(np.isfinite(g.to_target).sum())}/{len(g)}",
                     "x_random": ratio(med[m], med.get("random", math.nan)),
                     "x_best_anchor": ratio(med[m], best_anchor), "auc": float(g.auc.median()),
                     "test_acc": float(g.test_acc.median()), "wall_s": float(g.wall_s.median()),
                     "startup_s": float(g.startup_s.median()), "work_s": float(g.work_s.median()),
                     "x_pure": float(np.median(x_pure)) if x_pure else math.nan, "note": notes.get(m, "")})
    if pure_by_seed:
        pure_med = float(np.median(list(pure_by_seed.values())))
        rows.append({"method": "pure", "runs": len(pure_by_seed), "wall_s": pure_med, "work_s": pure_med, "x_pure": 1.0,
                     "note": "the random specs, whole budget, no evaluation"})
    return per, pd.DataFrame(rows)


# ================================================================================ methods
def run_random(problem: Problem, seed: int, budget: Budget) -> Curve:
    """8 random specs trained in lockstep: one epoch each, round robin, evaluated after each."""
    clock = Clock()
    curve = Curve("random", problem.name, seed, budget.total)
    members = [Member(problem, s, seed * 1000 + i) for i, s in enumerate(random_specs(problem, budget.members))]
    clock.step()
    consumed, work = 0, 0.0
    for _ in range(budget.epochs):
        for m in members:
            t0 = time.perf_counter()
            m.train_epoch()
            val, test = m.evaluate()
            work += time.perf_counter() - t0
            consumed += 1
            curve.add(consumed, val, test)
    curve.work_s = work
    return clock.stop(curve)


def run_pure(problem: Problem, seed: int, budget: Budget) -> float:
    """Wall seconds of the random specs' training for the whole budget, no evaluation."""
    t0 = time.perf_counter()
    members = [Member(problem, s, seed * 1000 + i) for i, s in enumerate(random_specs(problem, budget.members))]
    for _ in range(budget.epochs):
        for m in members:
            m.train_epoch()
    return time.perf_counter() - t0


def optuna_spec(trial, space: SearchSpace) -> MemberSpec:
    """A spec from an Optuna trial, mirroring ``SearchSpace.sample``."""
    depth = trial.suggest_int("depth", space.depth[0], space.depth[1])
    layers = [Layer(trial.suggest_categorical(f"kind{i}", list(space.kinds)),
                    trial.suggest_categorical(f"width{i}", list(space.widths)),
                    trial.suggest_categorical(f"act{i}", list(space.activations))) for i in range(depth)]
    layers.sort(key=lambda layer: layer.kind != "conv")  # conv layers first, as SearchSpace orders them
    return MemberSpec(tuple(layers), lr=trial.suggest_float("lr", *space.lr, log=True),
                      momentum=trial.suggest_float("momentum", *space.momentum),
                      weight_decay=trial.suggest_float("weight_decay", *space.weight_decay, log=True),
                      batch_size=trial.suggest_categorical("batch_size", list(space.batch_size)))


def run_optuna(problem: Problem, seed: int, budget: Budget) -> Curve:
    """TPE + Hyperband, trials one after another until the member-epoch budget is spent."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    clock = Clock()
    curve = Curve("optuna", problem.name, seed, budget.total)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                    pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource=budget.epochs))
        consumed, work, trials, pruned = 0, 0.0, 0, 0
        while consumed < budget.total:
            trial = study.ask()
            member = Member(problem, optuna_spec(trial, problem.space), seed * 1000 + trial.number)
            trials += 1
            clock.step()
            val, state = math.nan, optuna.trial.TrialState.COMPLETE
            for epoch in range(1, budget.epochs + 1):
                t0 = time.perf_counter()
                member.train_epoch()
                val, test = member.evaluate()
                work += time.perf_counter() - t0
                consumed += 1
                curve.add(consumed, val, test)
                trial.report(val, epoch)
                if consumed >= budget.total:
                    break
                if trial.should_prune():
                    state = optuna.trial.TrialState.PRUNED
                    pruned += 1
                    break
            study.tell(trial, val if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    curve.work_s = work
    curve.extra = {"trials": trials, "pruned": pruned}
    curve.note = f"{trials} trials, {pruned} pruned"
    return clock.stop(curve)


# -------------------------------------------------------------------------------- pbt (Ray Tune)
RAY: dict = {}  # the process's Ray session: "init_s", "import_s" once ray.init has run, or "error"


def ray_start() -> dict:
    """``ray.init`` once per process, quiet; records its seconds (or why Ray cannot run)."""
    if RAY:
        return RAY
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no CSV / JSON / TensorBoard files
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports (and no network here)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1000")
    # workers import this file's helpers by value (cloudpickle) but adaptive_kit by name
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    try:
        import ray
        from ray import tune  # noqa: F401
    except Exception as e:  # any import failure means the anchor cannot run here
        RAY["error"] = f"ray unavailable: {type(e).__name__}: {e}"
        return RAY
    t1 = time.perf_counter()
    try:
        with quiet():
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                     configure_logging=True)
    except Exception as e:
        RAY["error"] = f"ray.init failed: {type(e).__name__}: {e}"
        return RAY
    RAY.update(import_s=t1 - t0, init_s=time.perf_counter() - t1)
    for name in ("ray", "ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return RAY


def ray_stop() -> None:
    if RAY and "error" not in RAY:
        import ray

        with quiet():
            ray.shutdown()


@contextlib.contextmanager
def quiet():
    """Swallow stdout / stderr (Ray's banners and progress) and warnings."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def clip_to_space(space: SearchSpace) -> Callable[[dict], dict]:
    """PBT's ``custom_explore_fn``: its x0.8 / x1.2 perturbations can leave the space (momentum >= 1)."""
    def explore(config: dict) -> dict:
        config["lr"] = float(np.clip(config["lr"], *space.lr))
        config["momentum"] = float(np.clip(config["momentum"], *space.momentum))
        config["weight_decay"] = float(np.clip(config["weight_decay"], *space.weight_decay))
        return config
    return explore


def pbt_trainable(config: dict, problem: Problem, specs: list[MemberSpec], seed: int, interval: int) -> None:
    """Ray Tune function trainable: one member; restores model + optimiser from a checkpoint (after
    a pause or a PBT exploit, whose donor's ``member`` key brings its architecture along)."""
    from ray import tune

    torch.set_num_threads(1)
    i = config["member"]
    spec = specs[i].replace(lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"])
    torch.manual_seed(seed * 1000 + i)
    model = problem.build(spec)
    opt = sgd(model, spec)
    epoch, restored = 0, 0
    ckpt = tune.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        epoch, restored = state["epoch"], 1
        for group in opt.param_groups:  # PBT's explore: the new hyper-parameters from here on
            group.update(lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + i * 10_007 + epoch)
    first_step = time.time()
    while True:
        t0 = time.perf_counter()
        train_epoch(model, opt, problem.x_train, problem.y_train, spec.batch_size, gen)
        val, test = problem.accuracy(model)
        epoch += 1
        metrics = {"val_acc": val, "test_acc": test, "epoch": epoch, "work_s": time.perf_counter() - t0,
                   "first_step": first_step, "restored": restored, "arch": spec.arch,
                   "hparams": (spec.lr, spec.momentum, spec.weight_decay)}
        first_step = math.nan
        if epoch % interval == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch},
                           os.path.join(d, "state.pt"))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(metrics)


def run_pbt(problem: Problem, seed: int, budget: Budget) -> Curve:
    """Ray Tune PBT over the 8 random specs; the curve in the driver's result order."""
    state = ray_start()
    if "error" in state:
        raise RuntimeError(state["error"])
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    curve = Curve("pbt", problem.name, seed, budget.total)
    specs = random_specs(problem, budget.members)
    interval = max(2, round(budget.epochs / 6))
    seen: dict[str, int] = {}
    last: dict[str, tuple] = {}
    log = {"first_step": math.inf, "first_result": math.nan, "work_s": 0.0, "starts": 0, "restored": 0,
           "perturbed": 0, "arch_changed": 0}
    t_fit = time.perf_counter()
    t_fit_wall = time.time()

    class Record(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if not curve.consumed:
                log["first_result"] = time.perf_counter() - t_fit
            curve.add(len(curve.consumed) + 1, result["val_acc"], result["test_acc"])
            if math.isfinite(result["first_step"]):
                log["first_step"] = min(log["first_step"], result["first_step"] - t_fit_wall)
            log["work_s"] += result["work_s"]
            now = (result["arch"], tuple(result["hparams"]))
            before = last.get(trial.trial_id)
            if before is not None and now != before:  # an exploit / explore changed this trial
                log["perturbed"] += 1
                log["arch_changed"] += now[0] != before[0]
            last[trial.trial_id] = now
            if math.isfinite(result["first_step"]):  # the first report of a (re)started trial
                log["starts"] += 1
                log["restored"] += result["restored"]

    class PerTrialEpochs(tune.Stopper):
        """Stop a trial after ``budget.epochs`` reports of its own (its compute, exploits or not)."""

        def __call__(self, trial_id, result):
            seen[trial_id] = seen.get(trial_id, 0) + 1
            return seen[trial_id] >= budget.epochs

        def stop_all(self):
            return False

    random.seed(seed)  # PBT draws its exploits and explorations from Python's and numpy's generators
    np.random.seed(seed)
    space = problem.space
    pbt = PopulationBasedTraining(
        time_attr="training_iteration", perturbation_interval=interval,
        hyperparam_mutations={"lr": tune.loguniform(*space.lr), "momentum": tune.uniform(*space.momentum),
                              "weight_decay": tune.loguniform(*space.weight_decay)},
        custom_explore_fn=clip_to_space(space))
    param_space = {"member": tune.grid_search(list(range(len(specs)))),
                   "lr": tune.sample_from(lambda s: specs[s.config.member].lr),
                   "momentum": tune.sample_from(lambda s: specs[s.config.member].momentum),
                   "weight_decay": tune.sample_from(lambda s: specs[s.config.member].weight_decay)}
    storage = tempfile.mkdtemp(prefix="swarm-bench-ray-")
    try:
        tuner = tune.Tuner(
            tune.with_parameters(pbt_trainable, problem=problem, specs=specs, seed=seed, interval=interval),
            param_space=param_space,
            tune_config=tune.TuneConfig(metric="val_acc", mode="max", scheduler=pbt, num_samples=1, reuse_actors=True),
            run_config=tune.RunConfig(name=f"pbt-{problem.name}-{seed}", storage_path=storage, stop=PerTrialEpochs(),
                                      verbose=0, callbacks=[Record()],
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=None)))
        with quiet():
            grid = tuner.fit()
        errors = [str(r.error) for r in grid if r.error]
        if errors:
            raise RuntimeError(f"{len(errors)} pbt trial(s) failed: {errors[0][:300]}")
        curve.wall_s = time.perf_counter() - t_fit + state["init_s"]
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    curve.startup_s = state["init_s"] + log["first_step"]
    curve.work_s = log["work_s"]
    curve.extra = {"ray_init_s": state["init_s"], "ray_import_s": state["import_s"],
                   "fit_to_first_step_s": log["first_step"], "fit_to_first_result_s": log["first_result"],
                   "interval": interval, "results": len(curve.consumed),
                   "trial_starts": log["starts"], "restored_starts": log["restored"],
                   "perturbations": log["perturbed"], "perturbations_new_arch": log["arch_changed"]}
    curve.note = (f"ray.init {state['init_s']:.1f} s + first step {log['first_step']:.1f} s after fit; "
                  f"perturbation_interval {interval}; {log['perturbed']} perturbations")
    return curve


SWARM_STEPS = 17  # mean steps per member per round: a round of 8 members is ~4 member-epochs of digits


def run_swarm(problem: Problem, seed: int, budget: Budget) -> Curve:
    """adaptive_kit.swarm from the same first specs as ``random``, in rounds until the budget is spent.

    A point per member per round (member-epochs consumed by the whole swarm after the round);
    the test accuracy of every member is taken after each round for the table only, and its
    time is left out of ``wall_s`` and ``work_s``.
    """
    clock = Clock()
    curve = Curve("swarm", problem.name, seed, budget.total)
    cfg = SwarmConfig(members=budget.members, steps_per_round=SWARM_STEPS, seed=seed, space=problem.space,
                      image_shape=problem.image_shape)
    data = datasets.Split(problem.x_train, problem.y_train, problem.x_test, problem.y_test)
    swarm = Swarm(data, cfg, specs=random_specs(problem, budget.members), val=(problem.x_val, problem.y_val),
                  device="cpu")
    n_train = len(problem.y_train)
    clock.step()
    consumed, test_s, work, rounds = 0.0, 0.0, 0.0, 0
    while True:
        t0 = time.perf_counter()
        swarm.step()
        work += time.perf_counter() - t0
        rows = swarm.history().query(f"round == {rounds}")
        consumed += float((rows["steps"] * rows["batch_size"]).sum()) / n_train
        t0 = time.perf_counter()
        for m in swarm.members:
            if m.active:
                curve.add(math.ceil(consumed - 1e-9), m.val_acc, swarm.accuracy(m.id, problem.x_test, problem.y_test))
        test_s += time.perf_counter() - t0
        rounds += 1
        if consumed + consumed / rounds > budget.total + 1e-9:  # the next round would overspend
            break
    swarm.close()
    clock.stop(curve)
    curve.wall_s -= test_s
    curve.work_s = work
    lin = swarm.lineage_frame()
    curve.note = (f"{rounds} rounds of {SWARM_STEPS} steps per member on average; "
                  f"{(lin['kind'] == 'exploit').sum()} exploits, {(lin['kind'] == 'breed').sum()} breeds")
    return curve


RUNNERS: dict[str, Callable[[Problem, int, Budget], Curve]] = {
    "random": run_random, "optuna": run_optuna, "pbt": run_pbt, "swarm": run_swarm}


# ================================================================================ overhead on equal work
OVERHEAD_TARGET = 1.15  # swarm seconds / plain-loop seconds for the same member-steps
OVERHEAD = {"quick": {"rounds": 3, "steps": 40, "repeats": 3}, "full": {"rounds": 6, "steps": 40, "repeats": 7}}


def distinct_archs(n: int, seed: int = 0) -> list[tuple[Layer, ...]]:
    """``n`` different architectures for the digits inputs, drawn without repeats (seeded) from
    MLPs of 1-2 layers (widths 16-128, relu / tanh / gelu) and small conv nets."""
    pool: list[tuple[Layer, ...]] = []
    for depth in (1, 2):
        for widths in itertools.product((16, 32, 64, 128), repeat=depth):
            pool += [tuple(Layer("linear", w, a) for w in widths) for a in ("relu", "tanh", "gelu")]
    for c in (2, 4, 8):
        pool += [(Layer("conv", c, a),) + tail for a in ("relu", "tanh") for tail in ((), (Layer("linear", 32),))]
    if n > len(pool):
        raise ValueError(f"distinct_archs(n={n}): at most {len(pool)} architectures")
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[i] for i in order[:n]]


def overhead_populations(n: int) -> dict[str, list[MemberSpec]]:
    """Three populations of ``n`` members with their own hyper-parameters: ``identical`` (one
    architecture), ``different`` (``n`` architectures) and ``mix`` (5/8 of one architecture, 1/4
    of a second, the rest different)."""
    def hp(i: int) -> dict:
        return {"lr": 0.01 * (1 + i % 10), "momentum": 0.9 * (i % 3) / 2, "weight_decay": 1e-4 * (i % 4)}

    one, two = (Layer("linear", 64),), (Layer("linear", 32), Layer("linear", 16))
    archs = [a for a in distinct_archs(n + 2) if a not in (one, two)][:n]
    n_one, n_two = n * 5 // 8, n // 4
    mix = [one] * n_one + [two] * n_two + archs[:n - n_one - n_two]
    return {name: [MemberSpec(a, **hp(i)) for i, a in enumerate(layers)]
            for name, layers in (("identical", [one] * n), ("different", archs), ("mix", mix))}


def plain_loop_s(problem: Problem, specs: list[MemberSpec], rounds: int, steps: int, device: torch.device) -> float:
    """Seconds of the same member-steps in a plain loop: per member a module and torch.optim.SGD,
    ``steps`` steps each per round, batches drawn on the device; after one warm-up round."""
    x, y = problem.x_train.to(device), problem.y_train.to(device)
    members = []
    for i, spec in enumerate(specs):
        torch.manual_seed(i)
        net = problem.build(spec).to(device)
        members.append((net, sgd(net, spec), torch.Generator(device=device).manual_seed(i), spec.batch_size))

    def one_round() -> None:
        for net, opt, gen, bs in members:
            for _ in range(steps):
                idx = torch.randint(len(y), (bs,), generator=gen, device=device)
                loss = F.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    one_round()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(rounds):
        one_round()
    _sync(device)
    return time.perf_counter() - t0


def swarm_loop_s(problem: Problem, specs: list[MemberSpec], rounds: int, steps: int,
                 device: torch.device) -> dict:
    """The swarm on the same members (equal steps, no evolution): seconds of its rounds without
    the evaluation, of its training alone, and its vmap groups; after one warm-up round."""
    cfg = SwarmConfig(members=len(specs), steps_per_round=steps, seed=0, optimiser=RANDOM_SEARCH,
                      image_shape=problem.image_shape)
    data = datasets.Split(problem.x_train, problem.y_train, problem.x_test, problem.y_test)
    with Swarm(data, cfg, specs=specs, val=(problem.x_val, problem.y_val), device=device) as swarm:
        swarm.step()
        before = dict(swarm.phase_s)
        for _ in range(rounds):
            swarm.step()
        spent = {k: v - before[k] for k, v in swarm.phase_s.items()}
        groups = swarm.groups(swarm.members)
        steps_taken = sum(m.steps for m in swarm.members)
    return {"swarm_s": spent["round"] - spent["evaluate"], "train_s": spent["train"], "eval_s": spent["evaluate"],
            "vmap_groups": sum(len(g) > 1 for g in groups), "plain_members": sum(len(g) == 1 for g in groups),
            "member_steps": steps_taken * rounds // (rounds + 1)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_overhead(device: torch.device, members: int, quick: bool) -> pd.DataFrame:
    """Swarm against a plain torch.optim.SGD loop over the same members and steps, per population;
    repeats interleaved (the order alternates), medians reported."""
    size = OVERHEAD["quick" if quick else "full"]
    problem = dataclasses.replace(make_problem("digits", 0), image_shape=(1, 8, 8))  # conv members too
    rows = []
    for name, specs in overhead_populations(members).items():
        reps = []
        for r in range(size["repeats"]):
            if r % 2:
                sw = swarm_loop_s(problem, specs, size["rounds"], size["steps"], device)
                plain = plain_loop_s(problem, specs, size["rounds"], size["steps"], device)
            else:
                plain = plain_loop_s(problem, specs, size["rounds"], size["steps"], device)
                sw = swarm_loop_s(problem, specs, size["rounds"], size["steps"], device)
            reps.append({**sw, "plain_s": plain, "x_plain": sw["swarm_s"] / plain, "x_plain_train": sw["train_s"] / plain})
        med = pd.DataFrame(reps).median(numeric_only=True)
        rows.append({"population": name, "device": str(device), "members": members,
                     "archs": len({s.layers for s in specs}), "vmap_groups": int(med["vmap_groups"]),
                     "plain_members": int(med["plain_members"]), "member_steps": int(med["member_steps"]),
                     "plain_s": med["plain_s"], "swarm_s": med["swarm_s"], "train_s": med["train_s"],
                     "eval_s": med["eval_s"], "x_plain": med["x_plain"], "x_plain_train": med["x_plain_train"],
                     "x_plain_max": max(r["x_plain"] for r in reps), "repeats": len(reps),
                     "met": bool(med["x_plain"] <= OVERHEAD_TARGET)})
    return pd.DataFrame(rows)


def show_overhead(table: pd.DataFrame) -> None:
    show(f"overhead on equal work: swarm vs a plain torch.optim.SGD loop over the same members and steps "
         f"(target x_plain <= {OVERHEAD_TARGET})", table, 3,
         note="swarm_s: its rounds less the evaluation (training, reports on the bus, watch); train_s: training "
              "alone; plain_s: the plain loop; x_plain = swarm_s / plain_s, x_plain_train = train_s / plain_s "
              "(medians of interleaved repeats; x_plain_max: the worst repeat)")


# ================================================================================ main
def warm_up() -> None:
    """One small forward / backward / SGD step, so that torch's one-off first-call costs are
    nobody's start-up."""
    problem = make_problem("noisy", 0)
    for spec in (MemberSpec(), MemberSpec((Layer("conv", 8), Layer("linear", 16)))):
        m = Member(problem, spec, 0)
        m.train_epoch()
        m.evaluate()


def run_problem(name: str, plan: Plan, bar) -> dict:
    curves: list[Curve] = []
    notes: dict[str, str] = {}
    pure: dict[int, float] = {}
    for k, seed in enumerate(plan.seeds):
        problem = make_problem(name, seed)
        for method in METHODS:
            bar.set_postfix_str(f"{name} seed {seed} {method}")
            skip = method in notes and notes[method].startswith(("swarm:", "ray"))
            if method == "pbt" and plan.pbt_seeds is not None and k >= plan.pbt_seeds:
                skip = True
            if not skip:
                try:
                    curves.append(RUNNERS[method](problem, seed, plan.budget))
                except NotImplementedError as e:
                    notes[method] = str(e)
                except RuntimeError as e:
                    if method != "pbt":
                        raise
                    notes[method] = str(e)
            bar.update()
        bar.set_postfix_str(f"{name} seed {seed} pure")
        pure[seed] = run_pure(problem, seed, plan.budget)
        bar.update()
    for c in curves:  # a method's typical note (optuna's trial counts, pbt's start-up) unless it was skipped
        notes.setdefault(c.method, c.note)
    if plan.pbt_seeds is not None and plan.pbt_seeds < len(plan.seeds) and "pbt" in notes:
        notes["pbt"] = f"first {plan.pbt_seeds} seed(s) only; " + notes["pbt"]
    per, table = summarise(curves, TARGET[name], plan.budget.total, pure, notes)
    return {"curves": curves, "per_seed": per, "table": table, "pure_s": pure, "plan": plan}


def own_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """This benchmark's own options; the rest go to ``machine.parse_args``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--device", default="cpu", help="device of the overhead section (default cpu)")
    parser.add_argument("--members", type=int, default=8, help="members of each overhead population (default 8)")
    parser.add_argument("--overhead-only", action="store_true", help="run the overhead section alone")
    own, rest = parser.parse_known_args(argv)
    if own.members < 4:
        parser.error(f"--members must be >= 4, got {own.members}")
    return own, rest


def main(argv: list[str] | None = None) -> dict:
    own, rest = own_args(sys.argv[1:] if argv is None else argv)
    args = parse_args(__doc__.splitlines()[0], "2 + 1 seeds and 8 x 8 / 8 x 4 member-epochs (under 3 minutes)", rest)
    device = pick_device(own.device)
    plan = QUICK if args.quick else FULL
    info = describe(device)  # the population search runs on the CPU (small models); the overhead section on device
    print(f"device={device} cpu={info['cpu']!r} cores={info['cpu_count']} threads={info['torch_threads']} "
          f"torch={info['torch']} mode={'quick' if args.quick else 'full'} "
          f"load average at start={os.getloadavg()[0]:.2f}")
    t_start = time.perf_counter()
    out: dict = {"machine": info, "mode": "quick" if args.quick else "full", "targets": TARGET, "problems": {}}
    overhead = run_overhead(device, own.members, args.quick)
    show_overhead(overhead)
    out["overhead"] = overhead.to_dict(orient="records")
    if own.overhead_only:
        out["runtime_s"] = round(time.perf_counter() - t_start, 1)
        print(f"total {out['runtime_s']:.0f} s; load average at end={os.getloadavg()[0]:.2f}")
        write_json(args.json, out)
        return out
    warm_up()
    jobs = sum(len(p.seeds) * (len(METHODS) + 1) for p in plan.values())
    results = {}
    with tqdm(total=jobs, desc="swarm benchmark", file=sys.stderr) as bar:
        try:
            for name, p in plan.items():
                results[name] = run_problem(name, p, bar)
        finally:
            ray_stop()
    for name, r in results.items():
        b, seeds = r["plan"].budget, r["plan"].seeds
        show(f"{name}: target val acc {TARGET[name]}, budget {b.members} x {b.epochs} = {b.total} member-epochs, "
             f"seeds {list(seeds)}", r["table"], 3,
             note="to_target: median member-epochs until val acc >= target (>budget: median censored), reached: "
                  "runs that got there; x_random / x_best_anchor: to_target over random's / the better of optuna "
                  "and pbt (below 1: faster); auc: mean best-so-far val acc over the budget; test_acc: at the best "
                  "val acc; wall_s, startup_s (to the first SGD step), work_s (inside train + eval loops): medians; "
                  "x_pure: wall / pure's wall")
        out["problems"][name] = {"budget": asdict(b), "seeds": list(seeds), "pbt_seeds": r["plan"].pbt_seeds,
                                 "target": TARGET[name],
                                 "table": r["table"].to_dict(orient="records"),
                                 "per_seed": r["per_seed"].to_dict(orient="records"), "pure_s": r["pure_s"],
                                 "curves": [asdict(c) for c in r["curves"]]}
    soak = swarm_soak.run(args.quick)
    show("soak: 64 members x 50 reports/s from 4 processes into one collector", soak.reset_index(), 1,
         note="lost = sent - received; gaps: skipped sequence numbers; latency: report time to receipt")
    out["soak"] = soak.reset_index().to_dict(orient="records")
    if RAY:
        out["ray"] = dict(RAY)
        if "error" not in RAY:
            print(f"ray: import {RAY['import_s']:.1f} s, ray.init {RAY['init_s']:.1f} s (once, charged to every pbt run)")
    total = time.perf_counter() - t_start
    out["runtime_s"] = round(total, 1)
    print(f"total {total:.0f} s; load average at end={os.getloadavg()[0]:.2f}")
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
