"""Episodes that train and evaluate level policies reproducibly: small models, bundled digits,
random faults.

An episode is recorded once (:func:`record`): a small model trains on scikit-learn's digits
with one injected :class:`~adaptive_kit.telemetry.faults.Fault` (or none), and every tensor the
telemetry could see is kept on the host. A policy is then played against the recording
(:func:`replay`): each step it picks levels, the step's tensors are aggregated at those levels by
the collector's own :func:`~adaptive_kit.telemetry.collector.aggregate`, the detectors read the
result, and the reward counts true and false alarms, bytes and analysis time. Replaying costs
no training, so a policy can learn from hundreds of episodes in seconds, and every policy is
judged on exactly the same runs.
"""
from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..anomaly import Alarm
from ..datasets import digits
from ..devices import seed_everything
from ..resources import ResourceSampler
from .collector import KINDS, Telemetry, TelemetryConfig, aggregate, materialise
from .control import Controller, StateTracker, grad_variance, level_of
from .detectors import DetectorSuite
from .faults import FAULT_KINDS, Fault, FaultInjector
from .policies import Policy, RewardWeights

MODELS: tuple[str, ...] = ("mlp", "cnn")


def build_model(name: str) -> nn.Module:
    """The episode models: ``mlp`` (64-64-32-10, ReLU) and ``cnn`` (two 3x3 convs on 8x8 digits).

    Raises:
        ValueError: unknown name.
    """
    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    if name == "cnn":
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))
    raise ValueError(f"build_model(name={name!r}): expected one of {MODELS}")


@dataclass(frozen=True)
class EpisodeSpec:
    model: str = "mlp"  # one of MODELS
    fault: Fault | None = None  # None: a clean run
    steps: int = 120  # training steps
    batch_size: int = 32  # examples per step
    lr: float = 0.05  # SGD learning rate
    seed: int = 0  # seeds the initialisation and the batch order

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"EpisodeSpec.model={self.model!r}: expected one of {MODELS}")
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EpisodeSpec.{name} must be an int >= 1, got {v!r}")
        if self.fault is not None and self.fault.step >= self.steps:
            raise ValueError(f"EpisodeSpec.fault.step={self.fault.step} is not before steps={self.steps}")

    @property
    def label(self) -> str:
        return f"{self.model}/{self.fault.kind if self.fault else 'clean'}/seed{self.seed}"


@dataclass
class Trace:
    """A recorded episode: every tensor at every step, the loss and the utilisation."""

    spec: EpisodeSpec
    param_layers: list[str]
    act_layers: list[str]
    relu_layers: list[str]
    values: list[dict[tuple[str, str], torch.Tensor]]  # per step: (kind, layer) -> flat values
    losses: np.ndarray  # (steps,)
    utilisation: np.ndarray  # (steps,) CPU utilisation in percent
    test_accuracy: float
    _raw_bytes: dict = field(default_factory=dict, repr=False)

    def raw_bytes(self, config: TelemetryConfig) -> np.ndarray:
        """Bytes per step that the always-raw plan sends under ``config`` (cached)."""
        key = (config.window, config.raw_cap)
        if key not in self._raw_bytes:
            out = np.zeros(len(self.values))
            for step in range(len(self.values)):
                items = [(k, n, "raw", [t]) for (k, n), t in self.values[step].items()]
                out[step] = sum(materialise(aggregate(step, items, config)).bytes.values())
            self._raw_bytes[key] = out
        return self._raw_bytes[key]


@dataclass
class Run:
    """A finished live run: its collector, detectors, controller (if a policy drove it) and scores."""

    spec: EpisodeSpec
    tel: Telemetry
    suite: DetectorSuite
    controller: Controller | None
    losses: np.ndarray  # (steps,) training loss per step
    test_accuracy: float


