"""The detector suite: every standard detector run on each step's record, never breaking the step."""
from __future__ import annotations

import time
import warnings
from collections.abc import Iterable

from ..anomaly import Alarm, SeriesConfig
from .detectors import (
    ActivationScaleDetector,
    DeadReLUDetector,
    Detector,
    LossDetector,
    LossShiftDetector,
    NonFiniteDetector,
    ScaleDetector,
    WeightDriftDetector,
    WeightProgressDetector,
)
from .observations import Observation, complete_macro, observations
from .reduce import StepRecord


class DetectorSuite:
    """Runs detectors on every :class:`StepRecord`; pass it as ``Telemetry(on_step=suite)``.

    A detector that raises is counted in :attr:`errors` (with one warning) and skipped for
    that step: detection never breaks the training step. :attr:`latency_s` keeps the
    analysis time of every step.
    """

    def __init__(self, detectors: Iterable[Detector], layers: dict[str, Iterable[str]] | None = None) -> None:
        self.detectors = list(detectors)
        self.layers = {k: list(v) for k, v in (layers or {}).items()}  # kind -> layers (complete_macro)
        self.alarms: list[Alarm] = []
        self.latency_s: list[float] = []
        self.errors = 0
        self.last_observations: list[Observation] = []

    @classmethod
    def standard(cls, param_layers: list[str], relu_layers: Iterable[str],
                 loss_config: SeriesConfig = SeriesConfig(), act_layers: Iterable[str] | None = None) -> DetectorSuite:
        """The standard detectors for a model with these parameter, ReLU and activation layers:
        non-finite values, gradient and activation scale, dying units, weight progress and
        drift, each against the layer's own history, and the loss's spikes, divergence and
        shifts. With ``act_layers`` every step's whole-network statistics are completed from
        whatever mix of levels arrived (:func:`complete_macro`)."""
        layers = {"grad": param_layers, "weight": param_layers}
        if act_layers is not None:
            layers["act"] = list(act_layers)
        return cls([
            NonFiniteDetector(),
            ScaleDetector("grad"),
            DeadReLUDetector(relu_layers),
            ActivationScaleDetector(),
            WeightProgressDetector(),
            WeightDriftDetector(),
            LossDetector(loss_config),
            LossShiftDetector(),
        ], layers)

    @classmethod
    def for_telemetry(cls, tel, loss_config: SeriesConfig = SeriesConfig()) -> DetectorSuite:
        """The standard detectors wired to a :class:`~adaptive_kit.telemetry.Telemetry`'s layers."""
        return cls.standard(tel.param_layers, tel.relu_layers, loss_config, tel.layers["act"])

    @property
    def suspicion(self) -> dict[tuple[str, str], float]:
        """(kind, layer) -> how close its last look came to an alarm (1: at the threshold)."""
        out: dict[tuple[str, str], float] = {}
        for d in self.detectors:
            for key, v in getattr(d, "suspicion", {}).items():
                out[key] = max(out.get(key, 0.0), v)
        return out

    @property
    def pending(self) -> frozenset[tuple[str, str]]:
        """(kind, layer)s whose last look was bad but not yet confirmed: worth another look."""
        return frozenset().union(*(getattr(d, "pending", ()) for d in self.detectors))

    def __call__(self, record: StepRecord) -> list[Alarm]:
        return self.observe(record.step, observations(record), record.loss)

    def observe(self, step: int, obs: list[Observation], loss: float | None) -> list[Alarm]:
        """Run every detector on one step's observations and loss; return the new alarms."""
        start = time.perf_counter()
        if self.layers:
            obs = complete_macro(obs, self.layers)
        self.last_observations = obs
        found: list[Alarm] = []
        for d in self.detectors:
            try:
                found.extend(d.update(step, obs, loss))
            except Exception as e:  # a detector must never break training
                self.errors += 1
                if self.errors == 1:
                    warnings.warn(f"detector {d.name} failed at step {step}: {e!r}", stacklevel=2)
        self.latency_s.append(time.perf_counter() - start)
        self.alarms.extend(found)
        return found
