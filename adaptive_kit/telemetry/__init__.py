"""Telemetry granularity: collect gradients, weights and activations at the level each layer needs.

The face is the fifteen names of ``__all__``; the recorded-episode workflow, what panels need
and the building blocks are importable from here too (listed last).

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
  :data:`LEVELS`;
- :class:`DetectorSuite` (the standard detectors), :class:`Controller` (a policy in the loop);
- policies: :class:`StaticPolicy`, :class:`RulePolicy`, :class:`QLearningPolicy`,
  :class:`LinUCBPolicy`;
- faults to break a run on purpose: :class:`Fault`, :data:`FAULT_KINDS`.

Run an episode (a workload, a fault, a seed) live: :func:`run` (``EpisodeSpec`` ->
:class:`Run`, on ``device``, default :func:`adaptive_kit.pick_device`).

Importable from here too. Record episodes once and train and judge policies on the
recordings: :class:`Workload`, :func:`workload`, :func:`build_model`, :func:`fault_suite`,
:func:`record_all` (-> :class:`Trace` s), :func:`train`, :func:`evaluate` (->
:class:`EpisodeResult` s), :func:`summarize`, :func:`results_frame`. For panels and
benchmarks: :data:`KINDS`, :data:`QUIET_KINDS`, :data:`LAYER_KINDS`, :func:`layer_candidates`,
:data:`ACTIVATION_TYPES`. The building blocks (:class:`FaultInjector`, :class:`Observation`,
:func:`observations`, :class:`Policy`, :class:`State`, :class:`StateTracker`,
:class:`RewardWeights`, :data:`TELEMETRY_SCHEMA`).
"""
from .collector import LEVELS, StepRecord, Telemetry, TelemetryConfig
from .control import Controller
from .episodes import EpisodeSpec, Run, run
from .faults import FAULT_KINDS, Fault
from .policies import LinUCBPolicy, QLearningPolicy, RulePolicy, StaticPolicy
from .suite import DetectorSuite

# isort: split
# Importable from here too, outside the headline names: the recorded-episode workflow (notebook 01,
# the benchmark), what panels need (widgets/telemetry.py), and the building blocks of extensions.
from .collector import ACTIVATION_TYPES, KINDS, TELEMETRY_SCHEMA  # noqa: F401
from .control import StateTracker  # noqa: F401
from .episodes import (  # noqa: F401
    EpisodeResult,
    Trace,
    evaluate,
    fault_suite,
    record,
    record_all,
    replay,
    results_frame,
    summarize,
    train,
)
from .faults import LAYER_KINDS, QUIET_KINDS, FaultInjector, layer_candidates  # noqa: F401
from .observations import Observation, observations  # noqa: F401
from .policies import Policy, RewardWeights, State  # noqa: F401
from .workloads import Workload, build_model, workload  # noqa: F401

__all__ = [
    "FAULT_KINDS", "LEVELS", "Controller", "DetectorSuite", "EpisodeSpec", "Fault", "LinUCBPolicy",
    "QLearningPolicy", "Run", "RulePolicy", "StaticPolicy", "StepRecord", "Telemetry", "TelemetryConfig", "run",
]
