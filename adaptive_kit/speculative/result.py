"""What one run did, on the host: history, evaluations, region states and traffic."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch

from .network import simulated_time
from .regions import FULL, GLOBAL, HYBRID


@dataclass
class RunResult:
    """What one run did, on the host: per-step history, evaluations, region states, traffic."""

    method: str
    workers: int
    regions: list[str]
    history: pd.DataFrame  # per step: loss, tagged, rollbacks, recomputes, bytes
    evals: pd.DataFrame  # step, test_loss, test_accuracy (the workers' averaged model)
    p: np.ndarray  # (steps, R) speculative fraction per region after each step
    log: list  # Collective records
    compute_s: float  # one worker's forward + backward, measured
    wall_s: float  # measured wall-clock of the training loop
    alarms: list[dict] = field(default_factory=list)  # non-finite workers excluded, by step and rank
    theta: torch.Tensor | None = None  # final averaged weights (N,)

    @property
    def final_test_loss(self) -> float:
        return float(self.evals["test_loss"].iloc[-1])

    def bytes_per_worker(self) -> dict[str, int]:
        """Training bytes each worker sent: payload (gradients, weights) and control (stats, flags)."""
        pay = sum(c.payload_bytes for c in self.log if c.kind != "eval")
        ctl = sum(c.control_bytes for c in self.log if c.kind != "eval")
        return {"payload": pay, "control": ctl, "total": pay + ctl}

    def rollback_rate(self) -> float:
        """Rolled-back reconciliations over all reconciliations of speculative work."""
        n = self.history["reconciled"].sum()
        return float(self.history["rollbacks"].sum() / n) if n else 0.0

    def simulated_time(self, net: str, compute_s: float | None = None) -> np.ndarray:
        """Cumulative simulated seconds per step on network profile ``net``.

        ``compute_s`` overrides the measured per-step compute time: pass one value to every run
        you compare, so that timing noise on a busy machine does not decide the comparison.
        """
        return simulated_time(self.log, len(self.history), self.workers,
                              self.compute_s if compute_s is None else compute_s,
                              (self.history["recomputes"] > 0).to_numpy(), net)

    def bytes_at_evals(self) -> np.ndarray:
        """Cumulative training bytes each worker had sent after every evaluation (one per row of
        ``evals``)."""
        sent = (self.history["payload_bytes"] + self.history["control_bytes"]).cumsum().to_numpy()
        return sent[self.evals["step"].to_numpy()]

    def tagged_outputs(self) -> tuple[int, int]:
        """(kept, recomputed): tagged worker-step outputs kept after reconciliation, and recomputed."""
        tagged = int(self.history["tagged"].sum()) * self.workers
        recomputed = int(self.history["recomputes"].sum())
        return tagged - recomputed, recomputed

    def state_shares(self) -> dict[str, float]:
        """Share of region-steps spent Global, Hybrid and Full."""
        p = self.p
        return {GLOBAL: float((p == 0).mean()), HYBRID: float(((p > 0) & (p < 1)).mean()),
                FULL: float((p == 1).mean())}

    def time_to(self, target: float, net: str, compute_s: float | None = None) -> float:
        """Simulated seconds until the test loss first reaches ``target``; :class:`NotReached`
        (a float equal to inf that says so and names the best loss) if it never does."""
        hit = self.evals[self.evals["test_loss"] <= target]
        if hit.empty:
            return NotReached(target, float(self.evals["test_loss"].min()))
        return float(self.simulated_time(net, compute_s)[int(hit["step"].iloc[0])])


class NotReached(float):
    """``time_to``'s answer when the target loss was never reached: inf in arithmetic and
    comparisons, ``not reached`` when printed, with the target and the best loss of the run."""

    def __new__(cls, target: float, best: float) -> NotReached:
        out = super().__new__(cls, float("inf"))
        out.target, out.best = target, best
        return out

    def __reduce__(self):
        return NotReached, (self.target, self.best)

    def __repr__(self) -> str:
        return f"not reached (target {self.target:.4g}, best test loss {self.best:.4g})"

    __str__ = __repr__


def loss_at_bytes(sweep: list[RunResult], nbytes: float) -> float:
    """A method's final test loss at ``nbytes`` per worker, read off its sweep of runs (one per
    setting) by linear interpolation in log(bytes); below the sweep's cheapest run, that run's loss
    (which favours the method), above its dearest, the dearest's.

    Raises:
        ValueError: the sweep is empty or ``nbytes`` is not > 0.
    """
    if not sweep:
        raise ValueError("loss_at_bytes: the sweep is empty")
    if not nbytes > 0:
        raise ValueError(f"loss_at_bytes(nbytes={nbytes!r}): expected > 0")
    pts = sorted((float(np.log(r.bytes_per_worker()["total"])), r.final_test_loss) for r in sweep)
    return float(np.interp(np.log(nbytes), [x for x, _ in pts], [y for _, y in pts]))


def with_shared_compute(results: Mapping[str, RunResult]) -> dict[str, RunResult]:
    """The runs with one shared compute time per step (the smallest measured), so that simulated
    times differ by communication and recompute only, not by when each run's calibration ran."""
    c = min(r.compute_s for r in results.values())
    return {k: replace(r, compute_s=c) for k, r in results.items()}
