"""The swarm: N members trained in rounds on one device (members of one architecture batched:
steps.py), reported on the bus (reports.py), watched, and steered by the optimiser (evolution.py)."""
from __future__ import annotations

import math
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from ..datasets import Split
from ..devices import pick_device
from ..records import Sink
from .bus import Collector
from .evolution import Evolution
from .optimiser import Goals, OptimiserConfig, allocate, fitness
from .reports import Reports
from .spec import MemberSpec, SearchSpace, Similarity, build_model
from .steps import MemberSteps, batched_logits
from .watch import Watch, WatchConfig

FAULTS = ("nan", "crash")


@dataclass(frozen=True)
class SwarmConfig:
    members: int = 8  # population size N
    steps_per_round: int = 20  # mean optimiser steps per active member per round
    seed: int = 0  # seeds the initial population, every member's batches and every decision
    space: SearchSpace = SearchSpace()  # where members are drawn, perturbed and bred
    optimiser: OptimiserConfig = OptimiserConfig()
    goals: Goals = Goals()
    similarity: Similarity = Similarity()  # for the diversity penalty and the graph's edges
    watch: WatchConfig = WatchConfig()
    val_fraction: float = 0.2  # of the training rows, held out for validation (when no val is given)
    eval_rows: int = 2048  # at most this many rows per evaluation (validation and training accuracy)
    batched: bool = True  # batch members that share an architecture and batch size (stacked weights)
    vmap_min: int = 2  # smallest such group that trains as one batch; smaller ones (and every member when
    #                    not batched) train member by member, each through a plain module
    param_layers: tuple[str, ...] = ()  # layers ("h0", "h1", ..., "out") whose weights are reported; () = all
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of the flat inputs, for conv layers

    def __post_init__(self) -> None:
        for name, lo in (("members", 1), ("steps_per_round", 1), ("eval_rows", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"SwarmConfig.{name} must be an int >= {lo}, got {v!r}")
        if isinstance(self.vmap_min, bool) or not isinstance(self.vmap_min, int) or self.vmap_min < 2:
            raise ValueError(f"SwarmConfig.vmap_min must be an int >= 2, got {self.vmap_min!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"SwarmConfig.val_fraction must be in (0, 1), got {self.val_fraction!r}")


@dataclass
class Member:
    """One slot of the swarm: its spec, weights, optimiser state, batch generator and latest metrics."""

    id: int
    spec: MemberSpec
    params: dict[str, torch.Tensor] | None  # None on processes that do not own the member
    buf: dict[str, torch.Tensor] | None  # SGD momentum buffers
    gen: torch.Generator | None  # draws this member's batches (CPU)
    steps: int = 0  # optimiser steps taken in this slot
    status: str = "active"  # or "quarantined"
    origin: str = "init"  # where the current weights came from
    reason: str = ""  # why quarantined
    seq: int = 0  # reports sent
    val_acc: float = math.nan
    val_loss: float = math.nan
    train_acc: float = math.nan
    loss_mean: float = math.nan
    step_time: float = math.nan  # seconds per member-step in its batch
    fault: str | None = None  # injected for tests and demos: "nan" or "crash"

    @property
    def active(self) -> bool:
        return self.status == "active"

    def metrics(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("spec", "steps", "status", "origin", "reason", "val_acc", "val_loss",
                                              "train_acc", "loss_mean", "step_time")}


class Swarm(MemberSteps, Reports, Evolution):
    """N networks trained at once, in rounds; compute goes to the fittest, the weakest are replaced.

    Each round: the optimiser shares out ``steps_per_round x active members`` steps by fitness
    (:func:`~adaptive_kit.swarm.optimiser.allocate`); members that share an architecture and
    batch size take their steps together over stacked weights (what ``vmap`` computes, as batched
    matmuls and grouped convolutions; a member that has used its steps drops out of the batch)
    when there are at least ``vmap_min`` of them, and every other member trains alone through a
    plain module (:meth:`groups`); each round's batches go to the device in one copy and its
    losses come back in one; every member is evaluated; a report per member goes
    out on the bus (and into :meth:`history`); the watch looks for anomalies; a member whose
    loss, weights or metrics are non-finite, or whose step raises, is quarantined; and every
    ``exploit_every`` rounds the bottom members are replaced (exploit / explore, breeding).

    Args:
        data: ``x_train`` / ``y_train`` to train on (a validation part is held out unless ``val``
            is given); ``x_test`` / ``y_test`` are left for the caller.
        config: see :class:`SwarmConfig`.
        specs: the initial members (default: drawn from ``config.space``).
        val: validation ``(x, y)``; default: ``config.val_fraction`` of the training rows.
        device: where members train; default :func:`~adaptive_kit.devices.pick_device` (CUDA when present).
        sink: where reports go; default an in-process :class:`~adaptive_kit.swarm.bus.Collector`
            (:attr:`collector`) over ZeroMQ.

    Raises:
        ValueError / SpecError: invalid config, specs, or data (the message names the field).
    """

    def __init__(self, data: Split, config: SwarmConfig = SwarmConfig(), *, specs: Sequence[MemberSpec] | None = None,
                 val: tuple[torch.Tensor, torch.Tensor] | None = None, device: torch.device | str | None = None,
                 sink: Sink | None = None, rank: int = 0, world: int = 1) -> None:
        self.config = config
        self.goals, self.optimiser = config.goals, config.optimiser  # may be changed between rounds
        self.device = pick_device(device)
        x, y = data.x_train, data.y_train
        if x.dim() != 2 or y.dim() != 1 or len(x) != len(y) or len(x) < 2:
            raise ValueError(f"data: expected x_train (N, F) and y_train (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
        if val is None:
            g = torch.Generator().manual_seed(config.seed)
            perm = torch.randperm(len(x), generator=g)
            n_val = max(1, round(config.val_fraction * len(x)))
            val = (x[perm[:n_val]], y[perm[:n_val]])
            x, y = x[perm[n_val:]], y[perm[n_val:]]
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.x_val, self.y_val = (t[:config.eval_rows].to(self.device) for t in val)
        self.x_fit, self.y_fit = self.x[:config.eval_rows], self.y[:config.eval_rows]  # for training accuracy
        self.n_features = x.shape[1]
        self.n_classes = int(max(int(y.max()), int(self.y_val.max())) + 1)
        self.rank, self.world = rank, world
        self.rng = np.random.default_rng(config.seed)
        if specs is None:
            specs = [config.space.sample(self.rng) for _ in range(config.members)]
        elif len(specs) != config.members:
            raise ValueError(f"specs: got {len(specs)} for SwarmConfig.members={config.members}")
        self._templates: dict[tuple, tuple[nn.Module, list[list[str]]]] = {}
        # per member trained alone: (its layers, its module, the module's weights as the member's params)
        self._nets: dict[int, tuple[tuple, nn.Module, dict[str, torch.Tensor]]] = {}
        # members' own seeds come from a generator of their own, so that a swarm given the specs
        # another swarm drew (its random-search twin) starts from the same weights and batches
        seeds = np.random.default_rng([config.seed, 1]).integers(2**62, size=len(specs))
        self.members = [self._new_member(i, s, int(seed)) for i, (s, seed) in enumerate(zip(specs, seeds))]
        self.round = 0
        self.paused = False
        self.alarms: list[dict[str, Any]] = []
        self.lineage: list[dict[str, Any]] = []
        self._rows: list[dict[str, Any]] = []
        self._allocated = np.zeros(config.members, dtype=np.int64)
        self.watch = Watch(config.watch)
        # seconds spent so far in training (every member's steps), in the evaluation after it, and
        # in whole rounds (training, evaluation, reports, evolution); each phase ends with the device idle
        self.phase_s = {"train": 0.0, "evaluate": 0.0, "round": 0.0}
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)
        self.collector: Collector | None = None
        if sink is None and world == 1:
            self.collector = Collector()
            sink = self.collector.sink("swarm")
        self.sink = sink

    # -- members ------------------------------------------------------------------------------------
    def owns(self, member: int) -> bool:
        """True when this process trains ``member`` (members are dealt round-robin to processes)."""
        return member % self.world == self.rank

    def _template(self, spec: MemberSpec) -> tuple[nn.Module, list[list[str]]]:
        key = spec.layers
        if key not in self._templates:
            model = build_model(spec, self.n_features, self.n_classes, self.config.image_shape).to(self.device)
            layers = [[f"{name}.{p}" for p, _ in mod.named_parameters()]
                      for name, mod in model.named_children() if any(True for _ in mod.parameters())]
            self._templates[key] = (model, layers)
        return self._templates[key]

    def layer_names(self, spec: MemberSpec) -> list[str]:
        """Names of a member's parametrised layers: ``h0``, ``h1``, ... for hidden layers, ``out``."""
        return [f"h{i}" for i in range(len(spec.layers))] + ["out"]

    def _init_params(self, spec: MemberSpec, seed: int) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(spec, self.n_features, self.n_classes, self.config.image_shape)
        return {k: v.detach().to(self.device) for k, v in model.named_parameters()}

    def _new_member(self, i: int, spec: MemberSpec, seed: int) -> Member:
        self._template(spec)  # validates the spec against the data (conv needs an image shape)
        if not self.owns(i):
            return Member(i, spec, None, None, None)
        params = self._init_params(spec, seed)
        return Member(i, spec, params, {k: torch.zeros_like(v) for k, v in params.items()},
                      torch.Generator().manual_seed(seed))

    def inject(self, member: int, fault: str) -> None:
        """Make ``member`` fail next round: ``"nan"`` poisons its weights, ``"crash"`` raises in its step.

        Raises:
            ValueError: unknown member or fault.
        """
        if fault not in FAULTS:
            raise ValueError(f"inject(fault={fault!r}): expected one of {FAULTS}")
        if not 0 <= member < len(self.members):
            raise ValueError(f"inject(member={member!r}): expected 0 <= member < {len(self.members)}")
        self.members[member].fault = fault

    @property
    def sent(self) -> dict[int, int]:
        """Reports sent per member owned by this process."""
        return {m.id: m.seq for m in self.members if self.owns(m.id)}

    # -- one round ----------------------------------------------------------------------------------
    def fitness(self) -> np.ndarray:
        """Current fitness of every member under :attr:`goals` (0 for quarantined or unmeasured)."""
        ms = self.members
        f = fitness(self.goals, np.array([m.val_acc for m in ms]), np.array([m.val_loss for m in ms]),
                    np.array([m.step_time for m in ms]), np.array([m.train_acc for m in ms]))
        return np.where([m.active for m in ms], f, 0.0)

    def step(self) -> bool:
        """Run one round; returns False (and does nothing) while :attr:`paused`."""
        if self.paused:
            return False
        cfg, t_round = self.config, time.perf_counter()
        active = np.array([m.active for m in self.members])
        measured = np.isfinite([m.val_acc for m in self.members])
        optimiser = self.optimiser if measured[active].all() else OptimiserConfig(allocation="equal")
        self._allocated = allocate(self.fitness(), cfg.steps_per_round * int(active.sum()), active, optimiser)
        owned = [m for m in self.members if self.owns(m.id) and m.active]
        for m in owned:
            if m.fault == "nan":
                m.fault = None
                for p in m.params.values():
                    p.fill_(float("nan"))
        losses: dict[int, np.ndarray] = {}
        groups = self.groups(owned)
        first_step = {m.id: m.steps for m in owned}
        t0 = time.perf_counter()
        for group in groups:
            losses.update(self._train_safely(group))
        t1 = time.perf_counter()
        for group in groups:
            self._evaluate([m for m in group if m.active])
        t2 = time.perf_counter()
        self._observe(owned, losses, first_step)
        self._exchange()
        self._report(owned, losses, first_step, t_round)
        self.round += 1
        pol = self.optimiser
        if pol.exploit_every and self.round >= pol.warmup_rounds and self.round % pol.exploit_every == 0:
            self._evolve()
        for phase, secs in (("train", t1 - t0), ("evaluate", t2 - t1), ("round", time.perf_counter() - t_round)):
            self.phase_s[phase] += secs
        return True

    def run(self, rounds: int, *, progress: bool = True,
            on_round: Callable[[Swarm], bool | None] | None = None) -> Swarm:
        """Run ``rounds`` rounds (fewer if ``on_round(swarm)`` returns False or the swarm is paused)."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"run(rounds={rounds!r}): expected an int >= 0")
        for _ in tqdm(range(rounds), desc="swarm", disable=not progress, leave=False):
            if not self.step():
                break
            if on_round is not None and on_round(self) is False:
                break
        return self

    def groups(self, members: Sequence[Member]) -> list[list[Member]]:
        """How ``members`` train: lists of members that take their steps together over stacked
        weights (equal :attr:`MemberSpec.group_key`, at least ``vmap_min`` of them), and lists of
        one, which train through a plain module."""
        cfg = self.config
        least = cfg.vmap_min
        by_key: dict[tuple, list[Member]] = defaultdict(list)
        for m in members:
            by_key[m.spec.group_key if cfg.batched else (m.id,)].append(m)
        return [g for group in by_key.values() for g in ([group] if len(group) >= least else [[m] for m in group])]

    def _train_safely(self, group: list[Member]) -> dict[int, np.ndarray]:
        """Train a group; if it raises, train its members one by one and quarantine those that fail."""
        steps = [int(self._allocated[m.id]) for m in group]
        states = [m.gen.get_state() for m in group]
        try:
            return self._train_group(group, steps)
        except Exception as e:  # noqa: BLE001 - a member's failure must not stop the swarm
            for m, s in zip(group, states):
                m.gen.set_state(s)
            if len(group) == 1:
                self._quarantine(group[0], "crash", f"{type(e).__name__}: {e}",
                                 "".join(traceback.format_exception_only(type(e), e)).strip())
                return {group[0].id: np.full(steps[0], np.nan)}
            out = {}
            for m in group:
                out.update(self._train_safely([m]))
            return out

    @torch.no_grad()
    def _evaluate(self, group: list[Member]) -> None:
        if not group:
            return
        model, _ = self._template(group[0].spec)
        P = {k: torch.stack([m.params[k] for m in group]) for k in group[0].params}
        f = batched_logits(model)
        val = f(P, self.x_val.expand(len(group), *self.x_val.shape))  # (G, n_val, C)
        fit = f(P, self.x_fit.expand(len(group), *self.x_fit.shape))
        n = val.shape[1]
        val_loss = nn.functional.cross_entropy(val.flatten(0, 1), self.y_val.repeat(len(group)),
                                               reduction="none").view(len(group), n).mean(1)
        val_acc = (val.argmax(-1) == self.y_val).float().mean(1)
        train_acc = (fit.argmax(-1) == self.y_fit).float().mean(1)
        finite = torch.stack([torch.isfinite(p).flatten(1).all(1) for p in P.values()]).all(0)
        host = torch.stack([val_acc.double(), val_loss.double(), train_acc.double(), finite.double()]).cpu().numpy()
        for i, m in enumerate(group):
            m.val_acc, m.val_loss, m.train_acc = (float(v) for v in host[:3, i])
            if not host[3, i] or not math.isfinite(m.val_loss):
                self._quarantine(m, "nonfinite", "non-finite weights" if not host[3, i] else
                                 f"validation loss = {m.val_loss}", "")

    def _quarantine(self, m: Member, detector: str, evidence: str, detail: str) -> None:
        m.status, m.reason = "quarantined", evidence
        m.val_acc = m.val_loss = m.train_acc = math.nan
        self.alarms.append({"time": time.time(), "round": self.round, "member": m.id, "detector": detector,
                            "kind": "member", "scope": "own", "evidence": evidence, "value": math.nan})
        self.lineage.append({"round": self.round, "member": m.id, "kind": "quarantine", "parents": (),
                             "before": m.spec.arch, "after": "", "detail": detail or evidence})

    # -- results ------------------------------------------------------------------------------------
    def history(self) -> pd.DataFrame:
        """Every report this process made: one row per member per round (the ``swarm`` schema)."""
        from ..records import get_schema
        if not self._rows:
            return get_schema("swarm").empty_table().to_pandas()
        return pd.DataFrame(self._rows)

    def alarm_frame(self) -> pd.DataFrame:
        cols = ["time", "round", "member", "detector", "kind", "scope", "evidence", "value"]
        return pd.DataFrame(self.alarms, columns=cols)

    def lineage_frame(self) -> pd.DataFrame:
        """Quarantines, exploits and breedings in order: round, member, kind, parents, before, after, detail."""
        events = sorted(self.lineage, key=lambda e: (e["round"], e["kind"] != "quarantine", e["member"]))
        return pd.DataFrame(events, columns=["round", "member", "kind", "parents", "before", "after", "detail"])

    def table(self) -> pd.DataFrame:
        """The members now: spec, status, origin and latest metrics, with fitness."""
        fit = self.fitness()
        rows = [{"member": m.id, "arch": m.spec.arch, **m.spec.hparams(), "status": m.status, "origin": m.origin,
                 "steps": m.steps, "val_acc": m.val_acc, "val_loss": m.val_loss, "train_acc": m.train_acc,
                 "fitness": fit[m.id], "steps_next": int(self._allocated[m.id])} for m in self.members]
        return pd.DataFrame(rows).set_index("member")

    def best(self) -> Member:
        """The active member with the highest fitness."""
        fit = self.fitness()
        return self.members[int(np.argmax(np.where([m.active for m in self.members], fit, -1.0)))]

    def model(self, member: int) -> nn.Module:
        """A standalone ``nn.Module`` with a member's current weights (owned members only)."""
        m = self.members[member]
        if m.params is None:
            raise ValueError(f"model(member={member}): owned by another process")
        net = build_model(m.spec, self.n_features, self.n_classes, self.config.image_shape).to(self.device)
        net.load_state_dict(m.params)
        return net

    @torch.no_grad()
    def accuracy(self, member: int, x: torch.Tensor, y: torch.Tensor) -> float:
        """Accuracy of a member on ``(x, y)`` (for example the test set)."""
        net = self.model(member)
        return float((net(x.to(self.device)).argmax(1) == y.to(self.device)).float().mean())

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config, "goals": self.goals, "optimiser": self.optimiser, "round": self.round,
            "rng": self.rng.bit_generator.state, "allocated": self._allocated, "rows": self._rows,
            "alarms": self.alarms, "lineage": self.lineage, "watch": self.watch.monitors,
            "members": [{**{k: getattr(m, k) for k in ("id", "spec", "steps", "status", "origin", "reason", "seq",
                                                      "val_acc", "val_loss", "train_acc", "loss_mean", "step_time")},
                         "params": None if m.params is None else {k: v.cpu() for k, v in m.params.items()},
                         "buf": None if m.buf is None else {k: v.cpu() for k, v in m.buf.items()},
                         "gen": None if m.gen is None else m.gen.get_state()} for m in self.members],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.goals, self.optimiser, self.round = state["goals"], state["optimiser"], state["round"]
        self.rng.bit_generator.state = state["rng"]
        self._allocated = state["allocated"]
        self._rows, self.alarms, self.lineage = list(state["rows"]), list(state["alarms"]), list(state["lineage"])
        self.watch.monitors = state["watch"]
        members = []
        for d in state["members"]:
            gen = None
            if d["gen"] is not None:
                gen = torch.Generator()
                gen.set_state(d["gen"])
            m = Member(d["id"], d["spec"], _to(d["params"], self.device), _to(d["buf"], self.device), gen)
            for k in ("steps", "status", "origin", "reason", "seq", "val_acc", "val_loss", "train_acc", "loss_mean",
                      "step_time"):
                setattr(m, k, d[k])
            self._template(m.spec)
            members.append(m)
        self.members = members

    def save(self, path: str | Path) -> Path:
        """Write the whole swarm (members, optimiser state, history) to ``path``; returns the path."""
        path = Path(path)
        torch.save(self.state_dict(), path)
        return path

    @classmethod
    def load(cls, path: str | Path, data: Split, *, val: tuple[torch.Tensor, torch.Tensor] | None = None,
             device: torch.device | str | None = None, sink: Sink | None = None) -> Swarm:
        """A swarm restored from :meth:`save`, ready to continue exactly where it stopped.

        Raises:
            ValueError: the file is not a swarm checkpoint.
        """
        try:
            state = torch.load(Path(path), weights_only=False)
            config = state["config"]
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"Swarm.load(path={str(path)!r}): not a swarm checkpoint ({e})") from None
        if not isinstance(config, SwarmConfig):
            raise ValueError(f"Swarm.load(path={str(path)!r}): not a swarm checkpoint")
        swarm = cls(data, config, specs=[d["spec"] for d in state["members"]], val=val, device=device, sink=sink)
        swarm.load_state_dict(state)
        return swarm

    def close(self) -> None:
        """Close the sink (and the in-process collector's socket after a last poll)."""
        if self.sink is not None and not self.sink.closed:
            self.sink.close()
        if self.collector is not None:
            self.collector.poll()
            self.collector.close()

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to(tensors: dict[str, torch.Tensor] | None, device: torch.device) -> dict[str, torch.Tensor] | None:
    return None if tensors is None else {k: v.to(device) for k, v in tensors.items()}
