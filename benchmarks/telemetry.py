"""Telemetry granularity: overhead per training step against four anchors, and fault detection
of fixed levels against the rule policy and two learned policies.

Part A (overhead). On three models, each method trains its own copy of the same initial model
on the same sequence of batches (SGD, lr 0.01), and the script times it in blocks of consecutive
steps (so a schedule such as ``every=10`` is charged its mean cost), methods interleaved and
rotated, median over blocks after warm-up. Methods:

  none                forward + backward + SGD, nothing else (the denominator of every ratio)
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

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from machine import describe, parse_args, write_json
from torch import nn

from adaptive_kit import pick_device, seed_everything
from adaptive_kit.datasets import digits
from adaptive_kit.records import Sink
from adaptive_kit.telemetry import (
    FAULT_KINDS,
    Controller,
    LinUCBPolicy,
    QLearningPolicy,
    RulePolicy,
    StaticPolicy,
    Telemetry,
    TelemetryConfig,
)
from adaptive_kit.telemetry import episodes as ep
from adaptive_kit.telemetry.collector import ACTIVATION_TYPES, TELEMETRY_SCHEMA

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


def build_workloads(device: torch.device) -> list[Workload]:
    seed_everything(0)
    data = digits(seed=0)
    g = torch.Generator().manual_seed(0)
    idx = [torch.randint(0, len(data.x_train), (32,), generator=g) for _ in range(BATCHES)]
    dig = [(data.x_train[i].to(device), data.y_train[i].to(device)) for i in idx]
    rnd = [(torch.randn(32, 1, 28, 28, generator=g).to(device),
            torch.randint(0, 10, (32,), generator=g).to(device)) for _ in range(BATCHES)]
    return [
        Workload("mlp", ep.build_model("mlp").to(device), dig, "digits 8x8, batch 32"),
        Workload("cnn", ep.build_model("cnn").to(device), dig, "digits 8x8, batch 32"),
        Workload("cnn28", cnn28().to(device), rnd, "random 1x28x28, batch 32"),
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
def base_seed(spec: ep.EpisodeSpec) -> int:
    return spec.seed % 1000  # fault_suite's clean runs use seed + 1000 * c


def build_suite(seeds: tuple[int, ...], steps: int, clean_per_seed: int) -> list[ep.EpisodeSpec]:
    specs = ep.fault_suite(models=("mlp", "cnn"), kinds=FAULT_KINDS, seeds=seeds, steps=steps,
                           clean_per_seed=clean_per_seed)
    have = {(s.model, s.seed) for s in specs if s.fault is None}
    for s in list(specs):  # every faulty run needs a clean twin with the same model and seed
        if s.fault is not None and (s.model, s.seed) not in have:
            specs.append(ep.EpisodeSpec(s.model, None, steps, seed=s.seed))
            have.add((s.model, s.seed))
    return specs


def fault_effects(traces: list[ep.Trace]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per faulty episode and per fault kind: how far the loss after the fault step departs
    from the clean twin's, in units of the clean seed-to-seed spread of that mean."""
    clean = [t for t in traces if t.spec.fault is None]
    twins = {(t.spec.model, t.spec.seed): t for t in clean}
    rows = []
    for t in traces:
        f = t.spec.fault
        if f is None:
            continue
        twin = twins[(t.spec.model, t.spec.seed)]
        same_before = bool(np.array_equal(t.losses[:f.step], twin.losses[:f.step]))
        after, twin_after = t.losses[f.step:], twin.losses[f.step:]
        spread = float(np.std([c.losses[f.step:].mean() for c in clean if c.spec.model == t.spec.model], ddof=1))
        nonfinite = float(np.mean(~np.isfinite(after)))
        delta = float(after.mean() - twin_after.mean()) if nonfinite == 0 else math.inf
        effect = abs(delta) / spread if spread > 0 else math.inf
        rows.append({"episode": t.spec.label, "fault": f.kind, "model": t.spec.model, "seed": t.spec.seed,
                     "fault_step": f.step, "twin_identical_before": same_before, "d_loss": delta,
                     "spread": spread, "effect": effect, "nonfinite_frac": nonfinite,
                     "d_acc": t.test_accuracy - twin.test_accuracy})
    per = pd.DataFrame(rows)
    kinds = []
    for kind, g in per.groupby("fault", sort=False):
        kinds.append({
            "fault": kind, "episodes": len(g),
            "changed": f"{int((g.effect >= 2).sum())}/{len(g)}",
            "median_effect": round(float(g.effect.median()), 1),
            "min_effect": round(float(g.effect.min()), 1),
            "median_d_loss": round(float(g.d_loss.median()), 3) if np.isfinite(g.d_loss).all() else "non-finite",
            "mean_d_acc": round(float(g.d_acc.mean()), 3),
            "flag": "" if (g.effect >= 2).all() else "does not always change training",
        })
    return per, pd.DataFrame(kinds)