def run(spec: EpisodeSpec, levels: str | dict = "meso", *, policy: Policy | None = None,
        config: TelemetryConfig = TelemetryConfig(), on_record=None, progress: bool = False) -> Run:
    """Train ``spec``'s model live with telemetry, detectors and, if given, a policy setting levels.

    ``on_record(record, alarms, observations)`` is called for every step's :class:`StepRecord`
    once it is on the host, with the detectors' alarms and :class:`Observation` s (a panel
    streams its plots from here). Levels start at ``levels``; a ``policy``
    then sets them every step through a :class:`Controller`.
    """
    seed_everything(spec.seed)
    data = digits(seed=0)
    model = build_model(spec.model)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9)
    injector = FaultInjector(spec.fault, model, opt, n_classes=10)
    tel = Telemetry(model, levels, config=config)
    controller = Controller(tel, policy, steps_total=spec.steps) if policy is not None else None
    suite = controller.suite if controller is not None else DetectorSuite.for_telemetry(tel)
    inner = controller if controller is not None else suite

    def handle(record):
        alarms = inner(record)
        if on_record is not None:
            on_record(record, alarms, suite.last_observations)
        return alarms

    tel.on_record = handle
    g = torch.Generator().manual_seed(spec.seed)
    losses = torch.zeros(spec.steps)
    for step in tqdm(range(spec.steps), desc=spec.label, disable=not progress, leave=False):
        injector.before_step(step)
        idx = torch.randint(0, len(data.x_train), (spec.batch_size,), generator=g)
        x, y = injector.batch(step, data.x_train[idx], data.y_train[idx])
        with tel.step(step):
            loss = nn.functional.cross_entropy(model(x), y)
            tel.log_loss(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            injector.after_backward(step)
        opt.step()
        losses[step] = loss.detach()
    tel.close()
    with torch.no_grad():
        acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    return Run(spec, tel, suite, controller, losses.numpy(), acc)


def record(spec: EpisodeSpec) -> Trace:
    """Train ``spec``'s model with its fault and keep every tensor the telemetry could see."""
    sampler = ResourceSampler()
    values: list[dict[tuple[str, str], torch.Tensor]] = []
    util: list[float] = []

    def keep(record, _alarms, _obs) -> None:
        raw = record.batches["raw"]
        flat = torch.from_numpy(raw.column("values").values.to_numpy(zero_copy_only=False).copy())
        offsets = raw.column("values").offsets.to_numpy()
        names = zip(raw.column("kind").to_pylist(), raw.column("layer").to_pylist())
        values.append({key: flat[offsets[i]:offsets[i + 1]] for i, key in enumerate(names)})
        util.append(sampler.sample()["util_percent"][0])

    r = run(spec, "raw", config=TelemetryConfig(raw_cap=2**31 - 1), on_record=keep)
    r.tel.records.clear()
    return Trace(spec, list(r.tel.param_layers), list(r.tel.layers["act"]), list(r.tel.relu_layers),
                 values, r.losses, np.array(util), r.test_accuracy)


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
    latency_ms: float  # mean analysis time per step
    reward: float
    level_steps: dict[str, int]  # how many (kind x step) slots used each level

    @property
    def detected(self) -> bool:
        return self.detection_step is not None

    @property
    def delay(self) -> int | None:
        return None if self.detection_step is None else self.detection_step - self.fault_step


def replay(trace: Trace, policy: Policy, *, config: TelemetryConfig = TelemetryConfig(),
           weights: RewardWeights = RewardWeights(), learn: bool = False) -> EpisodeResult:
    """Play ``policy`` against a recorded episode; learn from the rewards if ``learn``."""
    suite = DetectorSuite.standard(trace.param_layers, trace.relu_layers)
    tracker = StateTracker(len(trace.values))
    raw = trace.raw_bytes(config)
    fault = trace.spec.fault
    policy.reset()
    state = tracker.state
    true = false = 0
    detection = None
    total_bytes = reward = 0.0
    level_steps = {lv: 0 for lv in ("off", "macro", "meso", "micro", "raw")}
    for step, tensors in enumerate(trace.values):
        plan = policy.act(state)
        items = []
        for (kind, layer), t in tensors.items():
            level = level_of(plan, kind, layer)
            if level != "off":
                items.append((kind, layer, level, [t]))
        for kind in KINDS:
            level_steps[plan["kinds"][kind]] += 1
        rec = materialise(aggregate(step, items, config, torch.tensor(trace.losses[step])))
        alarms = suite(rec)
        sent = sum(rec.bytes.values())
        total_bytes += sent
        t_ok = [a for a in alarms if fault is not None and step >= fault.step]
        true += len(t_ok)
        false += len(alarms) - len(t_ok)
        if t_ok and detection is None:
            detection = step
        rows = sum(b.num_rows for b in rec.batches.values())
        values = sum(len(b.column("values").values) for lv, b in rec.batches.items() if lv in ("raw", "micro"))
        r = weights.reward(len(t_ok), len(alarms) - len(t_ok), sent / raw[step], weights.analysis_ms(rows, values))
        reward += r
        next_state = tracker.update(step, alarms, grad_variance(suite), rec.loss, trace.utilisation[step])
        if learn:
            policy.learn(state, plan, r, next_state)
        state = next_state
    return EpisodeResult(trace.spec.label, policy.name, fault.kind if fault else "clean",
                         fault.step if fault else None, suite.alarms, true, false, detection,
                         total_bytes, float(raw.sum()), 1e3 * statistics.fmean(suite.latency_s), reward,
                         level_steps)


def fault_suite(models=MODELS, kinds=FAULT_KINDS, seeds=(0, 1), steps: int = 120,
                clean_per_seed: int = 1) -> list[EpisodeSpec]:
    """Every model x fault kind x seed, the fault at a seeded random step in the middle half,
    plus ``clean_per_seed`` clean runs per model and seed."""
    specs = []
    for model in models:
        for seed in seeds:
            rng = random.Random(f"{model}-{seed}")
            for kind in kinds:
                at = rng.randrange(steps // 4, 3 * steps // 4)
                specs.append(EpisodeSpec(model, Fault(kind, at, seed=seed), steps, seed=seed))
            for c in range(clean_per_seed):
                specs.append(EpisodeSpec(model, None, steps, seed=seed + 1000 * c))
    return specs


def record_all(specs: list[EpisodeSpec], progress: bool = True) -> list[Trace]:
    """Record every spec, with a progress bar."""
    return [record(s) for s in tqdm(specs, desc="record episodes", disable=not progress, leave=False)]


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
    fraction of clean episodes with any alarm, median detection delay, and bytes against raw."""
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
        "bytes_per_step": sum(r.bytes for r in results) / max(1, sum(sum(r.level_steps.values()) // 3 for r in results)),
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


__all__ = ["MODELS", "EpisodeResult", "EpisodeSpec", "Run", "Trace", "run", "build_model", "evaluate", "fault_suite",
           "record", "record_all", "replay", "results_frame", "summarize", "train"]

