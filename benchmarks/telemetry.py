"""Telemetry granularity: overhead per training step against four anchors, and fault detection
of fixed levels against the rule policy and two learned policies.

Part A (overhead). On four models (the two episode models, ``cnn28`` and ``resnet_bn``, a
ResNet-style CNN with BatchNorm and in-place ReLUs), each method trains its own copy of the same initial model
on the same sequence of batches (SGD, lr 0.01), and the script times it in blocks of consecutive
steps (so a schedule such as ``every=10`` is charged its mean cost), methods interleaved and
rotated, median over blocks after warm-up. Methods:

  none                forward + backward + SGD, nothing else (the denominator of every ratio)
  ours:off            ``Telemetry(model, "off")``: hooks in place, only the logged loss is sent
  ours:<level>        ``Telemetry(model, level)`` on grads + weights + acts, every step
  ours:meso/every10   the same at meso with ``TelemetryConfig(every=10)``
  rule:steady         ``Controller(tel, RulePolicy())``: detectors + policy every step; no fault
                      is injected, so it stays at macro unless a detector fires
  rule:escalated      the same loop with every layer escalated to raw (``RulePolicy(base="raw")``)
  naive-item          forward hooks + a loop computing 7 statistics per grad / weight / act
                      tensor with one ``.item()`` each, every step
  wandb-style         ``watch(log="all")`` clone: every grad and weight cloned, copied to the
                      host (``.detach().cpu()``) and histogrammed there (``torch.histc``, 64 bins);
                      on a CPU the copy to the host is the clone itself
  tensorboard         ``SummaryWriter.add_histogram`` for every grad and weight, every step
  cockpit:economy     Cockpit's ``economy`` preset on a BackPACK-extended copy of the model

Bytes per step: ours = Arrow IPC bytes (``tel.bytes`` / steps); tensorboard = event-file bytes
/ steps; wandb-style = what it would upload (64 float32 bins + 2 float64 edges per tensor);
naive-item = 8 bytes per scalar. The anchors are optional: one that does not install or import
is printed as ``unavailable: <reason>`` and the run goes on.

Part B (detection). ``episodes.fault_suite`` over both episode models, every fault kind and
several seeds, plus clean runs (their first clean run per seed has the same seed as the faulty
runs: their clean twin). Every trace is recorded once. For each fault kind the script reports
how much the fault changes training: |mean loss after the fault step - the same for the clean
twin| over the seed-to-seed spread of that mean among clean runs of the same model. Then the
traces are split by seed into train / test; ``QLearningPolicy`` and ``LinUCBPolicy`` are trained
on the train traces (``episodes.train``) and every policy is evaluated on the test traces
(``episodes.evaluate`` + ``summarize``): fixed levels, the rule policy and both learners. The
targets of the telemetry issue are checked and printed as met / missed.

Run from the repository root::

    .venv/bin/python benchmarks/telemetry.py                  # full run, about 20 min on 2 CPU cores
    .venv/bin/python benchmarks/telemetry.py --quick          # under 3 minutes
    .venv/bin/python benchmarks/telemetry.py --json out.json  # also write every table + machine
    .venv/bin/python benchmarks/telemetry.py --threads 0      # torch's default thread count (CPU)
    .venv/bin/python benchmarks/telemetry.py --part A         # overhead only (--part B: detection only)

The ladder targets (Part A): on ``cnn28`` and ``resnet_bn``, grads + weights + acts every step,
macro <= 1.03x, meso <= 1.05x, micro <= 1.15x of a plain step, and off < macro < meso < micro.
"""
from __future__ import annotations

import copy
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import torch
from machine import Clock, describe, epilogue, parse_args
from torch import nn

from adaptive_kit import pick_device, seed_everything
from adaptive_kit import telemetry as tm
from adaptive_kit.datasets import digits
from adaptive_kit.records import Sink
from adaptive_kit.telemetry import (
    ACTIVATION_TYPES,
    FAULT_KINDS,
    QUIET_KINDS,
    Controller,
    LinUCBPolicy,
    QLearningPolicy,
    RulePolicy,
    StaticPolicy,
    Telemetry,
    TelemetryConfig,
)

ce = nn.functional.cross_entropy
LR = 0.01
BATCHES = 8  # distinct batches per model, cycled


# ================================================================================ Part A
@dataclass
class Workload:
    name: str
    model: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    data: str