def beats(learned: dict, fixed: dict, tol: float = 0.01) -> bool:
    """More recall at equal (<= 1.1x) bytes, or at least equal recall with >= 2x fewer bytes."""
    more_recall = learned["recall"] > fixed["recall"] + tol and learned["bytes_vs_raw"] <= 1.1 * fixed["bytes_vs_raw"]
    fewer_bytes = learned["recall"] >= fixed["recall"] - tol and 2 * learned["bytes_vs_raw"] <= fixed["bytes_vs_raw"]
    return bool(more_recall or fewer_bytes)


def detection(args, quick: bool) -> dict:
    seeds = (0, 1) if quick else (0, 1, 2)
    steps = 40 if quick else 120  # 40 steps cannot show a plateau (its window is 50 steps)
    clean_per_seed = 2 if quick else 3
    train_seeds = {0} if quick else {0, 1}
    episodes = 20 if quick else 250
    specs = build_suite(seeds, steps, clean_per_seed)
    n_fault = sum(s.fault is not None for s in specs)
    print(f"\n== Part B: detection ==\nfault suite: 2 models x {len(FAULT_KINDS)} fault kinds x "
          f"seeds {seeds} = {n_fault} faulty + {len(specs) - n_fault} clean episodes of {steps} steps")
    t0 = time.perf_counter()
    traces = ep.record_all(specs, progress=True)
    t_record = time.perf_counter() - t0
    print(f"recorded {len(traces)} traces in {t_record:.0f} s")

    per_episode, effects = fault_effects(traces)
    print(f"\nfault effect on training (clean twin = same model and seed; twins identical before the "
          f"fault step in {int(per_episode.twin_identical_before.sum())}/{len(per_episode)} episodes)")
    print(effects.to_string(index=False))
    print("effect: |mean loss after the fault step - clean twin's| / std of that mean over the "
          f"{sum(t.spec.fault is None for t in traces) // 2} clean runs per model (inf: non-finite loss); "
          "changed: episodes with effect >= 2; d_acc: test accuracy minus the twin's")

    train_tr = [t for t in traces if base_seed(t.spec) in train_seeds]
    test_tr = [t for t in traces if base_seed(t.spec) not in train_seeds]
    print(f"\ntrain: seeds {sorted(train_seeds)} ({len(train_tr)} traces); test: seeds "
          f"{sorted(set(seeds) - train_seeds)} ({len(test_tr)} traces, "
          f"{sum(t.spec.fault is None for t in test_tr)} clean)")
    q, lin = QLearningPolicy(seed=0), LinUCBPolicy()
    t0 = time.perf_counter()
    ep.train(q, train_tr, episodes, seed=0, progress=True)
    ep.train(lin, train_tr, episodes, seed=0, progress=True)
    t_train = time.perf_counter() - t0
    print(f"trained q-learning and linucb on {episodes} episodes each in {t_train:.0f} s")

    policies = [StaticPolicy("macro"), StaticPolicy("meso"), StaticPolicy("micro"), StaticPolicy("raw"),
                RulePolicy(), q, lin]
    rows, frames, mixes, false_by = [], [], [], {}
    t0 = time.perf_counter()
    for p in policies:
        res = ep.evaluate(p, test_tr)
        false_by[p.name] = {}
        for r in res:
            for a in r.alarms:
                if r.fault == "clean" or a.step < r.fault_step:
                    false_by[p.name][a.detector] = false_by[p.name].get(a.detector, 0) + 1
        s = ep.summarize(res)
        rows.append({"policy": p.name, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}})
        frames.append(ep.results_frame(res))
        mix = {lv: 0 for lv in ("macro", "meso", "micro", "raw")}
        for r in res:
            for lv, n in r.level_steps.items():
                if lv in mix:
                    mix[lv] += n
        total = sum(mix.values()) or 1
        mixes.append({"policy": p.name, **{lv: f"{100 * n / total:.0f}%" for lv, n in mix.items()}})
    t_eval = time.perf_counter() - t0
    summary = pd.DataFrame(rows)
    results = pd.concat(frames, ignore_index=True)
    print(f"\npolicies on the test traces (evaluated in {t_eval:.0f} s)")
    print(summary.to_string(index=False))
    print("recall: faulty episodes with a true alarm; precision: true / all alarms; clean_false_alarm_rate: "
          "clean episodes with any alarm; median_delay: steps from fault to first true alarm; bytes_vs_raw: "
          "bytes / always-raw bytes (raw capped at 4096 values per kind x layer); latency_ms: detector time per step; "
          "an alarm counts as true when it fires in a faulty episode at or after the fault step (episodes.replay)")
    recall_kind = (results[results.fault != "clean"].groupby(["fault", "policy"], sort=False)["detected"]
                   .mean().unstack("policy")[[p.name for p in policies]].round(2))
    recall_kind = recall_kind.reindex([k for k in FAULT_KINDS if k in recall_kind.index])
    print("\nrecall per fault kind (test traces)")
    print(recall_kind.to_string())
    faulty = results[results.fault != "clean"]
    delay_kind = (faulty.groupby(["fault", "policy"], sort=False)["delay"].median()
                  .unstack("policy")[[p.name for p in policies]])
    delay_kind = delay_kind.reindex([k for k in FAULT_KINDS if k in delay_kind.index])
    print("\nmedian detection delay per fault kind, steps (test traces; NaN: never detected)")
    print(delay_kind.to_string())
    false_tab = pd.DataFrame(false_by).reindex(columns=[p.name for p in policies]).fillna(0).astype(int)
    false_tab.index.name = "detector"
    print("\nfalse alarms by detector (clean episodes, or before the fault step; test traces)")
    print(false_tab.to_string() if len(false_tab) else "none")
    mix = pd.DataFrame(mixes)
    print("\nlevel mix ((kind x step) slots at each level, test traces)")
    print(mix.to_string(index=False))
    n_steps = sum(len(t.values) for t in test_tr)
    capped = sum(t.raw_bytes(TelemetryConfig()).sum() for t in test_tr) / n_steps
    uncapped = sum(t.raw_bytes(TelemetryConfig(raw_cap=2**31 - 1)).sum() for t in test_tr) / n_steps
    floor = pa.ipc.get_record_batch_size(pa.RecordBatch.from_pylist([], schema=TELEMETRY_SCHEMA))
    print(f"\nbytes per step on the test traces: always-raw {capped:.0f} (raw_cap 4096; uncapped: "
          f"{uncapped:.0f}); one empty Arrow record batch of the telemetry schema: {floor} B = "
          f"{100 * floor / capped:.2f}% of always-raw, so a plan that sends anything every step cannot "
          f"go below that")

    by = {r["policy"]: r for r in rows}
    fixed = [p.name for p in policies[:4]]
    targets = []
    for name in (q.name, lin.name):
        s = by[name]
        checks = [
            ("recall >= 0.95", s["recall"], s["recall"] >= 0.95),
            ("precision >= 0.95", s["precision"], s["precision"] >= 0.95),
            ("bytes <= 1% of always-raw", s["bytes_vs_raw"], s["bytes_vs_raw"] <= 0.01),
            ("median delay <= 10 steps", s["median_delay"], s["median_delay"] <= 10),
        ] + [(f"beats {f}", f"recall {by[f]['recall']:.2f}, bytes {by[f]['bytes_vs_raw']:.4f}",
              beats(s, by[f])) for f in fixed]
        targets += [{"policy": name, "target": t, "value": v, "met": "met" if ok else "MISSED"} for t, v, ok in checks]
    targets = pd.DataFrame(targets)
    print("\nissue targets for the learned policies (beats: more recall at <= 1.1x bytes, or >= equal recall "
          "with >= 2x fewer bytes)")
    print(targets.to_string(index=False))
    return {"settings": {"seeds": list(seeds), "steps": steps, "clean_per_seed": clean_per_seed,
                         "train_seeds": sorted(train_seeds), "episodes": episodes,
                         "record_s": round(t_record, 1), "train_s": round(t_train, 1), "eval_s": round(t_eval, 1)},
            "fault_effects": effects.to_dict(orient="records"),
            "fault_effects_per_episode": per_episode.to_dict(orient="records"),
            "policies": rows, "recall_per_fault": recall_kind.reset_index().to_dict(orient="records"),
            "delay_per_fault": delay_kind.reset_index().to_dict(orient="records"),
            "false_alarms_by_detector": false_tab.reset_index().to_dict(orient="records"),
            "bytes_reference": {"always_raw_per_step": capped, "uncapped_raw_per_step": uncapped,
                                "empty_batch_bytes": floor},
            "level_mix": mixes, "targets": targets.to_dict(orient="records")}


