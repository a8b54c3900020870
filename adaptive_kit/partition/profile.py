"""Batch profiles and a cost model calibrated on measurements.

:func:`profile_batch` reads what a batch will cost before it runs: rows, sequence length (up to
the last non-padding token), tokens, elements, bytes, dtype and sparsity. :class:`CostModel`
turns a model graph's FLOPs and bytes into seconds, fitted (non-negative least squares) to the
node times :func:`~adaptive_kit.partition.model_graph` measured, which smooths the noise of
timing each small operation alone; it scales to another batch by its work (tokens, or rows for
inputs without a sequence) against the batch it was calibrated on.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch
from scipy.optimize import nnls


@dataclass(frozen=True)
class BatchProfile:
    rows: int
    seq_len: int  # longest row up to its last non-padding token (1 for inputs without a sequence)
    tokens: int  # non-padding tokens (rows for inputs without a sequence)
    elements: int
    bytes: int
    dtype: str
    sparsity: float  # share of zero elements

    @property
    def work(self) -> float:
        """What compute scales with: tokens."""
        return float(self.tokens)


def profile_batch(batch: torch.Tensor | Sequence[torch.Tensor], pad_id: int | None = None) -> BatchProfile:
    """Characteristics of a batch (the first tensor when given several): read before it runs.

    Integer inputs of shape (rows, seq) are token ids: with ``pad_id`` the padding after each
    row's last real token is not counted. Other inputs count their rows.

    Raises:
        ValueError: an empty batch or a scalar.
    """
    if not isinstance(batch, torch.Tensor) and len(batch) == 0:
        raise ValueError("profile_batch: got an empty sequence of tensors")
    x = batch if isinstance(batch, torch.Tensor) else batch[0]
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"profile_batch: a batch needs a leading dimension > 0, got shape {tuple(x.shape)}")
    rows = int(x.shape[0])
    sequence = x.dim() == 2 and not x.is_floating_point()
    if sequence:
        seq = int(x.shape[1])
        if pad_id is not None:
            real = x != pad_id
            pos = torch.arange(1, seq + 1, device=x.device)
            lengths = (real * pos).amax(dim=1)  # one past the last real token
            tokens, seq = int(lengths.sum()), int(lengths.max())
        else:
            tokens = rows * seq
    else:
        seq, tokens = 1, rows
    zeros = int((x == 0).sum())
    return BatchProfile(rows, seq, tokens, x.numel(), x.numel() * x.element_size(), str(x.dtype).replace("torch.", ""),
                        zeros / max(x.numel(), 1))


_FEATURES = ("flops", "act_bytes", "param_bytes")


def _robust_nnls(x: np.ndarray, y: np.ndarray, rounds: int = 3, cut: float = 3.0) -> np.ndarray:
    """Non-negative least squares, refitted without outliers.

    After each fit, nodes whose log ratio of measured to predicted time is more than ``cut``
    robust deviations (MAD) from the median are left out and the fit repeated: one disturbed
    timing cannot pull the coefficients (and so every node's cost) with it.
    """
    keep = y > 0
    scale = np.maximum(x.max(axis=0), 1e-30)
    coef = np.zeros(x.shape[1])
    for _ in range(rounds):
        sol, _ = nnls(x[keep] / scale, y[keep])
        coef = sol / scale
        pred = np.maximum(x @ coef, 1e-12)
        r = np.log(np.maximum(y, 1e-12) / pred)
        med = np.median(r[y > 0])
        mad = 1.4826 * np.median(np.abs(r[y > 0] - med)) + 1e-3
        new = (y > 0) & (np.abs(r - med) <= cut * mad)
        if new.sum() < x.shape[1] or (new == keep).all():
            break
        keep = new
    return coef


@dataclass(frozen=True)
class CostModel:
    """seconds = overhead + flops / flop_rate + activation bytes / act_rate + parameter bytes / param_rate.

    ``reference`` is the work of the batch the graph was measured on; :meth:`predict` scales the
    flops and activation bytes by another batch's work against it.
    """

    overhead_s: float
    s_per_flop: float
    s_per_act_byte: float
    s_per_param_byte: float
    reference: float = 1.0
    r2: float = float("nan")  # of the fit on the measured node times

    @classmethod
    def fit(cls, g: nx.DiGraph, reference: BatchProfile | float = 1.0, measured: str = "time_s") -> CostModel:
        """Calibrate on the nodes' measured ``time_s``.

        Raises:
            ValueError: the graph has no measured time (profiled with reps=0).
        """
        y = np.array([d.get(measured, 0.0) for _, d in g.nodes(data=True)], dtype=float)
        if not (y > 0).any():
            raise ValueError(f"CostModel.fit: no node has a measured {measured!r} > 0 (profile with reps > 0)")
        x = np.array([[1.0, *(float(d.get(f, 0.0)) for f in _FEATURES)] for _, d in g.nodes(data=True)])
        coef = _robust_nnls(x, y)
        pred = x @ coef
        r2 = 1 - float(((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-300))
        ref = reference.work if isinstance(reference, BatchProfile) else float(reference)
        if not ref > 0:
            raise ValueError(f"CostModel.fit: the reference batch's work must be > 0, got {ref!r} (all padding?)")
        return cls(*(float(c) for c in coef), reference=ref, r2=r2)

    def predict(self, g: nx.DiGraph, batch: BatchProfile | float | None = None,
                measured: str | None = None, trust: float = 5.0,
                disagree: float | None = None) -> dict[str, float]:
        """Seconds per node for a batch (default: the reference batch).

        With ``measured`` (e.g. "time_s"), a node whose measured time exceeds ``trust`` x the
        per-operation overhead keeps its measurement, scaled to the batch like the model's
        estimate: the model smooths the small, noisy operations, and a large one is priced by
        what it was seen to take (a concatenation moves many bytes yet costs little). With
        ``disagree`` (e.g. 2), the measurement takes over gradually: not at all while it is
        within that factor of the model's estimate (noise), fully beyond its square (a mispriced
        operation), geometrically blended between, so no node's cost jumps between two values
        when its timing wobbles around a threshold (and plans made from the costs do not).
        """
        work = self.reference if batch is None else (batch.work if isinstance(batch, BatchProfile) else float(batch))
        ratio = work / self.reference
        out = {}
        for v, d in g.nodes(data=True):
            scaled = self.s_per_flop * d.get("flops", 0.0) + self.s_per_act_byte * d.get("act_bytes", 0.0)
            fixed = self.overhead_s + self.s_per_param_byte * d.get("param_bytes", 0.0)
            seen = d.get(measured, 0.0) if measured else 0.0
            at_ref = fixed + scaled
            model = fixed + ratio * scaled
            if seen > trust * self.overhead_s and at_ref > 0 and disagree is not None and disagree > 1:
                off = abs(np.log(seen / at_ref)) / np.log(disagree)  # 1 at the factor, 2 at its square
                w = float(np.clip(off - 1.0, 0.0, 1.0))
                out[v] = model * (seen / at_ref) ** w
            elif seen > trust * self.overhead_s:
                out[v] = seen * model / at_ref if at_ref > 0 else seen
            else:
                out[v] = model
        return out

    def annotate(self, g: nx.DiGraph, batch: BatchProfile | float | None = None, key: str = "cost_s",
                 measured: str | None = "time_s", disagree: float | None = None) -> nx.DiGraph:
        """Write :meth:`predict` (measured nodes trusted) into each node's ``key``; returns ``g``."""
        nx.set_node_attributes(g, self.predict(g, batch, measured, disagree=disagree), key)
        return g

    def stage_seconds(self, g: nx.DiGraph, stage_of: Mapping[str, int], k: int,
                      batch: BatchProfile | float | None = None) -> np.ndarray:
        """(k,) predicted seconds of each stage of a plan at speed 1."""
        out = np.zeros(k)
        for v, t in self.predict(g, batch).items():
            out[stage_of[v]] += t
        return out