def cnn28() -> nn.Module:
    return nn.Sequential(  # 1x28x28 input, the CNN of benchmarks/stats.py
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 14, 14)
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 7, 7)
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )


class BasicBlock(nn.Module):
    """ResNet basic block (torchvision's layout): conv-BN-ReLU-conv-BN + shortcut, in-place ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.down(x))


def resnet_bn() -> nn.Module:
    """A ResNet-style CNN with BatchNorm for 3x32x32 inputs (stem + 3 stages of one basic block)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),  # (B, 16, 32, 32)
        BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2),  # (B, 64, 8, 8)
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def build_workloads(device: torch.device) -> list[Workload]:
    seed_everything(0)
    data = digits(seed=0)
    g = torch.Generator().manual_seed(0)
    idx = [torch.randint(0, len(data.x_train), (32,), generator=g) for _ in range(BATCHES)]
    dig = [(data.x_train[i].to(device), data.y_train[i].to(device)) for i in idx]
    rnd = [(torch.randn(32, 1, 28, 28, generator=g).to(device),
            torch.randint(0, 10, (32,), generator=g).to(device)) for _ in range(BATCHES)]
    rgb = [(torch.randn(32, 3, 32, 32, generator=g).to(device),
            torch.randint(0, 10, (32,), generator=g).to(device)) for _ in range(BATCHES)]
    return [
        Workload("mlp", tm.build_model("mlp").to(device), dig, "digits 8x8, batch 32"),
        Workload("cnn", tm.build_model("cnn").to(device), dig, "digits 8x8, batch 32"),
        Workload("cnn28", cnn28().to(device), rnd, "random 1x28x28, batch 32"),
        Workload("resnet_bn", resnet_bn().to(device), rgb, "random 3x32x32, batch 32"),
    ]


class CountingSink(Sink):
    """Counts Arrow IPC bytes like MemorySink but keeps nothing (bounded memory while timing)."""

    def _send(self, batch: pa.RecordBatch, meta: dict[str, str]) -> int:
        return pa.ipc.get_record_batch_size(batch)


class Unavailable(Exception):
    """An anchor that cannot run here; the message is the reason."""


class Method:
    """One way of training with (or without) telemetry: ``step(x, y)`` on its own model copy."""

    tensors = "-"

    def __init__(self, model: nn.Module, steps_total: int) -> None:
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=LR)
        self.i = 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad()
        ce(self.model(x), y).backward()
        self.opt.step()
        self.i += 1

    def close(self) -> dict:
        """Bytes per step and notes."""
        return {}


class Ours(Method):
    tensors = "g+w+a"

    def __init__(self, model, steps_total, level="meso", config=TelemetryConfig(), policy=None):
        super().__init__(model, steps_total)
        self.base = level
        self.tel = Telemetry(model, level, config=config, sink=CountingSink())
        self.tel.keep_records = False
        self.ctrl = Controller(self.tel, policy, steps_total=steps_total) if policy is not None else None

    def step(self, x, y):
        self.opt.zero_grad()
        with self.tel.step(self.i):
            loss = ce(self.model(x), y)
            self.tel.log_loss(loss)
            loss.backward()
        self.opt.step()
        self.i += 1

    def close(self):
        self.tel.close()
        out = {"bytes_per_step": sum(self.tel.bytes.values()) / max(self.i, 1)}
        if self.ctrl is not None:
            plans = self.ctrl.plans[1:]  # the first is the initial plan, before any step
            fine = sum(1 for p in plans if set(p["kinds"].values()) != {self.base} or p.get("layers"))
            out["note"] = (f"{len(self.ctrl.suite.alarms)} alarms; plan off base on "
                           f"{100 * fine / max(len(plans), 1):.0f}% of steps")
        return out