# ==================================================================================== main


def overhead_targets(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for model in ("cnn", "cnn28"):
        t = table[table.model == model].set_index("method")
        for method, limit, label in (("ours:meso", 1.05, "steady (meso every step)"),
                                     ("rule:steady", 1.05, "steady (rule policy)"),
                                     ("rule:escalated", 1.25, "escalated (rule, all raw)")):
            v = t.loc[method, "x_step"] if method in t.index else math.nan
            rows.append({"model": model, "target": f"{label} <= {limit}x", "x_step": v,
                         "met": "met" if v <= limit else "MISSED"})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], "fewer repeats, seeds and steps (under 3 min)", argv)
    block, warmup, repeats = (5, 1, 4) if args.quick else (10, 2, 20)
    device = pick_device()
    info = describe(device)
    print(f"device={device} cpu={info['cpu']!r} cores={info['cpu_count']} threads={info['torch_threads']} "
          f"torch={info['torch']} mode={'quick' if args.quick else 'full'} "
          f"load average at start={os.getloadavg()[0]:.2f}")
    t_start = time.perf_counter()

    print(f"\n== Part A: overhead per training step ({repeats} blocks of {block} steps after {warmup} "
          f"warm-up blocks, methods interleaved) ==")
    rows, levels = [], []
    for w in build_workloads(device):
        rows.extend(bench_overhead(w, block, warmup, repeats))
        levels.append(bytes_per_level(w, 10 if args.quick else 20))
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
    t_a = time.perf_counter() - t_start

    det = detection(args, args.quick)
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s (part A {t_a:.0f} s, part B {total - t_a:.0f} s); "
          f"load average at end={os.getloadavg()[0]:.2f}")
    out = {"machine": info, "mode": "quick" if args.quick else "full",
           "overhead_settings": {"block": block, "warmup": warmup, "repeats": repeats, "lr": LR},
           "overhead": overhead.to_dict(orient="records"), "bytes_per_level": levels,
           "overhead_targets": ot.to_dict(orient="records"), "detection": det,
           "runtime_s": round(total, 1)}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
