"""Episodes that train and evaluate level policies reproducibly: any model, any data, injected faults.

An episode is recorded once (:func:`record`): a model trains with one injected
:class:`~adaptive_kit.telemetry.faults.Fault` (or none), and every tensor the telemetry could see
is kept on the host. A policy is then played against the recording (:func:`replay`): each step
it picks levels, the detectors read what those levels would have sent (each layer's statistics
computed once per step, exactly, and pooled as the collector pools them; raw and micro rows carry
the same statistics beside their values), the bytes are the collector's own Arrow bytes for that
plan (:func:`~adaptive_kit.telemetry.collector.aggregate`), and the reward counts true and false alarms and bytes.
Replaying costs no training, so a policy learns from hundreds of episodes in seconds, and
every policy is judged on exactly the same runs.

The kit's models are ``"mlp"`` and ``"cnn"`` on bundled digits; a :class:`Workload` brings your
own model builder and data::

    mine = Workload("wide", lambda: nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)))
    specs = fault_suite(models=[mine], seeds=(0, 1))
    traces = record_all(specs)
"""
from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..anomaly import Alarm
from ..checks import check_int
from ..devices import pick_device, seed_everything
from ..stats import batched_stats
from .collector import KINDS, LEVELS, Telemetry, TelemetryConfig, aggregate, materialise
from .control import LOOK_LEVELS, Controller, StateTracker, grad_variance, level_of
from .faults import FAULT_KINDS, LAYER_KINDS, Fault, FaultInjector, layer_candidates
from .observations import Observation, pool_rows
from .policies import Policy, RewardWeights
from .suite import DetectorSuite
from .workloads import MODELS, Workload, build_model, workload


@dataclass(frozen=True)
class EpisodeSpec:
    model: str | Workload = "mlp"  # one of MODELS, or your own Workload
    fault: Fault | None = None  # None: a clean run
    steps: int = 120  # training steps
    batch_size: int = 32  # examples per step
    lr: float = 0.05  # SGD learning rate (momentum 0.9)
    seed: int = 0  # seeds the initialisation and the batch order

    def __post_init__(self) -> None:
        w = workload(self.model)
        for name in ("steps", "batch_size"):
            check_int(f"EpisodeSpec.{name}", getattr(self, name), 1)
        if self.fault is not None and self.fault.step >= self.steps:
            raise ValueError(f"EpisodeSpec.fault.step={self.fault.step} is not before steps={self.steps}")
        if self.fault is not None and self.fault.kind in ("label_noise", "label_permute") and not w.n_classes:
            raise ValueError(f"EpisodeSpec.fault.kind={self.fault.kind!r} needs class labels; "
                             f"workload {w.name!r} is a regression")

    @property
    def workload(self) -> Workload:
        return workload(self.model)

    @property
    def label(self) -> str:
        return f"{self.workload.name}/{self.fault.kind if self.fault else 'clean'}/seed{self.seed}"


def _observation(kind: str, layer: str, level: str, row: np.ndarray) -> Observation:
    return Observation(kind, layer, level, int(row[0]), *(float(v) for v in row[1:]))