def _act_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs Telemetry treats as activations by default."""
    return [m for m in model.modules()
            if any(True for _ in m.parameters(recurse=False)) or isinstance(m, ACTIVATION_TYPES)]


class NaiveItem(Method):
    """Forward hooks keep activations; after backward, 7 statistics per tensor, one .item() each."""

    tensors = "g+w+a"

    def __init__(self, model, steps_total):
        super().__init__(model, steps_total)
        self.acts: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in _act_modules(model)]
        self.scalars = 0

    def _hook(self, _m, _inp, out):
        if isinstance(out, torch.Tensor):
            self.acts.append(out.detach())

    @staticmethod
    def _stats(t: torch.Tensor) -> list[float]:
        t = t.detach().float()
        return [t.mean().item(), t.std().item(), t.min().item(), t.max().item(), t.norm().item(),
                (~torch.isfinite(t)).sum().item(), (t == 0).float().mean().item()]

    def step(self, x, y):
        self.opt.zero_grad()
        self.acts.clear()
        ce(self.model(x), y).backward()
        values = []
        for p in self.model.parameters():
            values += self._stats(p.grad) + self._stats(p)
        for a in self.acts:
            values += self._stats(a)
        self.scalars = len(values)
        self.opt.step()
        self.i += 1

    def close(self):
        for h in self.handles:
            h.remove()
        return {"bytes_per_step": 8.0 * self.scalars}


class WandbStyle(Method):
    """wandb ``watch(log="all")`` every step: clone, copy to host, 64-bin histogram on the host."""

    tensors = "g+w"

    def step(self, x, y):
        self.opt.zero_grad()
        ce(self.model(x), y).backward()
        self.n = 0
        for p in self.model.parameters():
            for t in (p.grad, p):
                host = t.detach().clone().cpu().float()
                torch.histc(host, bins=64)  # min = max = 0: the data's own range
                self.n += 1
        self.opt.step()
        self.i += 1

    def close(self):
        return {"bytes_per_step": self.n * (64 * 4 + 2 * 8.0)}


class TensorBoard(Method):
    """``SummaryWriter.add_histogram`` for every grad and weight, every step, to a temp dir."""

    tensors = "g+w"

    def __init__(self, model, steps_total):
        super().__init__(model, steps_total)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # noqa: BLE001 - any import failure makes the anchor unavailable
            raise Unavailable(f"torch.utils.tensorboard: {type(e).__name__}: {e}") from e
        self.dir = tempfile.mkdtemp(prefix="tb-bench-")
        self.writer = SummaryWriter(self.dir)
        self.names = [n for n, _ in model.named_parameters()]

    def step(self, x, y):
        self.opt.zero_grad()
        ce(self.model(x), y).backward()
        for n, p in zip(self.names, self.model.parameters()):
            self.writer.add_histogram(f"grad/{n}", p.grad, self.i)
            self.writer.add_histogram(f"weight/{n}", p, self.i)
        self.opt.step()
        self.i += 1

    def close(self):
        self.writer.close()
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(self.dir) for f in fs)
        shutil.rmtree(self.dir, ignore_errors=True)
        return {"bytes_per_step": size / max(self.i, 1)}


def _import_cockpit():
    """Import Cockpit; its ``__init__`` needs ``pkg_resources``, which setuptools >= 81 dropped:
    a two-name shim (it only reads its own version number) stands in when it is missing."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")

        class DistributionNotFound(Exception):
            pass

        def get_distribution(name):
            raise DistributionNotFound(name)

        shim.DistributionNotFound, shim.get_distribution = DistributionNotFound, get_distribution
        sys.modules["pkg_resources"] = shim
    try:
        from backpack import extend
        from cockpit import Cockpit
        from cockpit.utils.configuration import configuration
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"import cockpit/backpack: {type(e).__name__}: {e}") from e
    return extend, Cockpit, configuration


class CockpitEconomy(Method):
    """Cockpit's ``economy`` preset, following its README: BackPACK-extended model and loss."""

    tensors = "g+w"

    def __init__(self, model, steps_total):
        extend, Cockpit, configuration = _import_cockpit()
        import warnings
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        model = extend(model)
        super().__init__(model, steps_total)
        self.loss_fn = extend(nn.CrossEntropyLoss(reduction="mean"))
        self.individual = nn.CrossEntropyLoss(reduction="none")
        self.ck = Cockpit(model.parameters(), quantities=configuration("economy"))

    def step(self, x, y):
        self.opt.zero_grad()
        out = self.model(x)
        loss = self.loss_fn(out, y)
        losses = self.individual(out, y)
        info = {"batch_size": x.shape[0], "individual_losses": losses, "loss": loss, "optimizer": self.opt}
        with self.ck(self.i, info=info):
            loss.backward(create_graph=self.ck.create_graph(self.i))
        self.opt.step()
        self.i += 1

    def close(self):
        output = self.ck.get_output()  # {step: {quantity: value}}
        quantities = {q for per_step in output.values() if isinstance(per_step, dict) for q in per_step}
        if not quantities:
            raise Unavailable("ran, but tracked no quantity")
        return {"note": f"{len(quantities)} quantities on {len(output)} steps"}


