"""What a swarm tells: losses watched per round, one report per member on the bus (with its
weights' statistics, one batched pass on device), and metrics shared between processes."""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from ..records import to_batch
from ..stats import STAT_NAMES, HostCopy, batched_stats

if TYPE_CHECKING:
    from .engine import Member


class Reports:
    """The reporting half of :class:`~adaptive_kit.swarm.Swarm` (it mixes this in)."""

    def _exchange(self) -> None:
        """Share every owned member's metrics with the other processes (no-op in one process)."""
        if self.world == 1:
            return
        mine = {m.id: m.metrics() for m in self.members if self.owns(m.id)}
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, (mine, self.alarms[-50:], self.lineage))
        for d, _, _ in gathered:
            for i, values in d.items():
                if not self.owns(i):
                    for k, v in values.items():
                        setattr(self.members[i], k, v)
        # quarantines found elsewhere this round go into every process's lineage, in member order
        seen = {(e["round"], e["member"], e["kind"]) for e in self.lineage}
        for _, _, lin in gathered:
            for e in lin:
                if (e["round"], e["member"], e["kind"]) not in seen:
                    self.lineage.append(e)
                    seen.add((e["round"], e["member"], e["kind"]))

    def _observe(self, owned: list[Member], losses: dict[int, np.ndarray], first_step: dict[int, int]) -> None:
        ids = np.array([m.id for m in owned], dtype=np.int64)
        if ids.size == 0:
            return
        T = max((len(v) for v in losses.values()), default=0)
        L = np.full((ids.size, T), np.nan)
        for i, m in enumerate(owned):
            row = losses.get(m.id, np.zeros(0))
            L[i, :len(row)] = row
            finite = row[np.isfinite(row)]
            m.loss_mean = float(finite.mean()) if finite.size else math.nan
            if m.active and finite.size < row.size:
                self._quarantine(m, "nonfinite", f"{row.size - finite.size} non-finite losses in {row.size} steps", "")
        alarms = self.watch.update(self.round, ids, np.array([first_step[m.id] for m in owned]), L,
                                   np.array([m.step_time for m in owned]), np.array([m.loss_mean for m in owned]))
        for a in alarms:
            self.alarms.append({"time": time.time(), "round": a.round, "member": a.member, "detector": a.alarm.detector,
                                "kind": a.alarm.kind, "scope": a.scope, "evidence": a.alarm.evidence,
                                "value": a.alarm.value})

    def _report(self, owned: list[Member], losses: dict[int, np.ndarray], first_step: dict[int, int],
                t_round: float) -> None:
        fit = self.fitness()
        now = time.time()
        rss, cpu = self._proc.memory_info().rss, self._proc.cpu_percent(None)
        gpu = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None
        rows = []
        n_train = len(self.x)
        for m in owned:
            row = losses.get(m.id, np.zeros(0))
            finite = row[np.isfinite(row)]
            spec = m.spec
            rows.append({
                "time": now, "member": m.id, "seq": m.seq, "round": self.round, "step": m.steps,
                "epochs": m.steps * spec.batch_size / n_train, "steps": int(row.size),
                "loss_mean": m.loss_mean, "loss_last": float(finite[-1]) if finite.size else math.nan,
                "loss_max": float(finite.max()) if finite.size else math.nan, "nonfinite": int(row.size - finite.size),
                "val_acc": m.val_acc, "val_loss": m.val_loss, "train_acc": m.train_acc, "fitness": float(fit[m.id]),
                "lr": spec.lr, "momentum": spec.momentum, "weight_decay": spec.weight_decay,
                "batch_size": spec.batch_size, "arch": spec.arch,
                "n_params": sum(p.numel() for p in m.params.values()),
                "compute_s": m.step_time * row.size if row.size else 0.0, "cpu_percent": cpu, "rss_bytes": rss,
                "gpu_bytes": gpu, "device": str(self.device), "status": m.status, "origin": m.origin,
            })
            m.seq += 1
        self._rows.extend(rows)
        new_alarms = [a for a in self.alarms if a["round"] == self.round and self.owns(a["member"])]
        if self.sink is not None and rows:
            self.sink.write(to_batch("swarm", {k: [r[k] for r in rows] for k in rows[0]}), "swarm")
            self.sink.write(self._param_stats([m for m in owned if m.active], now), "stats")
            if new_alarms:
                self.sink.write(to_batch("swarm_alarms", {k: [a[k] for a in new_alarms] for k in new_alarms[0]}),
                                "swarm_alarms")
        if self.collector is not None:
            self.collector.poll()

    def _param_stats(self, members: list[Member], now: float):
        """Weight statistics of the selected layers of every member, one batched pass on device."""
        groups, who, names = [], [], []
        sel = set(self.config.param_layers)
        for m in members:
            _, layers = self._template(m.spec)
            for name, keys in zip(self.layer_names(m.spec), layers):
                if not sel or name in sel:
                    groups.append([m.params[k] for k in keys])
                    who.append(m)
                    names.append(name)
        cols: dict[str, Any] = {"time": now, "kind": "weight", "layer": names,
                                "step": [m.steps for m in who], "rank": [m.id for m in who]}
        if groups:
            values = HostCopy(batched_stats(groups)).wait().numpy()
        else:
            values = np.zeros((0, len(STAT_NAMES)))
        for j, s in enumerate(STAT_NAMES):
            col = values[:, j]
            cols[s] = col.astype(np.int64) if s in ("count", "nonfinite") else col
        return to_batch("stats", cols)