@dataclass
class Trace:
    """A recorded episode: every tensor at every step and the loss, plus replay caches."""

    spec: EpisodeSpec
    param_layers: list[str]
    act_layers: list[str]
    relu_layers: list[str]
    values: list[dict[tuple[str, str], torch.Tensor]]  # per step: (kind, layer) -> flat values
    losses: np.ndarray  # (steps,)
    test_accuracy: float  # NaN for a regression
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def keys(self) -> list[tuple[str, str]]:
        """Every (kind, layer) the telemetry can watch, kinds in :data:`KINDS` order."""
        if "keys" not in self._cache:
            self._cache["keys"] = sorted(self.values[0], key=lambda k: KINDS.index(k[0]))
        return self._cache["keys"]

    def stats(self) -> np.ndarray:
        """Exact statistics, (steps, keys, len(STAT_NAMES)), computed once for all replays."""
        if "stats" not in self._cache:
            self._cache["stats"] = np.stack([
                batched_stats([v[k] for k in self.keys]).numpy() for v in self.values])
        return self._cache["stats"]

    def bytes_of(self, levels: dict[tuple[str, str], str], config: TelemetryConfig) -> int:
        """Arrow bytes one step sends with these levels (the collector's own batches)."""
        sig = (config.window, config.raw_cap, tuple(levels[k] for k in self.keys))
        cache = self._cache.setdefault("bytes", {})
        if sig not in cache:
            items = [(k, n, lv, [self.values[0][(k, n)]]) for (k, n), lv in levels.items() if lv != "off"]
            cache[sig] = sum(materialise(aggregate(0, items, config, torch.tensor(0.0))).bytes.values())
        return cache[sig]

    def observe(self, step: int, levels: dict[tuple[str, str], str],
                config: TelemetryConfig) -> list[Observation]:
        """What the detectors see at ``step`` when each (kind, layer) is at ``levels[key]``."""
        stats = self.stats()[step]
        out: list[Observation] = []
        macro: dict[str, list[int]] = {}
        for i, key in enumerate(self.keys):
            lv = levels[key]
            if lv == "macro":
                macro.setdefault(key[0], []).append(i)
            elif lv != "off":  # raw and micro rows carry the layer's statistics beside the values
                out.append(_observation(*key, lv, stats[i]))
        whole = self.whole()
        for kind, idx in macro.items():
            row = whole[kind][step] if len(idx) == len(self.layers_of(kind)) else pool_rows(stats[idx])
            out.append(_observation(kind, "*", "macro", row))
        return out

    def layers_of(self, kind: str) -> list[int]:
        """Indices into :attr:`keys` of ``kind``'s layers."""
        return [i for i, k in enumerate(self.keys) if k[0] == kind]

    def whole(self) -> dict[str, np.ndarray]:
        """kind -> (steps, len(STAT_NAMES)) statistics pooled over all its layers (cached)."""
        if "whole" not in self._cache:
            st = self.stats()
            self._cache["whole"] = {k: pool_rows(st[:, self.layers_of(k)]) for k in KINDS if self.layers_of(k)}
        return self._cache["whole"]

    def raw_bytes(self, config: TelemetryConfig) -> float:
        """Bytes per step that the always-raw plan sends under ``config``."""
        return float(self.bytes_of({k: "raw" for k in self.keys}, config))


@dataclass
class Run:
    """A finished live run: its collector, detectors, controller (if a policy drove it) and scores."""

    spec: EpisodeSpec
    tel: Telemetry
    suite: DetectorSuite
    controller: Controller | None
    losses: np.ndarray  # (steps,) training loss per step
    test_accuracy: float  # NaN for a regression