def method_factories() -> dict[str, Callable[[nn.Module, int], Method]]:
    return {
        "none": Method,
        "ours:off": lambda m, n: Ours(m, n, "off"),
        "ours:macro": lambda m, n: Ours(m, n, "macro"),
        "ours:meso": lambda m, n: Ours(m, n, "meso"),
        "ours:micro": lambda m, n: Ours(m, n, "micro"),
        "ours:raw": lambda m, n: Ours(m, n, "raw"),
        "ours:meso/every10": lambda m, n: Ours(m, n, "meso", TelemetryConfig(every=10)),
        "rule:steady": lambda m, n: Ours(m, n, "macro", policy=RulePolicy()),
        "rule:escalated": lambda m, n: Ours(m, n, "raw", policy=RulePolicy(base="raw")),
        "naive-item": NaiveItem,
        "wandb-style": WandbStyle,
        "tensorboard": TensorBoard,
        "cockpit:economy": CockpitEconomy,
    }


def _round(v: float) -> float:
    return v if math.isnan(v) else round(v)


def bench_overhead(w: Workload, block: int, warmup: int, repeats: int) -> list[dict]:
    steps_total = block * (warmup + repeats)
    methods: dict[str, Method] = {}
    failed: dict[str, str] = {}
    for name, make in method_factories().items():
        try:
            methods[name] = make(copy.deepcopy(w.model), steps_total)
            methods[name].step(*w.batches[0])  # first step outside the clock (lazy init)
        except Unavailable as e:
            failed[name] = str(e)
        except Exception as e:  # noqa: BLE001 - an anchor that breaks here is reported, not fatal
            failed[name] = f"{type(e).__name__}: {e}"
    wall: dict[str, list[float]] = {n: [] for n in methods}
    cpu: dict[str, list[float]] = {n: [] for n in methods}
    names = list(methods)
    for r in range(warmup + repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order
            m = methods[name]
            try:
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(block):
                    m.step(*w.batches[m.i % len(w.batches)])
                t1, c1 = time.perf_counter(), time.process_time()
            except Exception as e:  # noqa: BLE001
                failed[name] = f"failed while timing: {type(e).__name__}: {e}"
                names.remove(name)
                del methods[name]
                continue
            if r >= warmup:
                wall[name].append((t1 - t0) / block)
                cpu[name].append((c1 - c0) / block)
    base_wall, base_cpu = statistics.median(wall["none"]), statistics.median(cpu["none"])
    n_params = sum(p.numel() for p in w.model.parameters())
    rows = []
    for name in method_factories():
        row = {"model": w.name, "params": n_params, "method": name}
        if name in failed:
            row.update(tensors="", wall_ms=math.nan, x_step=math.nan, cpu_ms=math.nan, x_cpu=math.nan,
                       bytes_per_step=math.nan, note=f"unavailable: {failed[name]}")
            rows.append(row)
            continue
        try:
            extra = methods[name].close()
        except Unavailable as e:
            extra = {"note": f"unavailable: {e}"}
        wm, cm = statistics.median(wall[name]), statistics.median(cpu[name])
        row.update(tensors=methods[name].tensors, wall_ms=round(wm * 1e3, 3),
                   x_step=round(wm / base_wall, 2), cpu_ms=round(cm * 1e3, 3), x_cpu=round(cm / base_cpu, 2),
                   bytes_per_step=_round(extra.get("bytes_per_step", math.nan)), note=extra.get("note", ""))
        if row["note"].startswith("unavailable"):
            for k in ("wall_ms", "x_step", "cpu_ms", "x_cpu"):
                row[k] = math.nan
        rows.append(row)
    return rows


def bytes_per_level(w: Workload, steps: int = 20) -> dict:
    """Arrow bytes per step of each level on grads + weights + acts (exact, from ``tel.bytes``)."""
    out = {"model": w.name}
    for level in ("macro", "meso", "micro", "raw"):
        m = Ours(copy.deepcopy(w.model), steps, level)
        for i in range(steps):
            m.step(*w.batches[i % len(w.batches)])
        out[level] = round(m.close()["bytes_per_step"])
    out["raw/meso"] = round(out["raw"] / out["meso"], 1)
    return out


# ================================================================================ Part B
def _deep_tanh() -> nn.Module:
    """Unseen by the policies: a deep tanh MLP (naturally imbalanced gradients, no ReLU)."""
    return nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 64), nn.Tanh(), nn.Linear(64, 48),
                         nn.Tanh(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 10))


