"""Telemetry granularity: collect gradients, weights and activations at the level each layer needs.

The face, in three parts.

Collect and steer a training run of your own::

    tel = Telemetry(model, "meso")
    tel.on_step = DetectorSuite.for_telemetry(tel)  # or Controller(tel, RulePolicy()): levels per step
    for i, (x, y) in enumerate(batches):
        with tel.step(i):                           # forward and backward inside
            loss = loss_fn(model(x), y)
            tel.log_loss(loss)
            loss.backward()
        opt.step()
    tel.close()

- :class:`Telemetry`, :class:`TelemetryConfig`, :class:`StepRecord` (what one step sent),
  :data:`LEVELS`, :data:`KINDS`;
- :class:`DetectorSuite` (the standard detectors), :class:`Controller` (a policy in the loop);
- policies: :class:`StaticPolicy`, :class:`RulePolicy`, :class:`QLearningPolicy`,
  :class:`LinUCBPolicy`;
- faults to break a run on purpose: :class:`Fault`, :data:`FAULT_KINDS`.

Run episodes (a workload, a fault, a seed) live, or record them once and train and judge
policies on the recordings: :func:`run` -> :class:`Run`; :class:`EpisodeSpec`,
:class:`Workload`, :func:`workload`, :func:`build_model`; :func:`fault_suite`,
:func:`record_all`, :func:`train`, :func:`evaluate` -> :class:`EpisodeResult` s,
:func:`summarize`, :func:`results_frame`.

For panels and benchmarks: :data:`QUIET_KINDS`, :data:`LAYER_KINDS`, :func:`layer_candidates`,
:data:`ACTIVATION_TYPES`, and the building blocks (:class:`FaultInjector`, :class:`Observation`,
:func:`observations`, :class:`Policy`, :class:`State`, :class:`StateTracker`,
:class:`RewardWeights`, :data:`TELEMETRY_SCHEMA`).
"""
from .collector import (
    ACTIVATION_TYPES,
    KINDS,
    LEVELS,
    TELEMETRY_SCHEMA,
    StepRecord,
    Telemetry,
    TelemetryConfig,
)
from .control import Controller, StateTracker
from .episodes import (
    EpisodeResult,
    EpisodeSpec,
    Run,
    Trace,
    evaluate,
    fault_suite,
    record_all,
    results_frame,
    run,
    summarize,
    train,
)
from .faults import FAULT_KINDS, LAYER_KINDS, QUIET_KINDS, Fault, FaultInjector, layer_candidates
from .observations import Observation, observations
from .policies import (
    LinUCBPolicy,
    Policy,
    QLearningPolicy,
    RewardWeights,
    RulePolicy,
    State,
    StaticPolicy,
)
from .suite import DetectorSuite
from .workloads import Workload, build_model, workload

__all__ = [
    # collect and steer
    "FAULT_KINDS", "KINDS", "LEVELS", "Controller", "DetectorSuite", "Fault", "LinUCBPolicy",
    "QLearningPolicy", "RulePolicy", "StaticPolicy", "StepRecord", "Telemetry", "TelemetryConfig",
    # episodes
    "EpisodeResult", "EpisodeSpec", "Run", "Trace", "Workload", "build_model", "evaluate", "fault_suite",
    "record_all", "results_frame", "run", "summarize", "train", "workload",
    # for panels, benchmarks and extensions
    "ACTIVATION_TYPES", "LAYER_KINDS", "QUIET_KINDS", "TELEMETRY_SCHEMA", "FaultInjector", "Observation",
    "Policy", "RewardWeights", "State", "StateTracker", "layer_candidates", "observations",
]