def _train(spec: EpisodeSpec, tel_levels: str | dict | None, *, policy: Policy | None = None,
           config: TelemetryConfig = TelemetryConfig(), on_step=None, on_start=None,
           on_backward=None, progress: bool = False, device: torch.device | str | None = None):
    """The one training loop of live runs and recordings: seeded, fault injected, telemetry on.

    The model is built on the CPU after seeding (the same initial weights on every device), then
    moved to ``device`` with the data; batch indices come from a CPU generator, so the batch
    order is the same on every device too.
    """
    w = spec.workload
    device = pick_device() if device is None else torch.device(device)
    seed_everything(spec.seed)
    data = w.data().to(device)
    model = w.build().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9)
    injector = FaultInjector(spec.fault, model, opt, n_classes=w.n_classes or None)
    tel = Telemetry(model, tel_levels or "off", config=config)
    controller = Controller(tel, policy, steps_total=spec.steps) if policy is not None else None
    suite = controller.suite if controller is not None else DetectorSuite.for_telemetry(tel)
    inner = controller if controller is not None else suite

    def handle(record):
        alarms = inner(record)
        if on_step is not None:
            on_step(record, alarms, suite.last_observations)
        return alarms

    tel.on_step = handle
    if on_start is not None:
        on_start(tel)
    g = torch.Generator().manual_seed(spec.seed)
    losses = torch.zeros(spec.steps, device=device)  # (steps,) stays on the device until the end
    for step in tqdm(range(spec.steps), desc=spec.label, disable=not progress, leave=False):
        injector.before_step(step)
        idx = torch.randint(0, len(data.x_train), (spec.batch_size,), generator=g).to(device)
        x, y = injector.batch(step, data.x_train[idx], data.y_train[idx])
        with tel.step(step):
            loss = w.loss(model(x), y)
            tel.log_loss(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            injector.after_backward(step)
        if on_backward is not None:
            on_backward(step, tel)
        opt.step()
        losses[step] = loss.detach()
    tel.close()
    with torch.no_grad():
        out = model(data.x_test)
        acc = float((out.argmax(1) == data.y_test).float().mean()) if w.n_classes else math.nan
    return Run(spec, tel, suite, controller, losses.cpu().numpy(), acc)


def run(spec: EpisodeSpec, levels: str | dict = "meso", *, policy: Policy | None = None,
        config: TelemetryConfig = TelemetryConfig(), on_step=None, progress: bool = False,
        device: torch.device | str | None = None) -> Run:
    """Train ``spec``'s model live with telemetry, detectors and, if given, a policy setting levels.

    Args:
        spec: the workload, fault, steps and seed.
        levels: where levels start; a ``policy`` then sets them every step through a
            :class:`Controller`.
        on_step: ``on_step(record, alarms, observations)`` for every step's :class:`StepRecord`
            once it is on the host, with the detectors' alarms and :class:`Observation` s (a
            panel streams its plots from here).
        device: where the model and data live (default :func:`adaptive_kit.pick_device`).

    Returns:
        The finished :class:`Run`.
    """
    return _train(spec, levels, policy=policy, config=config, on_step=on_step, progress=progress, device=device)


def _module(model: nn.Module, name: str) -> nn.Module:
    return model if name == "<root>" else model.get_submodule(name)


def record(spec: EpisodeSpec, device: torch.device | str | None = None) -> Trace:
    """Train ``spec``'s model with its fault on ``device`` (default
    :func:`adaptive_kit.pick_device`) and keep every tensor the telemetry could see.

    The tensors are read beside the collector (which runs with every level off): gradients and
    weights after the backward pass, each watched module's output in the forward pass. They are
    copied on the device during the run and moved to the host once, when it ends.
    """
    tel_device = pick_device() if device is None else torch.device(device)
    values: list[dict[tuple[str, str], torch.Tensor]] = []
    acts: dict[str, torch.Tensor] = {}
    hooks = []

    def start(tel: Telemetry) -> None:
        for layer in tel.layers["act"]:
            def grab(_m, _i, out, layer=layer):
                if isinstance(out, torch.Tensor):
                    acts[layer] = out.detach().reshape(-1).float().clone()
            hooks.append(_module(tel.model, layer).register_forward_hook(grab))

    def keep(_step: int, tel: Telemetry) -> None:
        now = {}
        for layer in tel.param_layers:
            params = list(_module(tel.model, layer).parameters(recurse=False))
            now[("grad", layer)] = torch.cat([p.grad.detach().reshape(-1).float() if p.grad is not None
                                              else torch.zeros(p.numel(), device=p.device) for p in params])
            now[("weight", layer)] = torch.cat([p.detach().reshape(-1).float() for p in params])
        for layer in tel.layers["act"]:
            now[("act", layer)] = acts.pop(layer, torch.zeros(0, device=tel_device))
        values.append(now)

    try:
        r = _train(spec, None, on_start=start, on_backward=keep, device=tel_device)
    finally:
        for h in hooks:
            h.remove()
    values = [{k: v.cpu() for k, v in now.items()} for now in values]
    tel = r.tel
    trace = Trace(spec, list(tel.param_layers), list(tel.layers["act"]), list(tel.relu_layers),
                  values, r.losses, r.test_accuracy)
    trace.stats()  # every replay reads these: computed once, with the recording
    return trace


@dataclass
class EpisodeResult:
    label: str
    policy: str
    fault: str  # fault kind or "clean"
    fault_step: int | None
    alarms: list[Alarm]
    true_alarms: int
    false_alarms: int
    detection_step: int | None
    bytes: float
    raw_bytes: float
    macro_bytes: float  # what static macro sends on the same episode
    steps: int
    latency_ms: float  # mean analysis time per step
    reward: float
    level_steps: dict[str, int]  # how many (kind x layer x step) slots used each level

    @property
    def detected(self) -> bool:
        return self.detection_step is not None

    @property
    def delay(self) -> int | None:
        return None if self.detection_step is None else self.detection_step - self.fault_step


def replay(trace: Trace, policy: Policy, *, config: TelemetryConfig = TelemetryConfig(),
           weights: RewardWeights = RewardWeights(), learn: bool = False) -> EpisodeResult:
    """Play ``policy`` against a recorded episode; learn from the rewards if ``learn``.

    An alarm at or after the fault step is true, any other false.
    """
    suite = DetectorSuite.standard(trace.param_layers, trace.relu_layers, act_layers=trace.act_layers)
    tracker = StateTracker(len(trace.values), trace.keys)
    raw = trace.raw_bytes(config)
    macro = float(trace.bytes_of({k: "macro" for k in trace.keys}, config))
    fault = trace.spec.fault
    policy.reset()
    state = tracker.state
    true = false = 0
    detection = None
    total_bytes = reward = 0.0
    level_steps = {lv: 0 for lv in LEVELS}
    for step in range(len(trace.values)):
        plan = policy.act(state)
        levels = {key: level_of(plan, *key) for key in trace.keys}
        for lv in levels.values():
            level_steps[lv] += 1
        obs = trace.observe(step, levels, config)
        pending_before = suite.pending
        alarms = suite.observe(step, obs, float(trace.losses[step]))
        sent = trace.bytes_of(levels, config)
        total_bytes += sent
        active = fault is not None and step >= fault.step
        t_ok = len(alarms) if active else 0
        true += t_ok
        false += len(alarms) - t_ok
        if t_ok and detection is None:
            detection = step
        found = len(suite.pending - pending_before)
        rows = len(obs)
        values = sum(trace.values[step][k].numel() for k, lv in levels.items() if lv in ("raw", "micro"))
        r = weights.reward(t_ok, len(alarms) - t_ok, sent / macro - 1.0, weights.analysis_ms(rows, values),
                           found if active else -found)
        reward += r
        looked = [k for k, lv in levels.items() if lv in LOOK_LEVELS]
        next_state = tracker.update(step, alarms, grad_variance(suite), float(trace.losses[step]),
                                    looked=looked, suspicion=suite.suspicion, pending=suite.pending)
        if learn:
            policy.learn(state, plan, r, next_state)
        state = next_state
    steps = len(trace.values)
    return EpisodeResult(trace.spec.label, policy.name, fault.kind if fault else "clean",
                         fault.step if fault else None, suite.alarms, true, false, detection,
                         total_bytes, raw * steps, macro * steps, steps, 1e3 * statistics.fmean(suite.latency_s),
                         reward, level_steps)


def _layer_choices(w: Workload, kind: str) -> list[str]:
    """Layers a layer fault of ``kind`` may target in ``w``'s model (not the output layer for
    faults whose units must die behind a ReLU)."""
    names = layer_candidates(w.build(), kind)
    return names[:-1] if kind in ("dead_units", "dead_relu") and len(names) > 1 else names


def fault_suite(models: Sequence[str | Workload] = MODELS, kinds: Sequence[str] = FAULT_KINDS,
                seeds: Sequence[int] = (0, 1), steps: int = 120, clean_per_seed: int = 1) -> list[EpisodeSpec]:
    """Every model x fault kind x seed, the fault at a seeded random step in the middle half (and
    a layer fault in a seeded random layer), plus ``clean_per_seed`` clean runs per model and
    seed; the first clean run of a model and seed is the faulty runs' clean twin."""
    specs = []
    for model in models:
        w = workload(model)
        for seed in seeds:
            rng = random.Random(f"{w.name}-{seed}")
            for kind in kinds:
                if kind in ("label_noise", "label_permute") and not w.n_classes:
                    continue
                at = rng.randrange(steps // 4, 3 * steps // 4)
                layer = None  # a model that is one bare layer: the injector's default, the root
                if kind in LAYER_KINDS and (choices := _layer_choices(w, kind)):
                    layer = rng.choice(choices)
                specs.append(EpisodeSpec(model, Fault(kind, at, layer=layer, seed=seed), steps, seed=seed))
            for c in range(clean_per_seed):
                specs.append(EpisodeSpec(model, None, steps, seed=seed + 1000 * c))
    return specs


def record_all(specs: list[EpisodeSpec], progress: bool = True,
               device: torch.device | str | None = None) -> list[Trace]:
    """Record every spec on ``device`` (default :func:`adaptive_kit.pick_device`), with a progress bar."""
    device = pick_device() if device is None else device
    return [record(s, device) for s in tqdm(specs, desc="record episodes", disable=not progress, leave=False)]


def train(policy: Policy, traces: list[Trace], episodes: int, *, config: TelemetryConfig = TelemetryConfig(),
          weights: RewardWeights = RewardWeights(), seed: int = 0, progress: bool = True) -> list[float]:
    """Train a learning policy on ``episodes`` replays drawn from ``traces``; return their rewards."""
    rng = random.Random(seed)
    policy.training = True
    rewards = []
    for _ in tqdm(range(episodes), desc=f"train {policy.name}", disable=not progress, leave=False):
        rewards.append(replay(rng.choice(traces), policy, config=config, weights=weights, learn=True).reward)
    policy.training = False
    return rewards


def evaluate(policy: Policy, traces: list[Trace], *, config: TelemetryConfig = TelemetryConfig(),
             weights: RewardWeights = RewardWeights()) -> list[EpisodeResult]:
    """Replay every trace once without learning."""
    was = getattr(policy, "training", None)
    if was is not None:
        policy.training = False
    out = [replay(t, policy, config=config, weights=weights) for t in traces]
    if was is not None:
        policy.training = was
    return out


def summarize(results: list[EpisodeResult]) -> dict[str, float]:
    """Recall (faulty episodes with a true alarm), precision (true alarms / all alarms), the
    fraction of clean episodes with any alarm, median detection delay, and bytes against
    always-raw and static macro on the same episodes."""
    faulty = [r for r in results if r.fault != "clean"]
    clean = [r for r in results if r.fault == "clean"]
    true = sum(r.true_alarms for r in results)
    alarms = true + sum(r.false_alarms for r in results)
    delays = [r.delay for r in faulty if r.detected]
    return {
        "recall": sum(r.detected for r in faulty) / len(faulty) if faulty else math.nan,
        "precision": true / alarms if alarms else math.nan,
        "clean_false_alarm_rate": sum(r.false_alarms > 0 for r in clean) / len(clean) if clean else math.nan,
        "median_delay": float(np.median(delays)) if delays else math.nan,
        "bytes_vs_raw": sum(r.bytes for r in results) / sum(r.raw_bytes for r in results),
        "bytes_vs_macro": sum(r.bytes for r in results) / sum(r.macro_bytes for r in results),
        "bytes_per_step": sum(r.bytes for r in results) / max(1, sum(r.steps for r in results)),
        "latency_ms": statistics.fmean(r.latency_ms for r in results),
    }


def results_frame(results: list[EpisodeResult]) -> pd.DataFrame:
    """One row per episode: label, policy, fault, detection, delay, alarms and bytes."""
    return pd.DataFrame([{
        "episode": r.label, "policy": r.policy, "fault": r.fault, "fault_step": r.fault_step,
        "detected": r.detected, "delay": r.delay, "true_alarms": r.true_alarms,
        "false_alarms": r.false_alarms, "bytes": r.bytes, "bytes_vs_raw": r.bytes / r.raw_bytes,
        "first_alarm": (r.alarms[0].detector if r.alarms else None),
    } for r in results])


__all__ = ["MODELS", "EpisodeResult", "EpisodeSpec", "Run", "Trace", "Workload", "build_model", "evaluate",
           "fault_suite", "record", "record_all", "replay", "results_frame", "run", "summarize", "train", "workload"]