def _conv_bn() -> nn.Module:
    """Unseen by the policies: a conv net with BatchNorm (normalisation hides scale faults)."""
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12),
                         nn.ReLU(), nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


UNSEEN = (tm.Workload("deep_tanh", _deep_tanh), tm.Workload("conv_bn", _conv_bn))


def base_seed(spec: tm.EpisodeSpec) -> int:
    return spec.seed % 1000  # fault_suite's clean runs use seed + 1000 * c


def fmt(v):
    return round(v, 4) if isinstance(v, float) else v


def detection(args, quick: bool) -> dict:
    """Record the suite, train the learned policies on the kit's models (train seeds), evaluate
    every policy on held-out seeds of the kit's models and on models the policies never saw."""
    seeds = (0, 1) if quick else (0, 1, 2, 3)
    train_seeds = {0} if quick else {0, 1}
    steps = 80 if quick else 120
    clean_per_seed = 2 if quick else 3
    episodes = 40 if quick else 250
    unseen = () if quick else UNSEEN
    specs = tm.fault_suite(models=("mlp", "cnn"), kinds=FAULT_KINDS, seeds=seeds, steps=steps,
                           clean_per_seed=clean_per_seed)
    test_seeds = sorted(set(seeds) - train_seeds)
    specs += tm.fault_suite(models=unseen, kinds=FAULT_KINDS, seeds=test_seeds, steps=steps,
                            clean_per_seed=clean_per_seed)
    n_fault = sum(s.fault is not None for s in specs)
    print(f"\n== Part B: detection ==\nfault suite: models mlp, cnn (seeds {list(seeds)}) and unseen "
          f"{[w.name for w in unseen] or 'none'} (seeds {test_seeds}) x {len(FAULT_KINDS)} fault kinds "
          f"({len(QUIET_KINDS)} quiet) = {n_fault} faulty + {len(specs) - n_fault} clean episodes of {steps} steps")
    t0 = time.perf_counter()
    traces = tm.record_all(specs, progress=True)
    t_record = time.perf_counter() - t0
    print(f"recorded {len(traces)} traces in {t_record:.0f} s")
    kit = {"mlp", "cnn"}
    train_tr = [t for t in traces if t.spec.workload.name in kit and base_seed(t.spec) in train_seeds]
    test_tr = [t for t in traces if t not in train_tr]
    print(f"train: mlp, cnn seeds {sorted(train_seeds)} ({len(train_tr)} traces); test: everything else "
          f"({len(test_tr)} traces, {sum(t.spec.fault is None for t in test_tr)} clean)")
    q, lin = QLearningPolicy(seed=0), LinUCBPolicy()
    train_s = {}
    for p in (q, lin):
        t0 = time.perf_counter()
        tm.train(p, train_tr, episodes, seed=0, progress=True)
        train_s[p.name] = time.perf_counter() - t0
    print("training: " + ", ".join(f"{k} {episodes} episodes in {v:.1f} s" for k, v in train_s.items()))

    policies = [StaticPolicy("macro"), StaticPolicy("meso"), StaticPolicy("micro"), StaticPolicy("raw"),
                RulePolicy(), q, lin]
    rows, frames, false_by = [], [], {}
    t0 = time.perf_counter()
    for p in policies:
        res = tm.evaluate(p, test_tr)
        false_by[p.name] = {}
        for r in res:
            for a in r.alarms:
                if r.fault == "clean" or a.step < r.fault_step:
                    false_by[p.name][a.detector] = false_by[p.name].get(a.detector, 0) + 1
        rows.append({"policy": p.name, **{k: fmt(v) for k, v in tm.summarize(res).items()}})
        frame = tm.results_frame(res)
        frame["model"] = [r.label.split("/")[0] for r in res]
        frames.append(frame)
    t_eval = time.perf_counter() - t0
    summary = pd.DataFrame(rows)
    results = pd.concat(frames, ignore_index=True)
    print(f"\npolicies on the test traces (evaluated in {t_eval:.0f} s)")
    print(summary.to_string(index=False))
    print("recall: faulty episodes with a true alarm (at or after the fault step); clean_false_alarm_rate: "
          "clean episodes with any alarm; median_delay: steps from fault to first true alarm; bytes_vs_raw / "
          "bytes_vs_macro: Arrow bytes against always-raw (raw_cap 4096) and static macro on the same episodes")
    names = [p.name for p in policies]
    faulty = results[results.fault != "clean"]
    recall_kind = faulty.groupby(["fault", "policy"], sort=False)["detected"].mean().unstack("policy")[names]
    recall_kind = recall_kind.reindex([k for k in FAULT_KINDS if k in recall_kind.index]).round(2)
    print("\nrecall per fault kind (test traces; * quiet kinds)")
    print(recall_kind.rename(index=lambda k: k + (" *" if k in QUIET_KINDS else "")).to_string())
    delay_kind = faulty.groupby(["fault", "policy"], sort=False)["delay"].median().unstack("policy")[names]
    delay_kind = delay_kind.reindex(recall_kind.index)
    print("\nmedian detection delay per fault kind, steps (NaN: never detected)")
    print(delay_kind.to_string())
    by_model = faulty.groupby(["model", "policy"], sort=False)["detected"].mean().unstack("policy")[names].round(2)
    print("\nrecall per model (deep_tanh and conv_bn never seen in training)")
    print(by_model.to_string())
    false_tab = pd.DataFrame(false_by).reindex(columns=names).fillna(0).astype(int)
    false_tab.index.name = "detector"
    print("\nfalse alarms by detector (clean episodes, or before the fault step)")
    print(false_tab.to_string() if len(false_tab) else "none")

    by = {r["policy"]: r for r in rows}
    best = max((q.name, lin.name), key=lambda n: (by[n]["recall"] - by[n]["clean_false_alarm_rate"],
                                                 -by[n]["bytes_vs_macro"]))
    targets = [
        {"who": "suite", "target": "static macro recall <= 0.7", "value": by["static:macro"]["recall"],
         "met": by["static:macro"]["recall"] <= 0.7},
        {"who": "suite", "target": "static raw recall >= 0.95", "value": by["static:raw"]["recall"],
         "met": by["static:raw"]["recall"] >= 0.95},
    ]
    for name in ("rule", best):
        s_, worst = by[name], delay_kind[name].max()
        targets += [{"who": name, "target": t, "value": v, "met": ok} for t, v, ok in (
            ("recall >= 0.95", s_["recall"], s_["recall"] >= 0.95),
            ("clean false-alarm rate <= 5 %", s_["clean_false_alarm_rate"], s_["clean_false_alarm_rate"] <= 0.05),
            ("bytes <= 1.5x static macro", s_["bytes_vs_macro"], s_["bytes_vs_macro"] <= 1.5),
            ("bytes <= 10 % of always-raw", s_["bytes_vs_raw"], s_["bytes_vs_raw"] <= 0.10),
            ("median delay <= 10 steps for every kind", fmt(float(worst)), bool(worst <= 10)),
        )]
    for name, secs in train_s.items():
        targets.append({"who": name, "target": f"{episodes} training episodes < 60 s", "value": round(secs, 1),
                        "met": secs < 60 * episodes / 250})
    targets = pd.DataFrame(targets)
    targets["met"] = targets["met"].map({True: "met", False: "MISSED"})
    print(f"\nissue targets (best learned policy: {best}; training time scaled to 250 episodes in quick mode)")
    print(targets.to_string(index=False))
    return {"settings": {"seeds": list(seeds), "train_seeds": sorted(train_seeds), "steps": steps,
                         "clean_per_seed": clean_per_seed, "episodes": episodes,
                         "unseen": [w.name for w in unseen], "record_s": round(t_record, 1),
                         "train_s": {k: round(v, 1) for k, v in train_s.items()}, "eval_s": round(t_eval, 1)},
            "policies": rows, "recall_per_fault": recall_kind.reset_index().to_dict(orient="records"),
            "delay_per_fault": delay_kind.reset_index().to_dict(orient="records"),
            "recall_per_model": by_model.reset_index().to_dict(orient="records"),
            "false_alarms_by_detector": false_tab.reset_index().to_dict(orient="records"),
            "targets": targets.to_dict(orient="records")}


# ==================================================================================== main


LADDER = (("ours:off", None), ("ours:macro", 1.03), ("ours:meso", 1.05), ("ours:micro", 1.15))


def overhead_targets(table: pd.DataFrame) -> pd.DataFrame:
    """The cost ladder on cnn28 and resnet_bn (grads + weights + acts every step): each level
    within its limit of a plain step, and off < macro < meso < micro; plus the rule policy."""
    rows = []
    for model in ("cnn28", "resnet_bn"):
        t = table[table.model == model].set_index("method")
        x = {m: (t.loc[m, "x_step"] if m in t.index else math.nan) for m, _ in LADDER}
        for method, limit in LADDER[1:]:
            v = x[method]
            rows.append({"model": model, "target": f"{method} <= {limit}x", "x_step": v,
                         "met": "met" if v <= limit else f"MISSED by {v - limit:.2f}x"})
        seq = [x[m] for m, _ in LADDER]
        ok = all(a < b for a, b in zip(seq, seq[1:]))
        rows.append({"model": model, "target": "ladder off < macro < meso < micro",
                     "x_step": " < ".join(f"{v:.2f}" for v in seq), "met": "met" if ok else "MISSED"})
        for method, limit, label in (("rule:steady", 1.05, "steady (rule policy)"),
                                     ("rule:escalated", 1.25, "escalated (rule, all raw)")):
            v = t.loc[method, "x_step"] if method in t.index else math.nan
            rows.append({"model": model, "target": f"{label} <= {limit}x", "x_step": v,
                         "met": "met" if v <= limit else f"MISSED by {v - limit:.2f}x"})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    part = "AB"
    if "--part" in argv:  # --part A: overhead only; --part B: detection only
        i = argv.index("--part")
        part = argv[i + 1].upper() if i + 1 < len(argv) else ""
        if part not in ("A", "B"):
            raise SystemExit(f"--part must be A or B, got {part!r}")
        del argv[i:i + 2]
    args = parse_args(__doc__.splitlines()[0], "fewer repeats, seeds and steps (under 3 min)", argv)
    block, warmup, repeats = (5, 1, 4) if args.quick else (10, 2, 20)
    device = pick_device()
    info = describe(device)
    print(f"device={device} cpu={info['cpu']!r} cores={info['cpu_count']} threads={info['torch_threads']} "
          f"torch={info['torch']} mode={'quick' if args.quick else 'full'} "
          f"load average at start={os.getloadavg()[0]:.2f}")
    clock = Clock()

    overhead, levels, ot = pd.DataFrame(), [], pd.DataFrame()
    if "A" in part:
        with clock.section("part A"):
            overhead, levels, ot = overhead_part(block, warmup, repeats, device, args.quick)
    det = {}
    if "B" in part:
        with clock.section("part B"):
            det = detection(args, args.quick)
    out = {"machine": info, "mode": "quick" if args.quick else "full", "part": part,
           "overhead_settings": {"block": block, "warmup": warmup, "repeats": repeats, "lr": LR},
           "overhead": overhead.to_dict(orient="records"), "bytes_per_level": levels,
           "overhead_targets": ot.to_dict(orient="records"), "detection": det}
    return epilogue(args, out, clock)


def overhead_part(block: int, warmup: int, repeats: int, device: torch.device, quick: bool):
    print(f"\n== Part A: overhead per training step ({repeats} blocks of {block} steps after {warmup} "
          f"warm-up blocks, methods interleaved) ==")
    rows, levels = [], []
    for w in build_workloads(device):
        rows.extend(bench_overhead(w, block, warmup, repeats))
        levels.append(bytes_per_level(w, 10 if quick else 20))
    overhead = pd.DataFrame(rows)
    with pd.option_context("display.max_colwidth", 70, "display.width", 250):
        print(overhead.to_string(index=False))
    print("wall_ms / cpu_ms: median wall-clock / process-CPU time per step; x_step / x_cpu: the same over "
          "'none'; tensors: g = grads, w = weights, a = activations")
    lv = pd.DataFrame(levels)
    print("\nArrow bytes per step at each level (grads + weights + acts; raw capped at 4096 values per "
          "kind x layer)")
    print(lv.to_string(index=False))
    ot = overhead_targets(overhead)
    print("\noverhead targets of the issue (x_step)")
    print(ot.to_string(index=False))
    return overhead, levels, ot


if __name__ == "__main__":
    main()
